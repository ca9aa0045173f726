// The dataset file format (write, validate, read) and named-tensor files: every dtype round
// trips bit-exactly and is stored as h5py expects; errors name the file and the tensor.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <fstream>

#include "data/dataset.h"
#include "data/hdf5_tensors.h"
#include "fixtures.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using namespace diffuse::data;
namespace fs = std::filesystem;

// The stored HDF5 type class and size of dataset `name`, and its string attribute `dtype`.
struct StoredType {
  H5T_class_t type_class = H5T_NO_CLASS;
  size_t size = 0;
  std::string dtype_attribute;
};
StoredType stored_type(const fs::path& path, const std::string& name) {
  StoredType out;
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t dataset = H5Dopen2(file, name.c_str(), H5P_DEFAULT);
  hid_t type = H5Dget_type(dataset);
  out.type_class = H5Tget_class(type);
  out.size = H5Tget_size(type);
  if (H5Aexists(dataset, "dtype") > 0) {
    hid_t attribute = H5Aopen(dataset, "dtype", H5P_DEFAULT);
    hid_t stored = H5Aget_type(attribute);
    hid_t string_type = H5Tcopy(H5T_C_S1);
    H5Tset_size(string_type, H5T_VARIABLE);
    H5Tset_cset(string_type, H5Tget_cset(stored));  // HDF5 converts no string between ASCII and UTF-8
    H5Tclose(stored);
    char* value = nullptr;
    H5Aread(attribute, string_type, &value);
    out.dtype_attribute = value ? value : "";
    H5free_memory(value);
    H5Tclose(string_type);
    H5Aclose(attribute);
  }
  H5Tclose(type);
  H5Dclose(dataset);
  H5Fclose(file);
  return out;
}

TEST(DatasetFile, WriteThenDescribeAndRead) {
  TempDir dir;
  auto images = fixture_images(37, 5, 6, 3);
  auto labels = torch::arange(37, torch::kInt64).remainder(4);
  DatasetWriteOptions options;
  options.source = "unit test";
  options.class_names = {"a", "b", "c", "d"};
  write_dataset(dir / "d.h5", images, labels, options);
  auto info = read_dataset_info(dir / "d.h5");
  EXPECT_EQ(info.count, 37);
  EXPECT_EQ(info.height, 5);
  EXPECT_EQ(info.width, 6);
  EXPECT_EQ(info.channels, 3);
  EXPECT_TRUE(info.has_labels);
  EXPECT_EQ(info.source, "unit test");
  EXPECT_EQ(info.format_version, kDatasetFormatVersion);
  EXPECT_EQ(info.compression, "none");
  EXPECT_EQ(info.chunk_shape, dataset_chunk_shape(37, 5, 6, 3, "none"));
  EXPECT_EQ(info.class_names, options.class_names);
  EXPECT_TRUE(torch::equal(read_images(dir / "d.h5", 0, 37), images));
  EXPECT_TRUE(torch::equal(read_images(dir / "d.h5", 30, 7), images.narrow(0, 30, 7)));
  EXPECT_EQ(read_images(dir / "d.h5", 5, 0).size(0), 0);
  EXPECT_TRUE(torch::equal(read_labels(dir / "d.h5"), labels));
  EXPECT_NE(error_of([&] { read_images(dir / "d.h5", 30, 8); }).find("outside the 37 images"), std::string::npos);
  EXPECT_THROW(read_images(dir / "d.h5", -1, 2), std::out_of_range);
}

TEST(DatasetFile, ChunksAreWholeImages) {
  // About 64 KiB of whole images per chunk uncompressed; one image per chunk compressed.
  EXPECT_EQ(dataset_chunk_shape(60000, 28, 28, 1, "none"), (std::vector<int64_t>{83, 28, 28, 1}));
  EXPECT_EQ(dataset_chunk_shape(10, 28, 28, 1, "none"), (std::vector<int64_t>{10, 28, 28, 1}));
  EXPECT_EQ(dataset_chunk_shape(1000, 128, 128, 3, "none"), (std::vector<int64_t>{1, 128, 128, 3}));
  EXPECT_EQ(dataset_chunk_shape(1000, 32, 32, 3, "gzip"), (std::vector<int64_t>{1, 32, 32, 3}));
}

TEST(DatasetFile, StreamedWriterShrinksToWhatWasAppended) {
  TempDir dir;
  auto images = fixture_images(10, 4, 4, 1);
  {
    DatasetWriter writer(dir / "s.h5", 25, 4, 4, 1, /*with_labels=*/true);
    writer.append(images.narrow(0, 0, 6), torch::arange(6));
    writer.append(images.narrow(0, 6, 4), torch::arange(6, 10));
    EXPECT_EQ(writer.written(), 10);
    EXPECT_NE(error_of([&] { writer.append(images.to(torch::kFloat), torch::arange(10)); }).find("must be uint8"),
              std::string::npos);
    EXPECT_NE(error_of([&] { writer.append(images.narrow(0, 0, 2), torch::Tensor()); }).find("labels must be"),
              std::string::npos);
    writer.finish();
  }
  auto info = read_dataset_info(dir / "s.h5");
  EXPECT_EQ(info.count, 10);
  EXPECT_TRUE(torch::equal(read_images(dir / "s.h5", 0, 10), images));
  EXPECT_TRUE(torch::equal(read_labels(dir / "s.h5"), torch::arange(10)));
}

TEST(DatasetFile, GzipRoundTripsAndLzfIsUsableOrExplained) {
  TempDir dir;
  auto images = fixture_images(12, 8, 8, 3);
  DatasetWriteOptions gzip;
  gzip.compression = "gzip";
  write_dataset(dir / "g.h5", images, {}, gzip);
  EXPECT_EQ(read_dataset_info(dir / "g.h5").compression, "gzip");
  EXPECT_TRUE(torch::equal(read_images(dir / "g.h5", 0, 12), images));

  // LZF needs HDF5's plugin (Debian: hdf5-plugin-lzf, whose filter also needs liblzf1 loaded).
  // The fixture's bytes do not compress: LZF gives up on every chunk, stored raw instead.
  DatasetWriteOptions lzf;
  lzf.compression = "lzf";
  if (compression_available("lzf")) {
    write_dataset(dir / "l.h5", images, {}, lzf);
    EXPECT_EQ(read_dataset_info(dir / "l.h5").compression, "lzf");
    EXPECT_TRUE(torch::equal(read_images(dir / "l.h5", 0, 12), images));
  } else {
    auto message = error_of([&] { write_dataset(dir / "l.h5", images, {}, lzf); });
    EXPECT_NE(message.find("hdf5-plugin-lzf"), std::string::npos) << message;
    EXPECT_NE(message.find("use gzip"), std::string::npos) << message;
  }
  DatasetWriteOptions unknown;
  unknown.compression = "zstd";
  EXPECT_THROW(write_dataset(dir / "z.h5", images, {}, unknown), std::invalid_argument);
}

// --- named-tensor files ------------------------------------------------------------------------

TEST(Hdf5Tensors, EveryDtypeRoundTripsBitExactly) {
  TempDir dir;
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"model.layer.0.weight", torch::randn({3, 4})},
      {"model.double", torch::randn({5}, torch::kDouble)},
      {"half", torch::randn({2, 3}).to(torch::kHalf)},
      {"bf16", torch::randn({4, 2}).to(torch::kBFloat16)},
      {"step", torch::tensor(int64_t{123456789012})},  // 0-d
      {"int32", torch::tensor({-5, 7, 2147483647}, torch::kInt)},
      {"int16", torch::tensor({-300, 300}, torch::kShort)},
      {"int8", torch::tensor({-128, 127}, torch::kChar)},
      {"bytes", torch::arange(256, torch::kInt).to(torch::kByte)},
      {"mask", torch::tensor({true, false, true})},
      {"empty", torch::zeros({0, 3})},
      {"strided", torch::arange(12, torch::kFloat).view({3, 4}).t()},  // non-contiguous input
  };
  // Special values survive: NaN payload-preserving comparison below is bitwise.
  tensors[0].second[0][0] = std::numeric_limits<float>::quiet_NaN();
  tensors[0].second[0][1] = -std::numeric_limits<float>::infinity();
  std::map<std::string, std::string> attributes = {{"kind", "checkpoint"}, {"config", "a: 1\nb: [2, 3]\n"}};
  write_hdf5_tensors(dir / "t.h5", tensors, attributes);
  auto back = read_hdf5_tensors(dir / "t.h5");
  ASSERT_EQ(back.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, original] = tensors[i];
    const auto& [read_name, read] = back.tensors[i];
    EXPECT_EQ(read_name, name) << "order kept";
    EXPECT_EQ(read.scalar_type(), original.scalar_type()) << name;
    EXPECT_EQ(read.sizes(), original.sizes()) << name;
    auto a = original.contiguous(), b = read.contiguous();
    ASSERT_EQ(a.nbytes(), b.nbytes()) << name;
    EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()), 0) << name << " differs bitwise";
  }
  EXPECT_EQ(back.attributes, attributes);
  EXPECT_TRUE(torch::equal(back.at("int8"), tensors[7].second));
  EXPECT_THROW(back.at("nope"), std::out_of_range);
}

TEST(Hdf5Tensors, StoredTypesAreTheOnesH5pyReads) {
  TempDir dir;
  write_hdf5_tensors(dir / "t.h5", {{"h", torch::ones({2}, torch::kHalf)},
                                    {"b", torch::ones({2}, torch::kBFloat16)},
                                    {"m", torch::ones({2}, torch::kBool)},
                                    {"f", torch::ones({2})}});
  auto half = stored_type(dir / "t.h5", "h");
  EXPECT_EQ(half.type_class, H5T_FLOAT);
  EXPECT_EQ(half.size, 2u);
  auto bf16 = stored_type(dir / "t.h5", "b");
  EXPECT_EQ(bf16.type_class, H5T_INTEGER);
  EXPECT_EQ(bf16.size, 2u);
  EXPECT_EQ(bf16.dtype_attribute, "bfloat16");
  auto mask = stored_type(dir / "t.h5", "m");
  EXPECT_EQ(mask.type_class, H5T_ENUM);
  EXPECT_EQ(mask.size, 1u);
  EXPECT_EQ(stored_type(dir / "t.h5", "f").type_class, H5T_FLOAT);
  // 1.0 in IEEE half is 0x3C00: stored as such, so numpy sees 1.0.
  hid_t file = H5Fopen((dir / "t.h5").c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t dataset = H5Dopen2(file, "h", H5P_DEFAULT);
  uint16_t raw[2] = {0, 0};
  hid_t type = H5Dget_type(dataset);
  H5Dread(dataset, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, raw);
  EXPECT_EQ(raw[0], 0x3C00);
  H5Tclose(type);
  H5Dclose(dataset);
  H5Fclose(file);
}

// What h5py users see. launch/setup.sh installs Debian's python3-h5py, whose python is
// /usr/bin/python3 (the python3 first on PATH may be another one, e.g. pyenv's).
TEST(Hdf5Tensors, H5pyReadsTensorFilesAndDatasets) {
  std::string python;
  for (const char* candidate : {"python3", "/usr/bin/python3"}) {
    if (run_command(std::string(candidate) + " -c 'import h5py, numpy'").exit_code == 0) {
      python = candidate;
      break;
    }
  }
  if (python.empty()) GTEST_SKIP() << "no python3 with h5py (launch/setup.sh installs python3-h5py)";
  TempDir dir;
  write_hdf5_tensors(dir / "t.h5",
                     {{"model.w", torch::tensor({1.5f, -2.0f})},
                      {"half", torch::tensor({0.5, -2.0, 65504.0}).to(torch::kHalf)},
                      {"bf16", torch::tensor({1.0, -3.5}).to(torch::kBFloat16)},
                      {"mask", torch::tensor({true, false, true})},
                      {"step", torch::tensor(int64_t{123456789012})},
                      {"i8", torch::tensor({-128, 127}, torch::kChar)}},
                     {{"kind", "ema"}});
  write_fixture(dir / "d.h5", 5, 2, 3, 3);
  std::ofstream(dir / "check.py") << R"(
import sys
import h5py, numpy as np
t, d = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
assert t["model.w"].dtype == np.float32 and t["model.w"][...].tolist() == [1.5, -2.0]
assert t["half"].dtype == np.float16 and t["half"][...].tolist() == [0.5, -2.0, 65504.0]
b = t["bf16"]
assert b.dtype == np.uint16 and b.attrs["dtype"] == "bfloat16"
assert (b[...].astype(np.uint32) << 16).view(np.float32).tolist() == [1.0, -3.5]
assert t["mask"].dtype == np.bool_ and t["mask"][...].tolist() == [True, False, True]
assert t["step"].shape == () and t["step"][()] == 123456789012
assert t["i8"].dtype == np.int8 and t["i8"][...].tolist() == [-128, 127]
assert t.attrs["kind"] == "ema"
images = d["images"]
assert images.dtype == np.uint8 and images.shape == (5, 2, 3, 3)
assert [int(d.attrs[k]) for k in ("format_version", "count", "height", "width", "channels")] == [1, 5, 2, 3, 3]
assert d.attrs["source"] == "fixture"
assert d["labels"].dtype == np.int64 and d["labels"][...].tolist() == [0, 7, 4, 1, 8]
assert images[3].reshape(-1)[:3].tolist() == [3, 0, 0]
print("h5py ok")
)";
  auto result = run_command(python + " " + (dir / "check.py").string() + " " + (dir / "t.h5").string() + " " +
                            (dir / "d.h5").string());
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("h5py ok"), std::string::npos) << result.output;
}

TEST(Hdf5Tensors, ReplacesAnExistingFileOnlyWithOverwrite) {
  // `sample --out-h5` onto an existing file used to overwrite it silently.
  TempDir dir;
  const auto path = dir / "samples.h5";
  write_hdf5_tensors(path, {{"images", torch::zeros({2}, torch::kUInt8)}});
  auto message = error_of([&] { write_hdf5_tensors(path, {{"images", torch::ones({3}, torch::kUInt8)}}); });
  EXPECT_NE(message.find(path.string() + "' exists; pass --overwrite to replace it"), std::string::npos) << message;
  EXPECT_EQ(read_hdf5_tensors(path).at("images").numel(), 2);
  write_hdf5_tensors(path, {{"images", torch::ones({3}, torch::kUInt8)}}, {}, /*overwrite=*/true);
  EXPECT_EQ(read_hdf5_tensors(path).at("images").numel(), 3);
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1) << "no temporary left";
}

TEST(Hdf5Files, LockedByAWriterSaysWhatToDo) {
  // HDF5 locks files with flock(): an exclusive lock stands for a writer in another process
  // (flock locks of two open() calls conflict even within one process).
  TempDir dir;
  const auto path = write_fixture(dir / "d.h5", 4, 2, 2, 1);
  ::unsetenv("HDF5_USE_FILE_LOCKING");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  auto message = error_of([&] { read_dataset_info(path); });
  ::close(fd);
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_NE(message.find("another process has this file open for writing"), std::string::npos) << message;
  EXPECT_NE(message.find("HDF5_USE_FILE_LOCKING=FALSE"), std::string::npos) << message;
  EXPECT_EQ(read_dataset_info(path).count, 4) << "readable again once the lock is gone";
}

TEST(Hdf5Tensors, ErrorsNameTheFileAndTheTensor) {
  TempDir dir;
  auto unwritable = dir / "no-such-folder" / "t.h5";
  auto message = error_of([&] { write_hdf5_tensors(unwritable, {{"x", torch::ones({2})}}); });
  EXPECT_NE(message.find(unwritable.string()), std::string::npos) << message;
  EXPECT_NE(message.find("does not exist"), std::string::npos) << message;

  // A full disk while writing one tensor: a file-size limit makes writes past 64 KiB fail
  // (EFBIG) the way a full disk does (ENOSPC). HDF5 1.10 keeps such a file half-closed and used
  // to segfault at exit on it: this binary exiting cleanly is part of the test.
  {
    message = error_with_file_size_limit(64 << 10, [&] {
      write_hdf5_tensors(dir / "full.h5", {{"small", torch::ones({16})}, {"model.big", torch::ones({1 << 16})}});
    });
    EXPECT_NE(message.find((dir / "full.h5").string()), std::string::npos) << message;
    EXPECT_NE(message.find("model.big"), std::string::npos) << message;
    EXPECT_NE(message.find("File too large"), std::string::npos) << message;
    // Neither a partial full.h5 nor its temporary is left.
    EXPECT_TRUE(fs::is_empty(dir.path())) << "left behind: " << fs::directory_iterator(dir.path())->path();
  }
  // A device node is never written over (as root, a rename would replace /dev/full itself).
  if (fs::exists("/dev/full")) {
    message = error_of([&] { write_hdf5_tensors("/dev/full", {{"x", torch::ones({4})}}, {}, /*overwrite=*/true); });
    EXPECT_NE(message.find("refusing to replace '/dev/full': it is a character device"), std::string::npos) << message;
    EXPECT_TRUE(fs::is_character_file("/dev/full"));
  }

  EXPECT_NE(error_of([&] { write_hdf5_tensors(dir / "d.h5", {{"a", torch::ones(1)}, {"a", torch::ones(1)}}); })
                .find("'a' appears twice"),
            std::string::npos);
  EXPECT_NE(error_of([&] { write_hdf5_tensors(dir / "d.h5", {{"a/b", torch::ones(1)}}); }).find("'a/b'"),
            std::string::npos);
  message = error_of([&] { write_hdf5_tensors(dir / "d.h5", {{"z", torch::ones({2}, torch::kComplexFloat)}}); });
  EXPECT_NE(message.find("'z'"), std::string::npos) << message;
  EXPECT_NE(message.find("cannot be stored"), std::string::npos) << message;

  EXPECT_NE(error_of([&] { read_hdf5_tensors(dir / "missing.h5"); }).find("does not exist"), std::string::npos);
  std::ofstream(dir / "text.h5") << "plain text";
  EXPECT_NE(error_of([&] { read_hdf5_tensors(dir / "text.h5"); }).find("not an HDF5 file"), std::string::npos);
}

}  // namespace
}  // namespace diffuse::testing
