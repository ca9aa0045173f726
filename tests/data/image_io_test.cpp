// Image files as the tools write them: complete or not at all. A full disk is an error naming the
// file (stb's writer used to ignore it and leave a truncated PNG); an existing file is replaced
// only when asked, and a device node, FIFO or folder never.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include "data/image_io.h"
#include "fixtures.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using namespace diffuse::data;
namespace fs = std::filesystem;

// Random pixels do not compress: the PNG is about as large as the pixels.
torch::Tensor noise_image(int64_t side) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(7);
  return torch::randint(0, 256, {side, side, 3}, generator, torch::kUInt8);
}

TEST(ImageFiles, ReplaceAnExistingFileOnlyWithOverwrite) {
  TempDir dir;
  const auto path = dir / "grid.png";
  auto first = torch::full({4, 4, 3}, 10, torch::kUInt8), second = torch::full({4, 4, 3}, 200, torch::kUInt8);
  save_png(path, first);
  auto message = error_of([&] { save_png(path, second); });
  EXPECT_NE(message.find(path.string() + "' exists; pass --overwrite to replace it"), std::string::npos) << message;
  EXPECT_TRUE(torch::equal(load_image(path), first));
  save_png(path, second, /*overwrite=*/true);
  EXPECT_TRUE(torch::equal(load_image(path), second));

  message = error_of([&] { save_image_grid(path, second.unsqueeze(0), 1); });
  EXPECT_NE(message.find("exists; pass --overwrite"), std::string::npos) << message;
  save_image_grid(path, second.unsqueeze(0), 1, /*padding=*/0, /*overwrite=*/true);
  EXPECT_TRUE(torch::equal(load_image(path), second));
}

TEST(ImageFiles, NeverReplaceDevicesFifosOrFolders) {
  TempDir dir;
  ASSERT_EQ(::mkfifo((dir / "pipe.png").c_str(), 0600), 0);
  fs::create_symlink("/dev/null", dir / "null.png");
  fs::create_directory(dir / "folder.png");
  auto image = torch::zeros({2, 2, 3}, torch::kUInt8);
  for (const char* name : {"pipe.png", "null.png", "folder.png"}) {
    auto message = error_of([&] { save_png(dir / name, image, /*overwrite=*/true); });
    EXPECT_NE(message.find("refusing to replace '" + (dir / name).string() + "'"), std::string::npos) << message;
  }
  EXPECT_TRUE(fs::is_fifo(dir / "pipe.png"));
  EXPECT_TRUE(fs::is_symlink(dir / "null.png"));
  EXPECT_TRUE(fs::is_directory(dir / "folder.png"));
  EXPECT_TRUE(fs::is_character_file("/dev/null"));
}

TEST(ImageFiles, AFullDiskIsAnErrorAndLeavesNoFile) {
  TempDir dir;
  auto image = noise_image(256);  // a PNG of about 200 KB
  std::string messages[3];
  const char* names[3] = {"grid.png", "photo.bmp", "photo.jpg"};
  for (int i = 0; i < 3; ++i) {
    messages[i] = error_with_file_size_limit(64 << 10, [&] { save_image(dir / names[i], image, /*jpeg_quality=*/100); });
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_NE(messages[i].find("cannot write '" + (dir / names[i]).string() + "': File too large"), std::string::npos)
        << messages[i];
  }
  EXPECT_TRUE(fs::is_empty(dir.path())) << "neither a truncated image nor a temporary is left";
}

}  // namespace
}  // namespace diffuse::testing
