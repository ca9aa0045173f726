// A dataset's identity: the header in a canonical text form and two chunks of pixels, hashed.
// Two chunks rather than the whole file: a 10 GB dataset must not be read at every start, and a
// copy that is truncated, re-made from other images or of another version differs in its count,
// attributes, first or last images.
#include "data/dataset_identity.h"

#include <algorithm>

#include "data/dataset.h"
#include "util/sha256.h"

namespace diffuse::data {

std::string DatasetIdentity::summary() const {
  return std::to_string(count) + " images " + std::to_string(height) + "x" + std::to_string(width) + "x" +
         std::to_string(channels) + " " + dtype + (has_labels ? ", labels" : ", no labels") + ", sha256 " +
         digest.substr(0, 12);
}

DatasetIdentity dataset_identity(const std::filesystem::path& path) {
  const DatasetInfo info = read_dataset_info(path);
  DatasetIdentity identity;
  identity.count = info.count;
  identity.height = info.height;
  identity.width = info.width;
  identity.channels = info.channels;
  identity.has_labels = info.has_labels;

  // One line per field, so no two different headers give the same text.
  std::string header = "diffuse dataset identity v1\n";
  for (const auto& [key, value] :
       std::initializer_list<std::pair<const char*, int64_t>>{{"format_version", info.format_version},
                                                              {"count", info.count},
                                                              {"height", info.height},
                                                              {"width", info.width},
                                                              {"channels", info.channels},
                                                              {"labels", info.has_labels ? 1 : 0}}) {
    header += std::string(key) + "=" + std::to_string(value) + "\n";
  }
  header += "dtype=" + identity.dtype + "\nsource=" + info.source + "\ncompression=" + info.compression +
            "\nchunk=";
  for (int64_t extent : info.chunk_shape) header += std::to_string(extent) + ",";
  header += "\nclass_names=" + std::to_string(info.class_names.size()) + "\n";
  for (const auto& name : info.class_names) header += std::to_string(name.size()) + ":" + name + "\n";

  util::Sha256 sha;
  sha.update(header);
  const int64_t chunk_rows =
      info.chunk_shape.empty()
          ? dataset_chunk_shape(info.count, info.height, info.width, info.channels, "none")[0]
          : std::clamp<int64_t>(info.chunk_shape[0], 1, info.count);
  const int64_t rows = std::min(chunk_rows, info.count);
  torch::Tensor labels = info.has_labels ? read_labels(path) : torch::Tensor();
  for (int64_t first : {int64_t{0}, info.count - rows}) {
    auto images = read_images(path, first, rows).contiguous();
    sha.update(images.data_ptr<uint8_t>(), static_cast<size_t>(images.numel()));
    if (labels.defined()) {
      auto part = labels.narrow(0, first, rows).contiguous();
      sha.update(part.data_ptr<int64_t>(), static_cast<size_t>(part.numel()) * sizeof(int64_t));
    }
  }
  identity.digest = sha.hex_digest();
  return identity;
}

}  // namespace diffuse::data
