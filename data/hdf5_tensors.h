// data/hdf5_tensors.h: files of named tensors (the trainer's sharded checkpoints), one HDF5
// dataset per tensor at the root, named exactly as given, readable with h5py:
//
//   write_hdf5_tensors(path, {{"model.conv.weight", w}, {"step", torch::tensor(10)}}, {{"kind", "ema"}});
//   auto file = read_hdf5_tensors(path);   // same names, order, dtypes, shapes and attributes
//
//   # Python: f = h5py.File(path); f["model.conv.weight"][...]; f.attrs["kind"]
//
// Stored types: float32/64 and int64/int32/int8/int16/uint8 as the matching HDF5 types,
// float16 as HDF5's IEEE half (h5py reads numpy float16), bool as h5py's enum {FALSE, TRUE}
// (numpy bool), bfloat16 as uint16 bits with the dataset attribute dtype = "bfloat16". Shapes are
// kept (a 0-d tensor is an HDF5 scalar). Attributes are UTF-8 strings on the root group.
#pragma once

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::data {

/// Writes `tensors` (any device; copied to the CPU) and root string attributes to `path`:
/// under a temporary name beside it, fsynced, then renamed (util::AtomicFile), so `path` is
/// either complete or untouched. An existing regular file is replaced only with `overwrite`;
/// a device node, folder or FIFO never. Throws naming the file, and the tensor when one fails
/// (e.g. disk full); the temporary is then removed. Names must be unique, non-empty, without '/'.
void write_hdf5_tensors(const std::filesystem::path& path,
                        const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const std::map<std::string, std::string>& attributes = {}, bool overwrite = false);

/// The contents of a named-tensor file.
struct Hdf5Tensors {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;  ///< in writing order (name order for
                                                               ///< files made without creation order)
  std::map<std::string, std::string> attributes;               ///< the root's string attributes

  /// The tensor named `name`; throws naming the missing key.
  const torch::Tensor& at(const std::string& name) const;
};

/// Reads every root dataset as a CPU tensor. Throws naming the file and the dataset on an
/// unsupported type or an HDF5 error.
Hdf5Tensors read_hdf5_tensors(const std::filesystem::path& path);

}  // namespace diffuse::data
