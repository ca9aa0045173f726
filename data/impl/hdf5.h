// data/impl/hdf5.h: the HDF5 machinery under diffuse_data's readers and writers: one process-wide
// lock, owning handles, errors that carry HDF5's own reason, and the image-row reader the loader
// and read_images share. Not part of the public API; compiled without LibTorch.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace diffuse::data::impl {

/// Switches off HDF5's atexit cleanup (once; before the library initialises): HDF5 1.10
/// segfaults at exit on a file whose close failed (disk full). Hdf5Lock calls it.
void prepare_hdf5();

/// Serialises every HDF5 call in the process. Debian's HDF5 is not built thread-safe, and the
/// trainer writes checkpoints on its main thread while loaders read on their I/O threads.
/// Recursive, so a locked helper may call another. The first lock also switches off HDF5's
/// automatic error printing: a library does not print, our exceptions carry HDF5's reason.
class Hdf5Lock {
 public:
  Hdf5Lock();

 private:
  std::unique_lock<std::recursive_mutex> lock_;
};

/// HDF5's reason for the last failure, from its error stack ("file write failed: No space left
/// on device (errno 28)"), then clears the stack. A failure to lock the file gets lock_hint()
/// appended. Call with the lock held.
std::string take_error_text();

/// What to do about "unable to lock file": the file is open for writing in another process
/// (or the file system has no locks: HDF5_USE_FILE_LOCKING=FALSE).
std::string lock_hint();

/// Throws std::runtime_error("<context>: <HDF5's reason>"). Call with the lock held.
[[noreturn]] void throw_error(const std::string& context);

/// Returns `id`, or throws with `context` when it is negative.
inline hid_t check_id(hid_t id, const std::string& context) {
  if (id < 0) throw_error(context);
  return id;
}
/// Throws with `context` when an HDF5 status is negative.
inline void check(herr_t status, const std::string& context) {
  if (status < 0) throw_error(context);
}

/// Owns one HDF5 identifier (file, dataset, dataspace, type, attribute, property list) and
/// releases it when destroyed. Destroy only with the lock held.
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  Handle(Handle&& other) noexcept : id_(other.id_) { other.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& other) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  /// Releases the identifier, ignoring errors (destructor path).
  void reset();
  /// Gives up ownership without closing (for a checked close by the caller).
  hid_t release() {
    hid_t id = id_;
    id_ = H5I_INVALID_HID;
    return id;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
};

/// Opens a file read-only; throws with `where` and HDF5's reason. Where the file system does not
/// support locks (some parallel and network file systems), HDF5 >= 1.10.7 is told to go on
/// without them rather than fail: readers never conflict with each other.
Handle open_read_only(const std::filesystem::path& path, const std::string& where);

/// Opens `name` in `file` as a dataset, or returns an invalid handle when no such link exists.
Handle open_dataset_if_exists(hid_t file, const std::string& name);

/// A short name for an HDF5 datatype: "uint8", "int64", "float32", "string", "compound", ...
std::string describe_type(hid_t type);

/// Reads an integer attribute of `object` (any stored integer type); nothing when absent.
std::optional<int64_t> read_int_attribute(hid_t object, const std::string& name, const std::string& where);
/// Reads a string attribute (variable or fixed length); nothing when absent or not a string.
std::optional<std::string> read_string_attribute(hid_t object, const std::string& name);
/// Reads a 1-D array of strings attribute (variable or fixed length); nothing when absent.
std::optional<std::vector<std::string>> read_string_list_attribute(hid_t object, const std::string& name);
/// Writes a scalar int64 attribute.
void write_int_attribute(hid_t object, const std::string& name, int64_t value, const std::string& where);
/// Writes a scalar variable-length UTF-8 string attribute (what h5py writes for a Python str).
void write_string_attribute(hid_t object, const std::string& name, const std::string& value,
                            const std::string& where);
/// Writes a 1-D array of variable-length UTF-8 strings.
void write_string_list_attribute(hid_t object, const std::string& name, const std::vector<std::string>& values,
                                 const std::string& where);

/// HDF5's registered id of the LZF filter (h5py's, also packaged as an HDF5 plugin).
inline constexpr H5Z_filter_t kLzfFilter = 32000;

/// The filter pipeline of a dataset creation property list as a name: "none", "gzip", "lzf",
/// "gzip+shuffle", ...
std::string describe_filters(hid_t dcpl);

/// A run of consecutive images [first, first + count).
struct Run {
  int64_t first = 0;
  int64_t count = 0;
};

/// Splits ascending indices into runs of consecutive values; each run becomes one hyperslab.
std::vector<Run> coalesce_runs(const std::vector<int64_t>& sorted_indices);

/// The `images` dataset of one file, open for reading rows. Every method takes the lock itself,
/// so a loader's I/O thread and the trainer's checkpoint writer can share the process.
class ImageRows {
 public:
  /// Opens `path` read-only. `chunk_cache` off bypasses HDF5's chunk cache: for uncompressed
  /// random access it would read a whole chunk to deliver one image.
  ImageRows(const std::filesystem::path& path, bool chunk_cache);
  ~ImageRows();
  ImageRows(const ImageRows&) = delete;
  ImageRows& operator=(const ImageRows&) = delete;

  /// Bytes of one image (H * W * C).
  int64_t row_bytes() const { return row_bytes_; }
  int64_t rows() const { return rows_; }
  /// Reads the runs (ascending, disjoint) with one H5Dread into `out`, images in run order.
  /// Throws naming the file and the first failing index.
  void read(const std::vector<Run>& runs, uint8_t* out);

 private:
  void read_union(const std::vector<Run>& runs, uint8_t* out);
  std::filesystem::path path_;
  Handle file_, dataset_, file_space_;
  int64_t rows_ = 0, row_bytes_ = 0;
  hsize_t dims_[4] = {0, 0, 0, 0};
};

}  // namespace diffuse::data::impl
