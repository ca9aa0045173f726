// Named-tensor HDF5 files: the type mapping h5py understands, creation order kept, errors that
// name the tensor.
#include "data/hdf5_tensors.h"

#include <set>
#include <stdexcept>

#include "data/impl/hdf5.h"
#include "util/durable_file.h"

namespace diffuse::data {
namespace fs = std::filesystem;
using impl::check;
using impl::check_id;
using impl::Handle;

namespace {

// IEEE 754 half precision, defined the way h5py defines it, so numpy reads float16.
Handle half_type() {
  Handle type(H5Tcopy(H5T_IEEE_F32LE));
  H5Tset_fields(type.get(), 15, 10, 5, 0, 10);
  H5Tset_size(type.get(), 2);
  H5Tset_ebias(type.get(), 15);
  return type;
}

// h5py stores numpy bool as an int8 enum {FALSE = 0, TRUE = 1} and reads it back as bool.
Handle bool_type() {
  Handle type(H5Tenum_create(H5T_NATIVE_INT8));
  int8_t value = 0;
  H5Tenum_insert(type.get(), "FALSE", &value);
  value = 1;
  H5Tenum_insert(type.get(), "TRUE", &value);
  return type;
}

// The file type and the in-memory type of a tensor's elements; `owned` keeps a custom type alive.
struct ElementTypes {
  hid_t file = H5I_INVALID_HID;
  hid_t memory = H5I_INVALID_HID;
  Handle owned;
};

ElementTypes element_types(torch::ScalarType dtype, const std::string& what) {
  ElementTypes t;
  switch (dtype) {
    case torch::kFloat: t.file = H5T_IEEE_F32LE, t.memory = H5T_NATIVE_FLOAT; break;
    case torch::kDouble: t.file = H5T_IEEE_F64LE, t.memory = H5T_NATIVE_DOUBLE; break;
    case torch::kLong: t.file = H5T_STD_I64LE, t.memory = H5T_NATIVE_INT64; break;
    case torch::kInt: t.file = H5T_STD_I32LE, t.memory = H5T_NATIVE_INT32; break;
    case torch::kShort: t.file = H5T_STD_I16LE, t.memory = H5T_NATIVE_INT16; break;
    case torch::kChar: t.file = H5T_STD_I8LE, t.memory = H5T_NATIVE_INT8; break;
    case torch::kByte: t.file = H5T_STD_U8LE, t.memory = H5T_NATIVE_UINT8; break;
    case torch::kBFloat16: t.file = H5T_STD_U16LE, t.memory = H5T_NATIVE_UINT16; break;
    case torch::kHalf:
      t.owned = half_type();
      t.file = t.memory = t.owned.get();
      break;
    case torch::kBool:
      t.owned = bool_type();
      t.file = t.memory = t.owned.get();
      break;
    default:
      throw std::invalid_argument(what + ": dtype " + std::string(c10::toString(dtype)) +
                                  " cannot be stored (supported: float32/64, float16, bfloat16, int64/32/16/8, "
                                  "uint8, bool)");
  }
  return t;
}

std::string describe(const std::string& name, const torch::Tensor& tensor) {
  return "tensor '" + name + "' (" + std::string(c10::toString(tensor.scalar_type())) + " " +
         c10::str(tensor.sizes()) + ")";
}

herr_t collect_link(hid_t /*group*/, const char* name, const H5L_info_t* /*info*/, void* data) {
  static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  return 0;
}

// The tensor dtype and in-memory HDF5 type for a stored dataset, or throws naming it.
std::pair<torch::ScalarType, Handle> stored_dtype(hid_t dataset, hid_t type, const std::string& what) {
  const size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_FLOAT:
      if (size == 2) return {torch::kHalf, half_type()};
      if (size == 4) return {torch::kFloat, Handle(H5Tcopy(H5T_NATIVE_FLOAT))};
      if (size == 8) return {torch::kDouble, Handle(H5Tcopy(H5T_NATIVE_DOUBLE))};
      break;
    case H5T_INTEGER: {
      const bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
      if (is_signed && size == 8) return {torch::kLong, Handle(H5Tcopy(H5T_NATIVE_INT64))};
      if (is_signed && size == 4) return {torch::kInt, Handle(H5Tcopy(H5T_NATIVE_INT32))};
      if (is_signed && size == 2) return {torch::kShort, Handle(H5Tcopy(H5T_NATIVE_INT16))};
      if (is_signed && size == 1) return {torch::kChar, Handle(H5Tcopy(H5T_NATIVE_INT8))};
      if (!is_signed && size == 1) return {torch::kByte, Handle(H5Tcopy(H5T_NATIVE_UINT8))};
      if (!is_signed && size == 2 && impl::read_string_attribute(dataset, "dtype") == "bfloat16") {
        return {torch::kBFloat16, Handle(H5Tcopy(H5T_NATIVE_UINT16))};
      }
      break;
    }
    case H5T_ENUM: {
      Handle base(H5Tget_super(type));
      if (H5Tget_nmembers(type) == 2 && H5Tget_size(base.get()) == 1) return {torch::kBool, bool_type()};
      break;
    }
    default: break;
  }
  throw std::runtime_error(what + " has HDF5 type " + impl::describe_type(type) +
                           ", which does not map to a tensor dtype");
}

}  // namespace

void write_hdf5_tensors(const fs::path& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& attributes, bool overwrite) {
  const std::string where = std::string(1, '\'') + path.string() + "'";
  std::set<std::string> seen;
  for (const auto& [name, tensor] : tensors) {
    if (name.empty() || name == "." || name.find('/') != std::string::npos) {
      throw std::invalid_argument("writing " + where + ": tensor name '" + name +
                                  "' is not allowed (empty, '.', or contains '/')");
    }
    if (!seen.insert(name).second) {
      throw std::invalid_argument("writing " + where + ": tensor name '" + name + "' appears twice");
    }
    if (!tensor.defined()) throw std::invalid_argument("writing " + where + ": tensor '" + name + "' is undefined");
  }

  util::AtomicFile output(path, overwrite);
  impl::Hdf5Lock lock;
  // Track creation order so a reader gets the tensors back in the order they were given.
  Handle create(H5Pcreate(H5P_FILE_CREATE));
  check(H5Pset_link_creation_order(create.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED), where);
  Handle file(check_id(H5Fcreate(output.temporary().c_str(), H5F_ACC_TRUNC, create.get(), H5P_DEFAULT),
                       "cannot create " + where));
  for (const auto& [name, tensor] : tensors) {
    const std::string what = "writing " + describe(name, tensor) + " to " + where;
    auto types = element_types(tensor.scalar_type(), what);
    auto data = tensor.detach().to(torch::kCPU).contiguous();
    std::vector<hsize_t> dims(data.sizes().begin(), data.sizes().end());
    Handle space(check_id(dims.empty() ? H5Screate(H5S_SCALAR)
                                       : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                          what));
    Handle dataset(check_id(
        H5Dcreate2(file.get(), name.c_str(), types.file, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), what));
    if (tensor.scalar_type() == torch::kBFloat16) {
      impl::write_string_attribute(dataset.get(), "dtype", "bfloat16", what);
    }
    if (data.numel() > 0) {
      check(H5Dwrite(dataset.get(), types.memory, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data_ptr()), what);
    }
  }
  for (const auto& [key, value] : attributes) {
    impl::write_string_attribute(file.get(), key, value, "writing attribute '" + key + "' to " + where);
  }
  check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "flushing " + where);
  if (H5Fclose(file.release()) < 0) impl::throw_error("closing " + where);
  output.commit();
}

const torch::Tensor& Hdf5Tensors::at(const std::string& name) const {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return tensor;
  }
  throw std::out_of_range("no tensor named '" + name + "' in the file");
}

Hdf5Tensors read_hdf5_tensors(const fs::path& path) {
  const std::string where = std::string(1, '\'') + path.string() + "'";
  std::error_code error;
  if (!fs::exists(path, error)) throw std::runtime_error("tensor file " + where + " does not exist");
  impl::Hdf5Lock lock;
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw std::runtime_error("tensor file " + where + " is not an HDF5 file");
  }
  Handle file = impl::open_read_only(path, "tensor file " + where);
  Handle root(check_id(H5Gopen2(file.get(), "/", H5P_DEFAULT), "opening " + where));
  Handle root_create(check_id(H5Gget_create_plist(root.get()), where));
  unsigned order_flags = 0;
  check(H5Pget_link_creation_order(root_create.get(), &order_flags), where);
  const H5_index_t index = (order_flags & H5P_CRT_ORDER_INDEXED) ? H5_INDEX_CRT_ORDER : H5_INDEX_NAME;
  std::vector<std::string> names;
  hsize_t position = 0;
  check(H5Literate(root.get(), index, H5_ITER_INC, &position, collect_link, &names), "listing " + where);

  Hdf5Tensors out;
  for (const auto& name : names) {
    const std::string what = "dataset '" + name + "' of " + where;
    Handle dataset = impl::open_dataset_if_exists(root.get(), name);
    if (!dataset.valid()) continue;  // groups and other objects are not tensors
    Handle type(check_id(H5Dget_type(dataset.get()), what));
    Handle space(check_id(H5Dget_space(dataset.get()), what));
    auto [dtype, memory_type] = stored_dtype(dataset.get(), type.get(), what);
    int rank = H5Sget_simple_extent_ndims(space.get());
    std::vector<hsize_t> dims(std::max(rank, 0));
    if (rank > 0) H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
    std::vector<int64_t> sizes(dims.begin(), dims.end());
    auto tensor = torch::empty(sizes, torch::TensorOptions().dtype(dtype));
    if (tensor.numel() > 0) {
      check(H5Dread(dataset.get(), memory_type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, tensor.data_ptr()),
            "reading " + what);
    }
    out.tensors.emplace_back(name, std::move(tensor));
  }

  std::vector<std::string> attribute_names;
  hsize_t attribute_position = 0;
  auto collect_attribute = [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->emplace_back(name);
    return 0;
  };
  check(H5Aiterate2(root.get(), H5_INDEX_NAME, H5_ITER_INC, &attribute_position, collect_attribute,
                    &attribute_names),
        "listing the attributes of " + where);
  for (const auto& name : attribute_names) {
    if (auto value = impl::read_string_attribute(root.get(), name)) out.attributes[name] = *value;
  }
  return out;
}

}  // namespace diffuse::data
