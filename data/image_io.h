// data/image_io.h: images as tensors to and from files: sample grids, PNG/JPEG/BMP, and the
// per-image transforms of `diffuse prep`.
//
//   auto samples = model_output.add(1).div(2);                    // [N, C, H, W] in [0, 1]
//   diffuse::data::save_image_grid("samples.png", samples, 8);    // 8 per row, like torchvision
#pragma once

#include <torch/torch.h>

#include <filesystem>

namespace diffuse::data {

/// Arranges images in a grid the way torchvision's make_grid does: `nrow` per row, `padding`
/// black pixels between and around the images. Input: [N, C, H, W] float in [0, 1] (clamped;
/// converted as torchvision's save_image: x * 255 + 0.5, truncated) or uint8 [N, H, W, C].
/// Returns [rows * (H + padding) + padding, nrow * (W + padding) + padding, C] uint8.
torch::Tensor make_image_grid(const torch::Tensor& images, int64_t nrow, int64_t padding = 2);

// Every save below writes a temporary beside `path`, checks each write, fsyncs and renames
// (util/durable_file.h): a full disk is an exception naming the file, never a truncated image. An
// existing file is replaced only with `overwrite`, and never a device, folder or FIFO.

/// Saves make_image_grid(images, nrow, padding) as a PNG.
void save_image_grid(const std::filesystem::path& path, const torch::Tensor& images, int64_t nrow,
                     int64_t padding = 2, bool overwrite = false);

/// Saves one image [H, W, C] uint8 (C = 1, 2, 3 or 4) as a PNG.
void save_png(const std::filesystem::path& path, const torch::Tensor& image_hwc_uint8, bool overwrite = false);

/// Saves one image [H, W, C] uint8 as PNG, JPEG or BMP, chosen by the file extension.
void save_image(const std::filesystem::path& path, const torch::Tensor& image_hwc_uint8, int jpeg_quality = 95,
                bool overwrite = false);

/// Decodes a PNG, JPEG or BMP file to [H, W, C] uint8 with the file's own channel count (1-4).
/// Throws naming the file and the reason.
torch::Tensor load_image(const std::filesystem::path& path);

/// Converts [H, W, C] uint8 (C = 1..4) to `channels` (1 or 3): alpha dropped, grey replicated,
/// RGB to grey by ITU-R 601 luma (as PIL's convert("L")).
torch::Tensor convert_image_channels(const torch::Tensor& image_hwc_uint8, int64_t channels);

/// Centre-crops [H, W, C] uint8 to a square and resizes it to size x size (area averaging
/// when shrinking, bilinear when enlarging), as `diffuse prep --size` does.
torch::Tensor square_resize_image(const torch::Tensor& image_hwc_uint8, int64_t size);

}  // namespace diffuse::data
