// Tensor wrappers over the pixel machinery in impl/pixels.h, and the torchvision-style grid.
#include "data/image_io.h"

#include <stdexcept>

#include "data/impl/pixels.h"

namespace diffuse::data {
namespace fs = std::filesystem;

namespace {

// A contiguous CPU [H, W, C] uint8 tensor and a view of its pixels.
std::pair<torch::Tensor, impl::ImageView> hwc_view(const torch::Tensor& image, const std::string& what) {
  if (!image.defined() || image.dim() != 3 || image.scalar_type() != torch::kUInt8 || image.size(2) < 1 ||
      image.size(2) > 4) {
    throw std::invalid_argument(what + ": expected an image [H, W, C] uint8 with C = 1..4, got " +
                                (image.defined() ? std::string(c10::toString(image.scalar_type())) + " " +
                                                       c10::str(image.sizes())
                                                 : std::string("an undefined tensor")));
  }
  auto data = image.cpu().contiguous();
  impl::ImageView view{data.data_ptr<uint8_t>(), data.size(0), data.size(1), data.size(2)};
  return {data, view};
}

torch::Tensor to_tensor(impl::Image image) {
  auto out = torch::empty({image.height, image.width, image.channels}, torch::kUInt8);
  std::memcpy(out.data_ptr<uint8_t>(), image.pixels.data(), image.pixels.size());
  return out;
}

}  // namespace

torch::Tensor make_image_grid(const torch::Tensor& images, int64_t nrow, int64_t padding) {
  if (!images.defined() || images.dim() != 4 || images.size(0) == 0) {
    throw std::invalid_argument("image grid: expected a non-empty batch [N, C, H, W] float or [N, H, W, C] uint8");
  }
  if (nrow < 1 || padding < 0) {
    throw std::invalid_argument("image grid: nrow must be >= 1 and padding >= 0, got " + std::to_string(nrow) +
                                " and " + std::to_string(padding));
  }
  torch::Tensor nhwc;
  if (images.scalar_type() == torch::kUInt8) {
    nhwc = images.cpu();
  } else if (images.is_floating_point()) {
    // torchvision's save_image conversion: x * 255 + 0.5, clamped, truncated.
    nhwc = images.detach().cpu().to(torch::kFloat).mul(255).add_(0.5).clamp_(0, 255).to(torch::kUInt8)
               .permute({0, 2, 3, 1});
  } else {
    throw std::invalid_argument("image grid: images must be floating point [N, C, H, W] or uint8 [N, H, W, C], got " +
                                std::string(c10::toString(images.scalar_type())));
  }
  const int64_t n = nhwc.size(0), h = nhwc.size(1), w = nhwc.size(2), c = nhwc.size(3);
  if (c < 1 || c > 4) throw std::invalid_argument("image grid: images must have 1 to 4 channels, got " + std::to_string(c));
  const int64_t columns = std::min(nrow, n), rows = (n + columns - 1) / columns;
  auto grid = torch::zeros({rows * (h + padding) + padding, columns * (w + padding) + padding, c}, torch::kUInt8);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t y = k / columns, x = k % columns;
    grid.narrow(0, y * (h + padding) + padding, h).narrow(1, x * (w + padding) + padding, w).copy_(nhwc[k]);
  }
  return grid;
}

void save_image_grid(const fs::path& path, const torch::Tensor& images, int64_t nrow, int64_t padding,
                     bool overwrite) {
  save_png(path, make_image_grid(images, nrow, padding), overwrite);
}

void save_png(const fs::path& path, const torch::Tensor& image_hwc_uint8, bool overwrite) {
  auto [data, view] = hwc_view(image_hwc_uint8, "save_png '" + path.string() + "'");
  auto png = path;
  if (png.extension() != ".png" && png.extension() != ".PNG") {
    throw std::invalid_argument("save_png: '" + path.string() + "' must end in .png");
  }
  impl::encode_image_file(png, view, /*jpeg_quality=*/95, overwrite);
}

void save_image(const fs::path& path, const torch::Tensor& image_hwc_uint8, int jpeg_quality, bool overwrite) {
  auto [data, view] = hwc_view(image_hwc_uint8, "save_image '" + path.string() + "'");
  impl::encode_image_file(path, view, jpeg_quality, overwrite);
}

torch::Tensor load_image(const fs::path& path) { return to_tensor(impl::decode_image_file(path)); }

torch::Tensor convert_image_channels(const torch::Tensor& image_hwc_uint8, int64_t channels) {
  auto [data, view] = hwc_view(image_hwc_uint8, "convert_image_channels");
  return to_tensor(impl::convert_channels(view, channels));
}

torch::Tensor square_resize_image(const torch::Tensor& image_hwc_uint8, int64_t size) {
  auto [data, view] = hwc_view(image_hwc_uint8, "square_resize_image");
  return to_tensor(impl::square_resize(view, size));
}

}  // namespace diffuse::data
