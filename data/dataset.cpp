// The dataset file: validation on open, reads, and the streamed writer `diffuse prep` uses.
#include "data/dataset.h"

#include <algorithm>
#include <stdexcept>

#include "data/impl/hdf5.h"
#include "util/durable_file.h"

namespace diffuse::data {
namespace fs = std::filesystem;
using impl::check;
using impl::check_id;
using impl::Handle;

namespace {

// std::string(1, '\'') rather than "'" + ...: GCC 12 warns falsely (-Wstringop-overflow) on the latter.
std::string quoted(const fs::path& path) { return std::string(1, '\'') + path.string() + "'"; }

std::string shape_text(const std::vector<hsize_t>& dims) {
  std::string out = "[";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + "]";
}

void check_compression_name(const std::string& compression) {
  if (compression != "none" && compression != "gzip" && compression != "lzf") {
    throw std::invalid_argument("--compression must be none, gzip or lzf, got '" + compression + "'");
  }
}

}  // namespace

DatasetInfo read_dataset_info(const fs::path& path) {
  const std::string where = "dataset file " + quoted(path);
  std::error_code error;
  if (!fs::exists(path, error)) throw std::runtime_error(where + " does not exist");
  if (fs::is_directory(path, error)) throw std::runtime_error(where + " is a directory, not an HDF5 file");

  impl::Hdf5Lock lock;
  htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 < 0) impl::throw_error("cannot read " + where);
  if (is_hdf5 == 0) {
    throw std::runtime_error(where + " is not an HDF5 file (make a dataset with `diffuse prep`)");
  }
  Handle file = impl::open_read_only(path, where);
  Handle root(check_id(H5Gopen2(file.get(), "/", H5P_DEFAULT), "opening the root group of " + where));
  Handle images = impl::open_dataset_if_exists(file.get(), "images");
  if (!images.valid()) {
    throw std::runtime_error(where + " has no dataset 'images': not a diffuse image dataset "
                             "(make one with `diffuse prep`)");
  }
  Handle type(check_id(H5Dget_type(images.get()), where));
  if (H5Tget_class(type.get()) != H5T_INTEGER || H5Tget_size(type.get()) != 1 ||
      H5Tget_sign(type.get()) != H5T_SGN_NONE) {
    throw std::runtime_error(where + ": 'images' has dtype " + impl::describe_type(type.get()) +
                             ", expected uint8");
  }
  Handle space(check_id(H5Dget_space(images.get()), where));
  int rank = H5Sget_simple_extent_ndims(space.get());
  std::vector<hsize_t> dims(std::max(rank, 0));
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  if (rank != 4) {
    throw std::runtime_error(where + ": 'images' has shape " + shape_text(dims) +
                             ", expected 4 dimensions [N, H, W, C]");
  }
  DatasetInfo info;
  info.path = path;
  info.count = static_cast<int64_t>(dims[0]);
  info.height = static_cast<int64_t>(dims[1]);
  info.width = static_cast<int64_t>(dims[2]);
  info.channels = static_cast<int64_t>(dims[3]);
  if (info.channels != 1 && info.channels != 3) {
    throw std::runtime_error(where + ": 'images' has shape " + shape_text(dims) +
                             ": channels (last dimension) must be 1 or 3");
  }
  if (info.count == 0 || info.height == 0 || info.width == 0) {
    throw std::runtime_error(where + ": 'images' has shape " + shape_text(dims) + ": it holds no pixels");
  }

  auto version = impl::read_int_attribute(root.get(), "format_version", where);
  if (!version) throw std::runtime_error(where + ": root attribute 'format_version' is missing");
  if (*version < 1 || *version > kDatasetFormatVersion) {
    throw std::runtime_error(where + ": format_version " + std::to_string(*version) + " is not supported (this "
                             "build reads version " + std::to_string(kDatasetFormatVersion) + ")");
  }
  info.format_version = *version;
  const std::pair<const char*, int64_t> expected[] = {
      {"count", info.count}, {"height", info.height}, {"width", info.width}, {"channels", info.channels}};
  for (const auto& [name, value] : expected) {
    auto stored = impl::read_int_attribute(root.get(), name, where);
    if (!stored) throw std::runtime_error(where + ": root attribute '" + name + "' is missing");
    if (*stored != value) {
      throw std::runtime_error(where + ": attribute " + name + " = " + std::to_string(*stored) +
                               " does not match 'images' of shape " + shape_text(dims));
    }
  }
  info.source = impl::read_string_attribute(root.get(), "source").value_or("");
  info.class_names = impl::read_string_list_attribute(root.get(), "class_names").value_or(std::vector<std::string>{});

  Handle create(check_id(H5Dget_create_plist(images.get()), where));
  if (H5Pget_layout(create.get()) == H5D_CHUNKED) {
    hsize_t chunk[4] = {0, 0, 0, 0};
    H5Pget_chunk(create.get(), 4, chunk);
    info.chunk_shape.assign(chunk, chunk + 4);
  }
  info.compression = impl::describe_filters(create.get());

  Handle labels = impl::open_dataset_if_exists(file.get(), "labels");
  if (labels.valid()) {
    Handle label_type(check_id(H5Dget_type(labels.get()), where));
    Handle label_space(check_id(H5Dget_space(labels.get()), where));
    int label_rank = H5Sget_simple_extent_ndims(label_space.get());
    std::vector<hsize_t> label_dims(std::max(label_rank, 0));
    H5Sget_simple_extent_dims(label_space.get(), label_dims.data(), nullptr);
    if (H5Tget_class(label_type.get()) != H5T_INTEGER) {
      throw std::runtime_error(where + ": 'labels' has dtype " + impl::describe_type(label_type.get()) +
                               ", expected int64");
    }
    if (label_rank != 1 || static_cast<int64_t>(label_dims[0]) != info.count) {
      throw std::runtime_error(where + ": 'labels' has shape " + shape_text(label_dims) + ", expected [" +
                               std::to_string(info.count) + "] (one per image)");
    }
    info.has_labels = true;
  }
  return info;
}

torch::Tensor read_images(const fs::path& path, int64_t first, int64_t count) {
  DatasetInfo info = read_dataset_info(path);
  if (first < 0 || count < 0 || first + count > info.count) {
    throw std::out_of_range("read_images: images [" + std::to_string(first) + ", " + std::to_string(first + count) +
                            ") are outside the " + std::to_string(info.count) + " images of " + quoted(path));
  }
  auto out = torch::empty({count, info.height, info.width, info.channels}, torch::kUInt8);
  if (count == 0) return out;
  impl::ImageRows rows(path, /*chunk_cache=*/true);
  rows.read({{first, count}}, out.data_ptr<uint8_t>());
  return out;
}

torch::Tensor read_labels(const fs::path& path) {
  DatasetInfo info = read_dataset_info(path);
  if (!info.has_labels) throw std::runtime_error("dataset file " + quoted(path) + " has no labels");
  auto out = torch::empty({info.count}, torch::kInt64);
  impl::Hdf5Lock lock;
  Handle file = impl::open_read_only(path, "dataset file " + quoted(path));
  Handle labels(check_id(H5Dopen2(file.get(), "labels", H5P_DEFAULT), "opening 'labels' in " + quoted(path)));
  check(H5Dread(labels.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data_ptr<int64_t>()),
        "reading 'labels' of " + quoted(path));
  return out;
}

bool compression_available(const std::string& compression) {
  if (compression == "none") return true;
  impl::Hdf5Lock lock;
  if (compression == "gzip") {
    htri_t available = H5Zfilter_avail(H5Z_FILTER_DEFLATE);
    H5Eclear2(H5E_DEFAULT);
    return available > 0;
  }
  if (compression != "lzf") return false;
  // HDF5 1.10's H5Zfilter_avail does not look for plugins; creating a dataset with the filter
  // does. Try it in a file that lives only in memory.
  Handle access(H5Pcreate(H5P_FILE_ACCESS));
  H5Pset_fapl_core(access.get(), 1 << 16, /*backing_store=*/0);
  Handle file(H5Fcreate("diffuse-lzf-probe", H5F_ACC_TRUNC, H5P_DEFAULT, access.get()));
  hsize_t n = 16;
  Handle create(H5Pcreate(H5P_DATASET_CREATE));
  H5Pset_chunk(create.get(), 1, &n);
  H5Pset_filter(create.get(), impl::kLzfFilter, H5Z_FLAG_MANDATORY, 0, nullptr);
  Handle space(H5Screate_simple(1, &n, nullptr));
  Handle dataset(file.valid() ? H5Dcreate2(file.get(), "probe", H5T_STD_U8LE, space.get(), H5P_DEFAULT, create.get(),
                                           H5P_DEFAULT)
                              : H5I_INVALID_HID);
  H5Eclear2(H5E_DEFAULT);
  return dataset.valid();
}

void require_compression(const std::string& compression) {
  check_compression_name(compression);
  if (compression_available(compression)) return;
  if (compression == "lzf") {
    throw std::runtime_error(
        "compression 'lzf' is not available in this HDF5 library: LZF is h5py's filter, which plain HDF5 loads "
        "as a plugin (HDF5_PLUGIN_PATH, or Debian's hdf5-plugin-lzf, whose filter on Debian 12 also needs "
        "LD_PRELOAD=liblzf.so.1 from liblzf1); or use gzip");
  }
  throw std::runtime_error("compression '" + compression + "' is not available in this HDF5 library");
}

std::vector<int64_t> dataset_chunk_shape(int64_t count, int64_t height, int64_t width, int64_t channels,
                                         const std::string& compression) {
  const int64_t image_bytes = height * width * channels;
  int64_t rows = compression == "none" ? std::clamp<int64_t>((64 << 10) / image_bytes, 1, std::max<int64_t>(count, 1))
                                       : 1;
  return {rows, height, width, channels};
}

struct DatasetWriter::Impl {
  fs::path path;
  int64_t capacity = 0, height = 0, width = 0, channels = 0, written = 0;
  bool with_labels = false, finished = false;
  DatasetWriteOptions options;
  Handle file, images, labels;

  std::string where() const { return "writing dataset " + quoted(path); }
};

DatasetWriter::DatasetWriter(const fs::path& path, int64_t capacity, int64_t height, int64_t width,
                             int64_t channels, bool with_labels, const DatasetWriteOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.path = path;
  d.capacity = capacity;
  d.height = height;
  d.width = width;
  d.channels = channels;
  d.with_labels = with_labels;
  d.options = options;
  if (capacity <= 0 || height <= 0 || width <= 0) {
    throw std::invalid_argument(d.where() + ": needs at least one image of at least 1x1 pixel, got " +
                                std::to_string(capacity) + " images of " + std::to_string(height) + "x" +
                                std::to_string(width));
  }
  if (channels != 1 && channels != 3) {
    throw std::invalid_argument(d.where() + ": channels must be 1 or 3, got " + std::to_string(channels));
  }
  require_compression(options.compression);
  if (options.gzip_level < 1 || options.gzip_level > 9) {
    throw std::invalid_argument(d.where() + ": gzip level must be 1..9, got " + std::to_string(options.gzip_level));
  }

  impl::Hdf5Lock lock;
  // HDF5 1.10 file format: fixed-size chunked datasets get a fixed-array chunk index, one
  // lookup per image instead of a B-tree walk. h5py reads it with any HDF5 >= 1.10.
  Handle access(H5Pcreate(H5P_FILE_ACCESS));
  check(H5Pset_libver_bounds(access.get(), H5F_LIBVER_V110, H5F_LIBVER_LATEST), d.where());
  d.file = Handle(check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, access.get()), d.where()));

  auto chunk = dataset_chunk_shape(capacity, height, width, channels, options.compression);
  hsize_t dims[4] = {static_cast<hsize_t>(capacity), static_cast<hsize_t>(height), static_cast<hsize_t>(width),
                     static_cast<hsize_t>(channels)};
  hsize_t chunk_dims[4];
  std::copy(chunk.begin(), chunk.end(), chunk_dims);
  Handle create(H5Pcreate(H5P_DATASET_CREATE));
  check(H5Pset_chunk(create.get(), 4, chunk_dims), d.where());
  check(H5Pset_fill_time(create.get(), H5D_FILL_TIME_NEVER), d.where());
  if (options.compression == "gzip") check(H5Pset_deflate(create.get(), options.gzip_level), d.where());
  if (options.compression == "lzf") {
    // Optional, as h5py sets it: LZF gives up on a chunk it cannot shrink, which is then stored
    // raw. As a mandatory filter, HDF5 1.10 drops such chunks at flush time without an error.
    check(H5Pset_filter(create.get(), impl::kLzfFilter, H5Z_FLAG_OPTIONAL, 0, nullptr), d.where());
  }
  Handle space(check_id(H5Screate_simple(4, dims, dims), d.where()));
  d.images = Handle(check_id(H5Dcreate2(d.file.get(), "images", H5T_STD_U8LE, space.get(), H5P_DEFAULT,
                                        create.get(), H5P_DEFAULT),
                             d.where() + ": creating 'images'"));
  if (with_labels) {
    hsize_t n = static_cast<hsize_t>(capacity);
    hsize_t label_chunk = std::min<hsize_t>(n, 1 << 16);
    Handle label_create(H5Pcreate(H5P_DATASET_CREATE));
    check(H5Pset_chunk(label_create.get(), 1, &label_chunk), d.where());
    Handle label_space(check_id(H5Screate_simple(1, &n, &n), d.where()));
    d.labels = Handle(check_id(H5Dcreate2(d.file.get(), "labels", H5T_STD_I64LE, label_space.get(), H5P_DEFAULT,
                                          label_create.get(), H5P_DEFAULT),
                               d.where() + ": creating 'labels'"));
  }
}

DatasetWriter::~DatasetWriter() {
  impl::Hdf5Lock lock;
  impl_->labels.reset();
  impl_->images.reset();
  impl_->file.reset();
}

int64_t DatasetWriter::written() const { return impl_->written; }

void DatasetWriter::append(const torch::Tensor& images, const torch::Tensor& labels) {
  Impl& d = *impl_;
  if (d.finished) throw std::logic_error(d.where() + ": append after finish");
  if (images.dtype() != torch::kUInt8 || images.dim() != 4 || images.size(1) != d.height ||
      images.size(2) != d.width || images.size(3) != d.channels) {
    throw std::invalid_argument(d.where() + ": images must be uint8 [k, " + std::to_string(d.height) + ", " +
                                std::to_string(d.width) + ", " + std::to_string(d.channels) + "], got " +
                                std::string(c10::toString(images.scalar_type())) + " " +
                                c10::str(images.sizes()));
  }
  const int64_t k = images.size(0);
  if (d.written + k > d.capacity) {
    throw std::invalid_argument(d.where() + ": appending " + std::to_string(k) + " images exceeds the capacity of " +
                                std::to_string(d.capacity));
  }
  torch::Tensor label_values;
  if (d.with_labels) {
    if (!labels.defined() || labels.dim() != 1 || labels.size(0) != k || labels.is_floating_point()) {
      throw std::invalid_argument(d.where() + ": labels must be an integer tensor [" + std::to_string(k) + "]");
    }
    label_values = labels.to(torch::kCPU, torch::kInt64).contiguous();
  } else if (labels.defined()) {
    throw std::invalid_argument(d.where() + ": labels given to a writer made without labels");
  }
  if (k == 0) return;
  auto pixels = images.cpu().contiguous();

  impl::Hdf5Lock lock;
  Handle file_space(check_id(H5Dget_space(d.images.get()), d.where()));
  hsize_t start[4] = {static_cast<hsize_t>(d.written), 0, 0, 0};
  hsize_t count[4] = {static_cast<hsize_t>(k), static_cast<hsize_t>(d.height), static_cast<hsize_t>(d.width),
                      static_cast<hsize_t>(d.channels)};
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr), d.where());
  Handle memory_space(H5Screate_simple(4, count, nullptr));
  check(H5Dwrite(d.images.get(), H5T_NATIVE_UINT8, memory_space.get(), file_space.get(), H5P_DEFAULT,
                 pixels.data_ptr<uint8_t>()),
        d.where() + ": writing images " + std::to_string(d.written) + ".." + std::to_string(d.written + k - 1));
  if (d.with_labels) {
    Handle label_space(check_id(H5Dget_space(d.labels.get()), d.where()));
    hsize_t label_start = start[0], label_count = count[0];
    check(H5Sselect_hyperslab(label_space.get(), H5S_SELECT_SET, &label_start, nullptr, &label_count, nullptr),
          d.where());
    Handle label_memory(H5Screate_simple(1, &label_count, nullptr));
    check(H5Dwrite(d.labels.get(), H5T_NATIVE_INT64, label_memory.get(), label_space.get(), H5P_DEFAULT,
                   label_values.data_ptr<int64_t>()),
          d.where() + ": writing labels");
  }
  d.written += k;
}

void DatasetWriter::finish() {
  Impl& d = *impl_;
  if (d.finished) return;
  if (d.written == 0) throw std::runtime_error(d.where() + ": no images were written");
  {
    impl::Hdf5Lock lock;
    if (d.written < d.capacity) {
      hsize_t dims[4] = {static_cast<hsize_t>(d.written), static_cast<hsize_t>(d.height),
                         static_cast<hsize_t>(d.width), static_cast<hsize_t>(d.channels)};
      check(H5Dset_extent(d.images.get(), dims), d.where() + ": shrinking 'images'");
      if (d.with_labels) check(H5Dset_extent(d.labels.get(), dims), d.where() + ": shrinking 'labels'");
    }
    Handle root(check_id(H5Gopen2(d.file.get(), "/", H5P_DEFAULT), d.where()));
    impl::write_int_attribute(root.get(), "format_version", kDatasetFormatVersion, d.where());
    impl::write_int_attribute(root.get(), "count", d.written, d.where());
    impl::write_int_attribute(root.get(), "height", d.height, d.where());
    impl::write_int_attribute(root.get(), "width", d.width, d.where());
    impl::write_int_attribute(root.get(), "channels", d.channels, d.where());
    impl::write_string_attribute(root.get(), "source", d.options.source, d.where());
    if (!d.options.class_names.empty()) {
      impl::write_string_list_attribute(root.get(), "class_names", d.options.class_names, d.where());
    }
    root.reset();
    d.labels.reset();
    d.images.reset();
    check(H5Fflush(d.file.get(), H5F_SCOPE_GLOBAL), d.where() + ": flushing");
    if (H5Fclose(d.file.release()) < 0) impl::throw_error(d.where() + ": closing");
  }
  util::fsync_path(d.path);
  d.finished = true;
}

void write_dataset(const fs::path& path, const torch::Tensor& images, const torch::Tensor& labels,
                   const DatasetWriteOptions& options) {
  if (images.dim() != 4) {
    throw std::invalid_argument("write_dataset " + quoted(path) + ": images must be [N, H, W, C], got " +
                                c10::str(images.sizes()));
  }
  DatasetWriter writer(path, images.size(0), images.size(1), images.size(2), images.size(3), labels.defined(),
                       options);
  writer.append(images, labels);
  writer.finish();
}

}  // namespace diffuse::data
