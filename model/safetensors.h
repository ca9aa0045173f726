// model/safetensors.h: read and write the safetensors format of the Hugging Face ecosystem, so
// weights move between diffuse and Python (`safetensors.torch.load_file`) unchanged.
//
// Layout: an unsigned 64-bit little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}},
// then the raw little-endian tensor bytes; offsets are relative to the end of the header.
//
//   save_safetensors("unet.safetensors", state_dict(*unet), {{"unet_options", opts.to_json()}});
//   auto file = load_safetensors("unet.safetensors");
//   load_state_dict(*unet, file.tensors);
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::model {

/// The content of one safetensors file: tensors in the order of their data offsets, and the
/// string-to-string `__metadata__` map (empty when the file has none).
struct SafetensorsFile {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;
};

/// Largest header accepted (the reference Rust implementation's limit): a larger length field
/// means a corrupt or hostile file, not a model.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

/// Writes `tensors` (any device, any layout; stored contiguous, in the given order, 8-byte aligned
/// data) and `metadata`. An existing `path` is replaced only with `overwrite` (and never when it is
/// not a regular file). Writes to a temporary file beside `path` and renames it into place, so a
/// crash never leaves a half-written file under the final name. Throws std::runtime_error on I/O
/// errors, duplicate or empty names, or a dtype safetensors cannot represent.
void save_safetensors(const std::filesystem::path& path,
                      const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {}, bool overwrite = false);

/// Reads a safetensors file into CPU tensors. Every malformed case throws std::runtime_error naming
/// the file and the problem: shorter than 8 bytes, header length beyond kSafetensorsMaxHeaderBytes
/// or beyond the file, header not UTF-8 JSON or not an object, entries without dtype/shape/
/// data_offsets, unknown dtype, negative or non-integer shape, data size not matching
/// shape x dtype, offsets out of order, overlapping, leaving gaps or running past the file, bytes
/// after the last tensor, duplicate names, and non-string metadata values.
SafetensorsFile load_safetensors(const std::filesystem::path& path);

/// The safetensors name of a dtype ("F32", "BF16", ...); throws for dtypes it cannot hold.
std::string safetensors_dtype_name(torch::ScalarType dtype);

}  // namespace diffuse::model
