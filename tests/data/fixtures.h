// tests/data/fixtures.h: datasets made by the tests, where image i's pixels are a known function
// of i (the first three bytes are i itself), so order, sharding and flips are checked exactly;
// plus raw-HDF5 helpers to craft broken files.
#pragma once

#include <gtest/gtest.h>
#include <hdf5.h>
#include <sys/resource.h>
#include <torch/torch.h>

#include <csignal>
#include <filesystem>
#include <functional>
#include <string>

#include "data/dataset.h"
#include "support.h"

namespace diffuse::testing {

/// Byte k (flat [H, W, C] order) of fixture image i: bytes 0..2 are i in little-endian order,
/// the rest a hash-like pattern of (i, k).
inline uint8_t fixture_byte(int64_t i, int64_t k) {
  if (k < 3) return static_cast<uint8_t>((i >> (8 * k)) & 255);
  return static_cast<uint8_t>((i * 31 + k * 17 + (i >> 3) * 7) % 251);
}

/// Fixture image i as [H, W, C] uint8.
inline torch::Tensor fixture_image(int64_t i, int64_t h, int64_t w, int64_t c) {
  auto out = torch::empty({h, w, c}, torch::kUInt8);
  auto* p = out.data_ptr<uint8_t>();
  for (int64_t k = 0; k < h * w * c; ++k) p[k] = fixture_byte(i, k);
  return out;
}

/// Images [count, H, W, C] of fixture_image(0..count-1).
inline torch::Tensor fixture_images(int64_t count, int64_t h, int64_t w, int64_t c) {
  auto out = torch::empty({count, h, w, c}, torch::kUInt8);
  for (int64_t i = 0; i < count; ++i) out[i].copy_(fixture_image(i, h, w, c));
  return out;
}

/// Label of fixture image i.
inline int64_t fixture_label(int64_t i) { return (i * 7) % 10; }

/// Writes a fixture dataset file and returns its path.
inline std::filesystem::path write_fixture(const std::filesystem::path& path, int64_t count, int64_t h, int64_t w,
                                           int64_t c, bool labels = true, const std::string& compression = "none") {
  torch::Tensor label_values;
  if (labels) label_values = torch::arange(count, torch::kInt64).mul(7).remainder(10);
  diffuse::data::DatasetWriteOptions options;
  options.source = "fixture";
  options.compression = compression;
  diffuse::data::write_dataset(path, fixture_images(count, h, w, c), label_values, options);
  return path;
}

/// What the loader must deliver for fixture image i: [C, H, W] float v / 127.5 - 1, mirrored
/// left-right when `flip`.
inline torch::Tensor expected_sample(int64_t i, int64_t h, int64_t w, int64_t c, bool flip) {
  auto image = fixture_image(i, h, w, c).permute({2, 0, 1}).to(torch::kFloat).div(127.5).sub(1.0);
  return flip ? image.flip({2}) : image;
}

/// Runs `fn` with a file-size limit of `bytes` and SIGXFSZ ignored: writes past the limit fail
/// with EFBIG ("File too large"), the way writes to a full disk fail with ENOSPC, without
/// filling a disk. Returns what error_of(fn) returns.
inline std::string error_with_file_size_limit(rlim_t bytes, const std::function<void()>& fn) {
  struct rlimit saved {};
  if (::getrlimit(RLIMIT_FSIZE, &saved) != 0) return "(getrlimit failed)";
  auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = saved;
  small.rlim_cur = bytes;
  if (::setrlimit(RLIMIT_FSIZE, &small) != 0) return "(setrlimit failed)";
  std::string message = error_of(fn);
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous_handler);
  return message;
}

/// Overwrites (or adds) an integer attribute on the root of an existing file.
inline void set_int_attribute(const std::filesystem::path& path, const std::string& name, int64_t value) {
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(file, 0);
  if (H5Aexists(file, name.c_str()) > 0) H5Adelete(file, name.c_str());
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attribute = H5Acreate2(file, name.c_str(), H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(attribute, H5T_NATIVE_INT64, &value);
  H5Aclose(attribute);
  H5Sclose(space);
  H5Fclose(file);
}

/// Writes the dataset format's integer attributes for images of the given shape.
inline void set_format_attributes(const std::filesystem::path& path, int64_t n, int64_t h, int64_t w, int64_t c) {
  set_int_attribute(path, "format_version", 1);
  set_int_attribute(path, "count", n);
  set_int_attribute(path, "height", h);
  set_int_attribute(path, "width", w);
  set_int_attribute(path, "channels", c);
}

}  // namespace diffuse::testing
