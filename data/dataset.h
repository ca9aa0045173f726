// data/dataset.h: the on-disk image dataset (one HDF5 file; format in data/README.md): validate
// and describe it, read images and labels, and write it, in one go or streamed.
//
//   auto info = diffuse::data::read_dataset_info("mnist.h5");         // throws naming the problem
//   torch::Tensor first = diffuse::data::read_images("mnist.h5", 0, 16);  // [16, 28, 28, 1] uint8
//
// Every function here is safe to call from any thread: HDF5 calls are serialised process-wide.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace diffuse::data {

/// The dataset format version this build writes and reads.
inline constexpr int64_t kDatasetFormatVersion = 1;

/// What a dataset file holds, read from its `images` dataset and root attributes.
struct DatasetInfo {
  std::filesystem::path path;
  int64_t count = 0, height = 0, width = 0, channels = 0;
  bool has_labels = false;
  std::string source;                    ///< where prep made it from (free text)
  int64_t format_version = 0;
  std::vector<int64_t> chunk_shape;      ///< of `images`; empty when not chunked
  std::string compression;               ///< "none", "gzip", "lzf", ...
  std::vector<std::string> class_names;  ///< label value -> name, when the file names its classes
};

/// Opens and validates a dataset file; throws naming the file and the problem (missing file, not
/// HDF5, no `images`, wrong dtype or rank, channels not 1 or 3, attributes missing or not
/// matching the shape, labels of the wrong type or length).
DatasetInfo read_dataset_info(const std::filesystem::path& path);

/// Reads images [first, first + count) as [count, H, W, C] uint8.
torch::Tensor read_images(const std::filesystem::path& path, int64_t first, int64_t count);

/// Reads all labels as [N] int64; throws when the file has none.
torch::Tensor read_labels(const std::filesystem::path& path);

/// How a dataset file is written.
struct DatasetWriteOptions {
  std::string source;                    ///< free text stored as the `source` attribute
  std::string compression = "none";      ///< "none", "gzip" or "lzf"
  int gzip_level = 4;                    ///< 1..9
  std::vector<std::string> class_names;  ///< stored as `class_names` when non-empty
};

/// Whether this process's HDF5 can write `compression` ("none", "gzip", "lzf"). LZF is h5py's
/// filter: plain HDF5 has it only through a plugin (Debian: hdf5-plugin-lzf).
bool compression_available(const std::string& compression);

/// Throws unless `compression` is a known name this HDF5 can write, saying what to do instead.
void require_compression(const std::string& compression);

/// The chunk shape the writer uses: whole images, about 64 KiB per chunk uncompressed so
/// sequential reads are large; one image per chunk when compressed so a random read decodes
/// only the image it needs.
std::vector<int64_t> dataset_chunk_shape(int64_t count, int64_t height, int64_t width, int64_t channels,
                                         const std::string& compression);

/// Streams a dataset to a file in order. The file is complete only after finish(); a writer
/// destroyed before that leaves an incomplete file the caller should delete.
///
///   DatasetWriter writer(path, n, 32, 32, 3, /*with_labels=*/true, {.source = "shapes"});
///   writer.append(images, labels);   // [k, 32, 32, 3] uint8, [k] int64; repeat
///   writer.finish();
class DatasetWriter {
 public:
  /// Creates (truncates) `path` with room for up to `capacity` images.
  DatasetWriter(const std::filesystem::path& path, int64_t capacity, int64_t height, int64_t width,
                int64_t channels, bool with_labels, const DatasetWriteOptions& options = {});
  ~DatasetWriter();
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  /// Appends images [k, H, W, C] uint8 and, when the writer has labels, labels [k] (integer).
  void append(const torch::Tensor& images, const torch::Tensor& labels = {});
  /// Shrinks the file to the images appended (fewer than capacity when inputs were skipped),
  /// writes the attributes, flushes and closes. Throws on any HDF5 error.
  void finish();
  int64_t written() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes a whole dataset: images [N, H, W, C] uint8, labels [N] integer or undefined.
void write_dataset(const std::filesystem::path& path, const torch::Tensor& images, const torch::Tensor& labels,
                   const DatasetWriteOptions& options = {});

}  // namespace diffuse::data
