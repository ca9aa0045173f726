// HDF5 helpers shared by the dataset, tensor-file and loader code. Plain C++ (no LibTorch), so it
// compiles in seconds.
#include "data/impl/hdf5.h"

#include <stdexcept>

namespace diffuse::data::impl {
namespace {

std::recursive_mutex& hdf5_mutex() {
  static std::recursive_mutex mutex;
  return mutex;
}

// Collects each entry's description, outermost API call first.
herr_t collect_error(unsigned /*n*/, const H5E_error2_t* entry, void* data) {
  auto* texts = static_cast<std::vector<std::string>*>(data);
  texts->emplace_back(entry->desc ? entry->desc : "");
  return 0;
}

// The system reason inside a low-level driver message ("..., errno = 28, error message = 'No
// space left on device', ...") is what a user can act on; the rest is HDF5 internals.
std::string shorten(const std::string& description) {
  const std::string key = "error message = '";
  auto at = description.find(key);
  if (at == std::string::npos) return description;
  auto start = at + key.size();
  auto end = description.find('\'', start);
  std::string message = description.substr(start, end == std::string::npos ? std::string::npos : end - start);
  std::string head = description.substr(0, description.find(':'));
  auto errno_at = description.find("errno = ");
  std::string code;
  if (errno_at != std::string::npos) {
    auto digits_end = description.find_first_not_of("0123456789", errno_at + 8);
    code = " (errno " + description.substr(errno_at + 8, digits_end - errno_at - 8) + ")";
  }
  return head + ": " + message + code;
}

}  // namespace

void prepare_hdf5() {
  // HDF5 1.10 crashes at exit (H5_term_library) when a file's close failed earlier, e.g.
  // because the disk filled up while writing a checkpoint: the error we already reported would
  // end in a segfault. Without the atexit hook nothing is left to clean up at exit anyway:
  // every file is closed explicitly. Must run before the library initialises.
  static const bool done = [] {
    H5dont_atexit();
    return true;
  }();
  (void)done;
}

Hdf5Lock::Hdf5Lock() : lock_(hdf5_mutex()) {
  prepare_hdf5();
  // A thread-safe HDF5 build keeps the error-printing setting per thread: set it on each.
  thread_local bool quiet = false;
  if (!quiet) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    quiet = true;
  }
}

std::string take_error_text() {
  std::vector<std::string> texts;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error, &texts);
  H5Eclear2(H5E_DEFAULT);
  if (texts.empty()) return "HDF5 call failed (no reason on HDF5's error stack)";
  std::string outer = texts.front(), inner = shorten(texts.back());
  std::string text = texts.size() == 1 || outer == inner ? inner : outer + ": " + inner;
  for (const auto& entry : texts) {
    // HDF5 >= 1.10 locks files (flock): a writer holds an exclusive lock until it closes.
    if (entry.find("unable to lock file") != std::string::npos) return text + lock_hint();
  }
  return text;
}

std::string lock_hint() {
  return " (another process has this file open for writing: wait for it to finish or stop it; on a file system "
         "without working locks, set HDF5_USE_FILE_LOCKING=FALSE)";
}

void throw_error(const std::string& context) { throw std::runtime_error(context + ": " + take_error_text()); }

Handle& Handle::operator=(Handle&& other) noexcept {
  if (this != &other) {
    reset();
    id_ = other.id_;
    other.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  if (id_ >= 0) {
    // H5Idec_ref closes any kind of identifier when its count drops to zero.
    if (H5Idec_ref(id_) < 0) H5Eclear2(H5E_DEFAULT);
    id_ = H5I_INVALID_HID;
  }
}

Handle open_read_only(const std::filesystem::path& path, const std::string& where) {
  Handle access(H5Pcreate(H5P_FILE_ACCESS));
#if H5_VERSION_GE(1, 10, 7)
  check(H5Pset_file_locking(access.get(), /*use_file_locking=*/1, /*ignore_when_disabled=*/1), where);
#endif
  return Handle(check_id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, access.get()), "opening " + where));
}

Handle open_dataset_if_exists(hid_t file, const std::string& name) {
  if (H5Lexists(file, name.c_str(), H5P_DEFAULT) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    return Handle();
  }
  // H5Oopen + H5Iget_type rather than H5Oget_info*, whose signature changed in HDF5 1.12.
  Handle object(H5Oopen(file, name.c_str(), H5P_DEFAULT));
  if (!object.valid() || H5Iget_type(object.get()) != H5I_DATASET) {
    H5Eclear2(H5E_DEFAULT);
    return Handle();
  }
  return object;
}

std::string describe_type(hid_t type) {
  size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_INTEGER: {
      bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
      return std::string(is_signed ? "int" : "uint") + std::to_string(size * 8);
    }
    case H5T_FLOAT: return "float" + std::to_string(size * 8);
    case H5T_STRING: return "string";
    case H5T_COMPOUND: return "compound";
    case H5T_ENUM: return "enum";
    case H5T_ARRAY: return "array";
    case H5T_VLEN: return "vlen";
    case H5T_OPAQUE: return "opaque";
    case H5T_BITFIELD: return "bitfield";
    case H5T_REFERENCE: return "reference";
    default: return "unknown";
  }
}

std::optional<int64_t> read_int_attribute(hid_t object, const std::string& name, const std::string& where) {
  if (H5Aexists(object, name.c_str()) <= 0) return std::nullopt;
  Handle attribute(check_id(H5Aopen(object, name.c_str(), H5P_DEFAULT), where + ": opening attribute " + name));
  Handle type(check_id(H5Aget_type(attribute.get()), where + ": attribute " + name));
  Handle space(check_id(H5Aget_space(attribute.get()), where + ": attribute " + name));
  if (H5Tget_class(type.get()) != H5T_INTEGER || H5Sget_simple_extent_npoints(space.get()) != 1) {
    throw std::runtime_error(where + ": attribute '" + name + "' must be one integer, got " +
                             describe_type(type.get()) + " with " +
                             std::to_string(H5Sget_simple_extent_npoints(space.get())) + " value(s)");
  }
  int64_t value = 0;
  check(H5Aread(attribute.get(), H5T_NATIVE_INT64, &value), where + ": reading attribute " + name);
  return value;
}

namespace {

// Reads every string of a string-typed attribute, whatever its length kind.
std::vector<std::string> read_strings(hid_t attribute, hid_t type, hid_t space, const std::string& what) {
  hssize_t n = H5Sget_simple_extent_npoints(space);
  std::vector<std::string> out;
  if (n <= 0) return out;
  if (H5Tis_variable_str(type) > 0) {
    Handle memory_type(H5Tcopy(H5T_C_S1));
    H5Tset_size(memory_type.get(), H5T_VARIABLE);
    H5Tset_cset(memory_type.get(), H5Tget_cset(type));
    std::vector<char*> pointers(n, nullptr);
    check(H5Aread(attribute, memory_type.get(), pointers.data()), "reading " + what);
    for (char* p : pointers) out.emplace_back(p ? p : "");
#if H5_VERSION_GE(1, 12, 0)
    H5Treclaim(memory_type.get(), space, H5P_DEFAULT, pointers.data());
#else
    H5Dvlen_reclaim(memory_type.get(), space, H5P_DEFAULT, pointers.data());
#endif
  } else {
    size_t size = H5Tget_size(type);
    std::vector<char> buffer(size * n);
    Handle memory_type(H5Tcopy(type));
    check(H5Aread(attribute, memory_type.get(), buffer.data()), "reading " + what);
    for (hssize_t i = 0; i < n; ++i) {
      std::string s(buffer.data() + i * size, size);
      s.erase(s.find_last_not_of('\0') + 1);  // fixed-length strings are NUL-padded
      out.push_back(s);
    }
  }
  return out;
}

}  // namespace

std::optional<std::string> read_string_attribute(hid_t object, const std::string& name) {
  auto values = read_string_list_attribute(object, name);
  if (!values || values->size() != 1) return std::nullopt;
  return values->front();
}

std::optional<std::vector<std::string>> read_string_list_attribute(hid_t object, const std::string& name) {
  if (H5Aexists(object, name.c_str()) <= 0) return std::nullopt;
  Handle attribute(check_id(H5Aopen(object, name.c_str(), H5P_DEFAULT), "opening attribute " + name));
  Handle type(check_id(H5Aget_type(attribute.get()), "attribute " + name));
  if (H5Tget_class(type.get()) != H5T_STRING) return std::nullopt;
  Handle space(check_id(H5Aget_space(attribute.get()), "attribute " + name));
  return read_strings(attribute.get(), type.get(), space.get(), "attribute " + name);
}

void write_int_attribute(hid_t object, const std::string& name, int64_t value, const std::string& where) {
  Handle space(check_id(H5Screate(H5S_SCALAR), where));
  if (H5Aexists(object, name.c_str()) > 0) check(H5Adelete(object, name.c_str()), where + ": replacing " + name);
  Handle attribute(check_id(H5Acreate2(object, name.c_str(), H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                            where + ": creating attribute " + name));
  check(H5Awrite(attribute.get(), H5T_NATIVE_INT64, &value), where + ": writing attribute " + name);
}

namespace {

Handle utf8_string_type() {
  Handle type(H5Tcopy(H5T_C_S1));
  H5Tset_size(type.get(), H5T_VARIABLE);
  H5Tset_cset(type.get(), H5T_CSET_UTF8);
  return type;
}

void write_strings(hid_t object, const std::string& name, const std::vector<std::string>& values, bool scalar,
                   const std::string& where) {
  Handle type = utf8_string_type();
  hsize_t n = values.size();
  Handle space(check_id(scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr), where));
  if (H5Aexists(object, name.c_str()) > 0) check(H5Adelete(object, name.c_str()), where + ": replacing " + name);
  Handle attribute(check_id(H5Acreate2(object, name.c_str(), type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                            where + ": creating attribute " + name));
  std::vector<const char*> pointers;
  for (const auto& v : values) pointers.push_back(v.c_str());
  if (!pointers.empty()) {
    check(H5Awrite(attribute.get(), type.get(), pointers.data()), where + ": writing attribute " + name);
  }
}

}  // namespace

void write_string_attribute(hid_t object, const std::string& name, const std::string& value,
                            const std::string& where) {
  write_strings(object, name, {value}, /*scalar=*/true, where);
}

void write_string_list_attribute(hid_t object, const std::string& name, const std::vector<std::string>& values,
                                 const std::string& where) {
  write_strings(object, name, values, /*scalar=*/false, where);
}

std::string describe_filters(hid_t dcpl) {
  int n = H5Pget_nfilters(dcpl);
  if (n <= 0) return "none";
  std::string out;
  for (int i = 0; i < n; ++i) {
    unsigned flags = 0, config = 0;
    size_t n_values = 0;
    char name[256] = {0};
    H5Z_filter_t id = H5Pget_filter2(dcpl, static_cast<unsigned>(i), &flags, &n_values, nullptr, sizeof(name),
                                     name, &config);
    std::string label;
    if (id == H5Z_FILTER_DEFLATE) label = "gzip";
    else if (id == kLzfFilter) label = "lzf";
    else if (id == H5Z_FILTER_SHUFFLE) label = "shuffle";
    else if (id == H5Z_FILTER_FLETCHER32) label = "fletcher32";
    else if (id == H5Z_FILTER_SZIP) label = "szip";
    else label = name[0] ? std::string(name) : "filter " + std::to_string(id);
    out += (out.empty() ? "" : "+") + label;
  }
  return out;
}

std::vector<Run> coalesce_runs(const std::vector<int64_t>& sorted_indices) {
  std::vector<Run> runs;
  for (int64_t index : sorted_indices) {
    if (!runs.empty() && runs.back().first + runs.back().count == index) {
      ++runs.back().count;
    } else {
      runs.push_back({index, 1});
    }
  }
  return runs;
}

ImageRows::ImageRows(const std::filesystem::path& path, bool chunk_cache) : path_(path) {
  Hdf5Lock lock;
  const std::string where = "dataset file '" + path.string() + "'";
  file_ = open_read_only(path, where);
  Handle access(H5Pcreate(H5P_DATASET_ACCESS));
  if (!chunk_cache) check(H5Pset_chunk_cache(access.get(), 0, 0, 1.0), where);
  dataset_ = Handle(check_id(H5Dopen2(file_.get(), "images", access.get()), "opening 'images' in " + where));
  file_space_ = Handle(check_id(H5Dget_space(dataset_.get()), where));
  if (H5Sget_simple_extent_ndims(file_space_.get()) != 4) {
    throw std::runtime_error(where + ": 'images' must have 4 dimensions [N, H, W, C]");
  }
  H5Sget_simple_extent_dims(file_space_.get(), dims_, nullptr);
  rows_ = static_cast<int64_t>(dims_[0]);
  row_bytes_ = static_cast<int64_t>(dims_[1] * dims_[2] * dims_[3]);
}

ImageRows::~ImageRows() {
  Hdf5Lock lock;
  file_space_.reset();
  dataset_.reset();
  file_.reset();
}

void ImageRows::read_union(const std::vector<Run>& runs, uint8_t* out) {
  // One H5Dread per run of consecutive images. A single read of the union of the runs would be
  // one call, but HDF5 1.10 maps a multi-block selection to chunks element by element (or by
  // scanning every chunk in its bounding box): 50-100x slower than these plain reads.
  for (const Run& run : runs) {
    if (run.first < 0 || run.count <= 0 || run.first + run.count > rows_) {
      throw std::runtime_error("image index " + std::to_string(run.first) + " is outside the " +
                               std::to_string(rows_) + " images of '" + path_.string() + "'");
    }
    hsize_t start[4] = {static_cast<hsize_t>(run.first), 0, 0, 0};
    hsize_t count[4] = {static_cast<hsize_t>(run.count), dims_[1], dims_[2], dims_[3]};
    check(H5Sselect_hyperslab(file_space_.get(), H5S_SELECT_SET, start, nullptr, count, nullptr),
          "selecting images in '" + path_.string() + "'");
    Handle memory_space(H5Screate_simple(4, count, nullptr));
    if (H5Dread(dataset_.get(), H5T_NATIVE_UINT8, memory_space.get(), file_space_.get(), H5P_DEFAULT, out) < 0) {
      throw std::runtime_error(take_error_text());
    }
    out += run.count * row_bytes_;
  }
}

void ImageRows::read(const std::vector<Run>& runs, uint8_t* out) {
  Hdf5Lock lock;
  try {
    read_union(runs, out);
    return;
  } catch (const std::exception& batch_error) {
    // Name the image that fails: read the batch again image by image.
    uint8_t* cursor = out;
    for (const Run& run : runs) {
      for (int64_t i = run.first; i < run.first + run.count; ++i, cursor += row_bytes_) {
        try {
          read_union({{i, 1}}, cursor);
        } catch (const std::exception& error) {
          throw std::runtime_error("cannot read image " + std::to_string(i) + " of '" + path_.string() +
                                   "': " + error.what());
        }
      }
    }
    throw std::runtime_error("cannot read images [" + std::to_string(runs.front().first) + ", ...] of '" +
                             path_.string() + "': " + batch_error.what());
  }
}

}  // namespace diffuse::data::impl
