// dataset_identity: equal for copies of one file, different when the count, an attribute, the
// first or the last chunk's images or labels differ.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "data/dataset.h"
#include "data/dataset_identity.h"
#include "fixtures.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using namespace diffuse::data;
namespace fs = std::filesystem;

// 300 fixture images 16x16x3 (768 bytes): 85 per 64 KiB chunk, so four chunks; the identity reads
// images 0..84 and 215..299.
constexpr int64_t kCount = 300, kSide = 16;

fs::path write_variant(const fs::path& path, const std::function<void(torch::Tensor&, torch::Tensor&)>& edit,
                       const std::string& source = "fixture") {
  auto images = fixture_images(kCount, kSide, kSide, 3);
  auto labels = torch::arange(kCount, torch::kInt64).remainder(10);
  edit(images, labels);
  DatasetWriteOptions options;
  options.source = source;
  write_dataset(path, images, labels, options);
  return path;
}

void unchanged(torch::Tensor&, torch::Tensor&) {}

TEST(DatasetIdentity, CopiesAgreeAndTheSummaryNamesTheShape) {
  TempDir dir;
  auto a = write_variant(dir / "a.h5", unchanged);
  fs::copy_file(a, dir / "copy.h5");
  auto b = write_variant(dir / "b.h5", unchanged);
  auto identity = dataset_identity(a);
  EXPECT_EQ(identity, dataset_identity(dir / "copy.h5"));
  EXPECT_EQ(identity, dataset_identity(b));
  EXPECT_EQ(identity.digest.size(), 64u);
  EXPECT_EQ(identity.count, kCount);
  EXPECT_EQ(identity.summary(),
            "300 images 16x16x3 uint8, labels, sha256 " + identity.digest.substr(0, 12));
  ASSERT_EQ(read_dataset_info(a).chunk_shape[0], 85) << "the cases below assume four chunks";
}

TEST(DatasetIdentity, DiffersWhenTheHeaderOrAnEndChunkDiffers) {
  TempDir dir;
  const auto reference = dataset_identity(write_variant(dir / "ref.h5", unchanged));
  struct Case {
    std::string name;
    std::function<void(torch::Tensor&, torch::Tensor&)> edit;
    std::string source = "fixture";
  };
  std::vector<Case> cases{
      {"first image", [](torch::Tensor& images, torch::Tensor&) { images[0][0][0][0] += 1; }},
      {"last image", [](torch::Tensor& images, torch::Tensor&) { images[kCount - 1][5][5][2] += 1; }},
      {"a label", [](torch::Tensor&, torch::Tensor& labels) { labels[kCount - 1] += 1; }},
      {"fewer images", [](torch::Tensor& images, torch::Tensor& labels) {
         images = images.narrow(0, 0, kCount - 1).clone();
         labels = labels.narrow(0, 0, kCount - 1).clone();
       }},
      {"the source attribute", unchanged, "fixture v2"},
  };
  for (const auto& c : cases) {
    auto identity = dataset_identity(write_variant(dir / (c.name + ".h5"), c.edit, c.source));
    EXPECT_NE(identity.digest, reference.digest) << c.name;
  }
  // The documented cost bound: images strictly between the two chunks read are not hashed.
  auto middle = dataset_identity(write_variant(dir / "middle.h5", [](torch::Tensor& images, torch::Tensor&) {
    images[150][0][0][0] += 1;
  }));
  EXPECT_EQ(middle.digest, reference.digest);
}

TEST(DatasetIdentity, ABrokenFileIsAnErrorNamingIt) {
  TempDir dir;
  std::ofstream(dir / "text.h5") << "not hdf5";
  auto message = error_of([&] { dataset_identity(dir / "text.h5"); });
  EXPECT_NE(message.find((dir / "text.h5").string()), std::string::npos) << message;
}

}  // namespace
}  // namespace diffuse::testing
