// data/prep.h: `diffuse prep`: converts images into the dataset format (data/README.md).
//
//   PrepOptions options;
//   options.input = "train-images-idx3-ubyte.gz";   // labels found beside it
//   options.output = "mnist32.h5";
//   options.size = 32;
//   PrepReport report = prep_dataset(options);
//
// Inputs (`format` "auto" recognises each):
// - a folder of PNG/JPEG/BMP images, searched recursively in sorted path order (hidden files
//   and folders skipped), following symbolic links to folders and files; dangling links, link
//   loops, a folder reached twice through links and unreadable folders are left out and listed
//   in PrepReport::skipped_entries; with labels_from_folders, the label is the index of the
//   image's top-level sub-folder among the sorted sub-folder names (as torchvision's ImageFolder);
// - MNIST / Fashion-MNIST idx image files, gzipped or not, with labels from `labels` or the
//   sibling "...-labels-idx1-ubyte[.gz]" when it exists;
// - CIFAR-10 binary batches: one data_batch_N.bin / test_batch.bin file, or a folder holding
//   data_batch_1..5.bin (the training set, in order);
// - a built-in synthetic dataset (`synthetic` = "shapes", `count` images).
// The output is written as OUTPUT.incomplete-PID beside it, synced, and renamed at the end, so an
// interrupted run never leaves a file that looks complete. SIGINT, SIGTERM and SIGHUP remove
// that file before the process ends; the next prep to the same output removes those of
// processes that are gone (killed with SIGKILL, crashed). An existing output is replaced only
// with `overwrite`, and never when it is not a regular file (a device node, FIFO, ...).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace diffuse::data {

/// Progress of a prep run, reported after each block of images.
struct PrepProgress {
  int64_t done = 0;   ///< inputs processed (written or skipped)
  int64_t total = 0;  ///< inputs in all
};

/// What `diffuse prep` converts and how; each field is one command-line option.
struct PrepOptions {
  std::filesystem::path input;               ///< image folder, idx file, CIFAR file or folder; empty for synthetic
  std::filesystem::path output;              ///< the .h5 file to write
  std::string format = "auto";               ///< auto | folder | idx | cifar10
  std::optional<std::filesystem::path> labels;  ///< idx labels file (default: the sibling, when present)
  std::optional<int64_t> size;               ///< centre-crop and resize to size x size
  std::optional<int64_t> channels;           ///< 1 or 3 (default: the source's; folders: 3 if any image has colour)
  bool labels_from_folders = false;
  bool skip_bad = false;                     ///< skip unreadable images (reported) instead of stopping
  bool overwrite = false;                    ///< replace an existing output
  std::string compression = "none";          ///< none | gzip | lzf
  int threads = 0;                           ///< decoding threads; 0: all hardware threads
  std::string synthetic;                     ///< a synthetic dataset name instead of `input`
  int64_t count = 0;                         ///< synthetic images to make
  uint64_t seed = 0;                         ///< synthetic dataset seed
  std::function<void(const PrepProgress&)> progress;  ///< called on the calling thread
};

/// An input image that could not be used, and why.
struct BadInput {
  std::filesystem::path path;
  std::string reason;
};

/// What a prep run wrote.
struct PrepReport {
  std::filesystem::path output;
  std::string source;  ///< the `source` attribute written
  int64_t written = 0;
  int64_t height = 0, width = 0, channels = 0;
  bool has_labels = false;
  std::vector<std::string> class_names;
  std::vector<BadInput> skipped_bad;  ///< with skip_bad: the inputs left out
  /// Folder entries not searched: dangling links, link loops, folders reached twice, unreadable
  /// folders (the caller reports them; data/ never prints).
  std::vector<BadInput> skipped_entries;
  /// OUTPUT.incomplete-PID files of dead processes that this run removed.
  std::vector<std::filesystem::path> removed_stale;
  double seconds = 0;
};

/// Runs the conversion; throws with the input path and reason on bad input (a folder with no
/// images, an idx file with a wrong magic number or a truncated body, a CIFAR file of the wrong
/// size, an unreadable image without skip_bad, an existing output without overwrite, ...).
PrepReport prep_dataset(const PrepOptions& options);

}  // namespace diffuse::data
