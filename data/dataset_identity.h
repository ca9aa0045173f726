// data/dataset_identity.h: what a dataset file is, in a few bytes, cheap enough to compute at
// every start (it reads the attributes and two chunks): for checking that every rank of a job
// reads the same data when each node has its own copy.
//
//   auto mine = diffuse::data::dataset_identity(config.data.path);
//   // the trainer compares mine.digest with rank 0's and, when any rank differs, stops naming
//   // each side's mine.summary().
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace diffuse::data {

/// The identity of a dataset file (data/README.md's format).
struct DatasetIdentity {
  int64_t count = 0, height = 0, width = 0, channels = 0;
  std::string dtype = "uint8";  ///< of `images` (the format allows only uint8)
  bool has_labels = false;
  /// SHA-256 (hex) of the shape, the root attributes (format_version, count, height, width,
  /// channels, source, class_names), the chunk shape and compression, and the pixels and labels
  /// of the first and the last chunk of images. Two copies of one file have the same digest;
  /// files that differ only in images strictly between the first and last chunk do too.
  std::string digest;

  /// "60000 images 28x28x1 uint8, labels, sha256 0123456789ab" (the digest's first 12 digits).
  std::string summary() const;
  bool operator==(const DatasetIdentity& other) const = default;
};

/// Validates the file (read_dataset_info) and computes its identity. Throws naming the file.
DatasetIdentity dataset_identity(const std::filesystem::path& path);

}  // namespace diffuse::data
