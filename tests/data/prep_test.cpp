// `diffuse prep` on inputs the tests make (PNG/JPEG/BMP folders, idx plain and gzipped, CIFAR-10
// batches, the synthetic set) and every bad input; the image transforms with known answers; the
// torchvision-style grid.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <fstream>
#include <map>

#include "data/dataset.h"
#include "data/image_io.h"
#include "data/prep.h"
#include "data/synthetic.h"
#include "fixtures.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using namespace diffuse::data;
namespace fs = std::filesystem;

#define EXPECT_ERROR_CONTAINS(statement, part)                                          \
  do {                                                                                  \
    std::string message_ = error_of([&] { statement; });                                \
    EXPECT_NE(message_.find(part), std::string::npos) << "expected '" << (part) << "' in: " << message_; \
  } while (0)

PrepOptions prep_options(const fs::path& input, const fs::path& output) {
  PrepOptions options;
  options.input = input;
  options.output = output;
  options.threads = 2;
  return options;
}

// A colour test image [h, w, 3] whose pixels encode (i, y, x).
torch::Tensor coloured(int64_t i, int64_t h, int64_t w) {
  auto out = torch::empty({h, w, 3}, torch::kUInt8);
  auto a = out.accessor<uint8_t, 3>();
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      a[y][x][0] = static_cast<uint8_t>(i * 20);
      a[y][x][1] = static_cast<uint8_t>(y * 30 + x);
      a[y][x][2] = static_cast<uint8_t>(255 - x * 25);
    }
  }
  return out;
}

// --- transforms ----------------------------------------------------------------------------------

TEST(Transforms, AreaAveragingWhenShrinking) {
  auto image = torch::tensor({0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150}, torch::kUInt8)
                   .view({4, 4, 1});
  auto half = square_resize_image(image, 2);
  // Means of the 2x2 blocks: (0+10+40+50)/4 = 25, (20+30+60+70)/4 = 45, ...
  EXPECT_TRUE(torch::equal(half.flatten(), torch::tensor({25, 45, 105, 125}, torch::kUInt8)));
  // 3 -> 2 covers fractional pixels: out0 = (0 * 1 + 90 * 0.5) / 1.5 = 30, out1 = (90 * 0.5 + 180) / 1.5 = 150.
  auto row = torch::tensor({0, 90, 180, 0, 90, 180, 0, 90, 180}, torch::kUInt8).view({3, 3, 1});
  auto two = square_resize_image(row, 2);
  EXPECT_TRUE(torch::equal(two.flatten(), torch::tensor({30, 150, 30, 150}, torch::kUInt8)));
}

TEST(Transforms, BilinearWhenEnlargingAndCentreCrop) {
  auto image = torch::tensor({0, 100, 100, 200}, torch::kUInt8).view({2, 2, 1});
  auto big = square_resize_image(image, 4);
  // Half-pixel centres: source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
  // Along x: 0, 25, 75, 100 on the first row; rows mix the same way.
  EXPECT_TRUE(torch::equal(big.select(2, 0)[0], torch::tensor({0, 25, 75, 100}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(big.select(2, 0)[3], torch::tensor({100, 125, 175, 200}, torch::kUInt8)));
  // A 2x6 image: the centre 2x2 (columns 2 and 3) survives the crop unchanged.
  auto wide = torch::arange(12, torch::kInt).to(torch::kUInt8).view({2, 6, 1});
  auto square = square_resize_image(wide, 2);
  EXPECT_TRUE(torch::equal(square.flatten(), torch::tensor({2, 3, 8, 9}, torch::kUInt8)));
}

TEST(Transforms, ChannelConversionMatchesPil) {
  auto rgb = torch::tensor({255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30}, torch::kUInt8).view({1, 4, 3});
  // PIL's convert("L"): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
  EXPECT_TRUE(torch::equal(convert_image_channels(rgb, 1).flatten(), torch::tensor({76, 150, 29, 18}, torch::kUInt8)));
  auto grey = torch::tensor({7, 200}, torch::kUInt8).view({1, 2, 1});
  EXPECT_TRUE(torch::equal(convert_image_channels(grey, 3).flatten(),
                           torch::tensor({7, 7, 7, 200, 200, 200}, torch::kUInt8)));
  auto rgba = torch::tensor({1, 2, 3, 4}, torch::kUInt8).view({1, 1, 4});
  EXPECT_TRUE(torch::equal(convert_image_channels(rgba, 3).flatten(), torch::tensor({1, 2, 3}, torch::kUInt8)));
  EXPECT_THROW(convert_image_channels(rgb, 2), std::invalid_argument);
}

TEST(ImageGrid, LaysOutLikeTorchvision) {
  // Five 2x3 float images, 2 per row, padding 1: 3 rows -> (3 * 3 + 1) x (2 * 4 + 1).
  auto images = torch::zeros({5, 3, 2, 3});
  for (int k = 0; k < 5; ++k) images[k].fill_(0.1 * (k + 1));
  auto grid = make_image_grid(images, 2, 1);
  ASSERT_EQ(grid.sizes(), (std::vector<int64_t>{10, 9, 3}));
  for (int k = 0; k < 5; ++k) {
    const int64_t y = 1 + (k / 2) * 3, x = 1 + (k % 2) * 4;
    const int expected = static_cast<int>(0.1 * (k + 1) * 255 + 0.5);
    EXPECT_EQ(grid[y][x][0].item<int>(), expected) << k;
    EXPECT_EQ(grid[y + 1][x + 2][2].item<int>(), expected) << k;
  }
  EXPECT_EQ(grid[0].sum().item<int>(), 0);        // top padding
  EXPECT_EQ(grid[7][5].sum().item<int>(), 0);     // the empty sixth cell
  // Clamping, and torchvision's rounding: x * 255 + 0.5 truncated.
  auto extremes = torch::tensor({-0.2f, 0.5f, 1.3f}).view({1, 1, 1, 3});
  auto row = make_image_grid(extremes, 1, 0);
  EXPECT_TRUE(torch::equal(row.flatten(), torch::tensor({0, 128, 255}, torch::kUInt8)));

  TempDir dir;
  auto nhwc = fixture_images(3, 4, 5, 3);
  save_image_grid(dir / "g.png", nhwc, 3, 2);
  auto loaded = load_image(dir / "g.png");
  EXPECT_TRUE(torch::equal(loaded, make_image_grid(nhwc, 3, 2)));
  EXPECT_TRUE(torch::equal(loaded.narrow(0, 2, 4).narrow(1, 2 + 7, 5), nhwc[1]));
}

// --- folders -----------------------------------------------------------------------------------

TEST(Prep, PngAndBmpFoldersRoundTripInSortedOrderWithFolderLabels) {
  for (std::string extension : {".png", ".bmp"}) {
    TempDir dir;
    // Written out of order on purpose; sorted order is cats/c0, cats/c1, dogs/d0, dogs/nested/d1.
    save_image(dir / "in" / "dogs" / ("d0" + extension), coloured(2, 6, 5));
    fs::create_directories(dir / "in" / "cats");
    fs::create_directories(dir / "in" / "dogs" / "nested");
    save_image(dir / "in" / "dogs" / "nested" / ("d1" + extension), coloured(3, 6, 5));
    save_image(dir / "in" / "cats" / ("c1" + extension), coloured(1, 6, 5));
    save_image(dir / "in" / "cats" / ("c0" + extension), coloured(0, 6, 5));
    std::ofstream(dir / "in" / "notes.txt") << "not an image";
    std::ofstream(dir / "in" / ".hidden.png") << "a hidden file is ignored";
    auto options = prep_options(dir / "in", dir / "out.h5");
    options.labels_from_folders = true;
    auto report = prep_dataset(options);
    EXPECT_EQ(report.written, 4) << extension;
    EXPECT_TRUE(report.skipped_bad.empty());
    EXPECT_EQ(report.class_names, (std::vector<std::string>{"cats", "dogs"}));
    auto info = read_dataset_info(dir / "out.h5");
    EXPECT_EQ(info.count, 4);
    EXPECT_EQ(info.height, 6);
    EXPECT_EQ(info.width, 5);
    EXPECT_EQ(info.channels, 3);
    EXPECT_EQ(info.class_names, report.class_names);
    EXPECT_NE(info.source.find("folder "), std::string::npos);
    auto images = read_images(dir / "out.h5", 0, 4);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(torch::equal(images[i], coloured(i, 6, 5))) << extension << " image " << i;
    EXPECT_TRUE(torch::equal(read_labels(dir / "out.h5"), torch::tensor({0, 0, 1, 1}, torch::kInt64)));
  }
}

TEST(Prep, JpegFolderRoundTripsWithinJpegError) {
  TempDir dir;
  for (int i = 0; i < 3; ++i) {
    auto image = torch::full({16, 16, 3}, 40 * (i + 1), torch::kUInt8);
    save_image(dir / "in" / ("img" + std::to_string(i) + ".jpg"), image, 100);
  }
  save_image(dir / "in" / "img3.JPEG", torch::full({16, 16, 3}, 200, torch::kUInt8), 100);
  auto report = prep_dataset(prep_options(dir / "in", dir / "out.h5"));
  ASSERT_EQ(report.written, 4);
  EXPECT_FALSE(report.has_labels);
  auto images = read_images(dir / "out.h5", 0, 4).to(torch::kInt);
  for (int i = 0; i < 4; ++i) {
    const int expected = i < 3 ? 40 * (i + 1) : 200;
    EXPECT_LE((images[i] - expected).abs().max().item<int>(), 2) << "image " << i;
  }
}

TEST(Prep, SizeAndChannelsOptionsApplyTheTransforms) {
  TempDir dir;
  save_image(dir / "in" / "a.png", coloured(1, 12, 20));
  save_image(dir / "in" / "b.png", coloured(2, 30, 10));
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "in", dir / "x.h5")), "pass --size S");
  auto options = prep_options(dir / "in", dir / "out.h5");
  options.size = 8;
  options.channels = 1;
  prep_dataset(options);
  auto images = read_images(dir / "out.h5", 0, 2);
  ASSERT_EQ(images.sizes(), (std::vector<int64_t>{2, 8, 8, 1}));
  EXPECT_TRUE(torch::equal(images[0], square_resize_image(convert_image_channels(coloured(1, 12, 20), 1), 8)));
  EXPECT_TRUE(torch::equal(images[1], square_resize_image(convert_image_channels(coloured(2, 30, 10), 1), 8)));
}

TEST(Prep, GreyFoldersStayGreyAndMixedFoldersBecomeColour) {
  TempDir dir;
  save_image(dir / "grey" / "a.png", torch::full({4, 4, 1}, 9, torch::kUInt8));
  save_image(dir / "grey" / "b.png", torch::full({4, 4, 1}, 99, torch::kUInt8));
  EXPECT_EQ(prep_dataset(prep_options(dir / "grey", dir / "g.h5")).channels, 1);
  save_image(dir / "mixed" / "a.png", torch::full({4, 4, 1}, 9, torch::kUInt8));
  save_image(dir / "mixed" / "b.png", coloured(0, 4, 4));
  prep_dataset(prep_options(dir / "mixed", dir / "m.h5"));
  auto images = read_images(dir / "m.h5", 0, 2);
  EXPECT_EQ(images.size(3), 3);
  EXPECT_TRUE(torch::equal(images[0], torch::full({4, 4, 3}, 9, torch::kUInt8)));
}

TEST(Prep, ManyThreadsGiveTheSameFileContents) {
  TempDir dir;
  for (int i = 0; i < 40; ++i) save_image(dir / "in" / (std::to_string(100 + i) + ".png"), coloured(i, 9, 7));
  auto one = prep_options(dir / "in", dir / "one.h5");
  one.threads = 1;
  one.size = 5;
  auto four = prep_options(dir / "in", dir / "four.h5");
  four.threads = 4;
  four.size = 5;
  prep_dataset(one);
  prep_dataset(four);
  EXPECT_TRUE(torch::equal(read_images(dir / "one.h5", 0, 40), read_images(dir / "four.h5", 0, 40)));
}

TEST(Prep, BadImagesStopTheRunOrAreSkippedAndReported) {
  TempDir dir;
  for (int i = 0; i < 5; ++i) save_image(dir / "in" / ("img" + std::to_string(i) + ".png"), coloured(i, 4, 4));
  std::ofstream(dir / "in" / "img2.png", std::ios::trunc) << "garbage, not a png";
  // A valid header with a truncated body: found only when decoding.
  save_image(dir / "big.png", coloured(9, 64, 64));
  {
    std::ifstream in(dir / "big.png", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(dir / "in" / "img3.png", std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() / 2);
  }
  auto options = prep_options(dir / "in", dir / "out.h5");
  options.size = 4;
  auto message = error_of([&] { prep_dataset(options); });
  EXPECT_NE(message.find((dir / "in" / "img2.png").string()), std::string::npos) << message;
  EXPECT_NE(message.find("--skip-bad"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir / "out.h5"));

  options.skip_bad = true;
  auto report = prep_dataset(options);
  EXPECT_EQ(report.written, 3);
  ASSERT_EQ(report.skipped_bad.size(), 2u);
  EXPECT_EQ(report.skipped_bad[0].path, dir / "in" / "img2.png");
  EXPECT_EQ(report.skipped_bad[1].path, dir / "in" / "img3.png");
  EXPECT_FALSE(report.skipped_bad[1].reason.empty());
  auto images = read_images(dir / "out.h5", 0, 3);
  const int kept[] = {0, 1, 4};
  for (int j = 0; j < 3; ++j) EXPECT_TRUE(torch::equal(images[j], coloured(kept[j], 4, 4))) << j;
  EXPECT_EQ(read_dataset_info(dir / "out.h5").count, 3);
}

TEST(Prep, FolderErrors) {
  TempDir dir;
  fs::create_directories(dir / "empty");
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "empty", dir / "o.h5")), "no images under");
  std::ofstream(dir / "empty" / "readme.txt") << "text";
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "empty", dir / "o.h5")), "no images under");
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "absent", dir / "o.h5")), "does not exist");
  save_image(dir / "flat" / "a.png", coloured(0, 4, 4));
  auto labelled = prep_options(dir / "flat", dir / "o.h5");
  labelled.labels_from_folders = true;
  EXPECT_ERROR_CONTAINS(prep_dataset(labelled), "inside a class sub-folder");
  auto bad_channels = prep_options(dir / "flat", dir / "o.h5");
  bad_channels.channels = 2;
  EXPECT_ERROR_CONTAINS(prep_dataset(bad_channels), "--channels must be 1 or 3");
  auto bad_compression = prep_options(dir / "flat", dir / "o.h5");
  bad_compression.compression = "brotli";
  EXPECT_ERROR_CONTAINS(prep_dataset(bad_compression), "--compression must be none, gzip or lzf");
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "flat", dir / "flat")), "is a folder");
}

TEST(Prep, ExistingOutputNeedsOverwrite) {
  TempDir dir;
  save_image(dir / "in" / "a.png", coloured(0, 4, 4));
  std::ofstream(dir / "out.h5") << "precious";
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "in", dir / "out.h5")), "--overwrite");
  std::ifstream kept(dir / "out.h5");
  std::string content((std::istreambuf_iterator<char>(kept)), std::istreambuf_iterator<char>());
  EXPECT_EQ(content, "precious");
  auto options = prep_options(dir / "in", dir / "out.h5");
  options.overwrite = true;
  prep_dataset(options);
  EXPECT_EQ(read_dataset_info(dir / "out.h5").count, 1);
}

TEST(Prep, WritesUnderATemporaryNameAndCleansUpWhenInterrupted) {
  TempDir dir;
  // 32x32x3 images: 21 per chunk, so 300 of them take two blocks of whole chunks.
  for (int i = 0; i < 300; ++i) save_image(dir / "in" / (std::to_string(1000 + i) + ".png"), coloured(i, 32, 32));
  auto options = prep_options(dir / "in", dir / "out.h5");
  int calls = 0;
  bool saw_temporary = false;
  options.progress = [&](const PrepProgress& progress) {
    ++calls;
    EXPECT_EQ(progress.total, 300);
    EXPECT_FALSE(fs::exists(dir / "out.h5")) << "the final name appears only when complete";
    for (const auto& entry : fs::directory_iterator(dir.path())) {
      saw_temporary = saw_temporary || entry.path().filename().string().find("out.h5.incomplete-") == 0;
    }
    if (progress.done < progress.total) throw std::runtime_error("interrupted");
  };
  EXPECT_ERROR_CONTAINS(prep_dataset(options), "interrupted");
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(saw_temporary);
  EXPECT_FALSE(fs::exists(dir / "out.h5"));
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    EXPECT_EQ(entry.path().filename().string().find("out.h5.incomplete"), std::string::npos) << "left behind";
  }
}

TEST(Prep, OverwriteNeverReplacesWhatIsNotARegularFile) {
  TempDir dir;
  save_image(dir / "in" / "a.png", coloured(0, 4, 4));
  // As root, a rename over a device node replaces it: `--out /dev/null` would replace the system's
  // /dev/null. A FIFO (and a link to /dev/null) stands in for one without risking anything.
  ASSERT_EQ(::mkfifo((dir / "pipe.h5").c_str(), 0600), 0);
  fs::create_symlink("/dev/null", dir / "null.h5");
  for (const char* name : {"pipe.h5", "null.h5"}) {
    auto options = prep_options(dir / "in", dir / name);
    options.overwrite = true;
    EXPECT_ERROR_CONTAINS(prep_dataset(options), "refusing to replace '" + (dir / name).string() + "': it is a");
  }
  EXPECT_TRUE(fs::is_fifo(dir / "pipe.h5"));
  EXPECT_TRUE(fs::is_symlink(dir / "null.h5"));
  EXPECT_TRUE(fs::is_character_file("/dev/null"));
}

TEST(Prep, RemovesTheIncompleteFilesOfDeadRuns) {
  TempDir dir;
  save_image(dir / "in" / "a.png", coloured(0, 4, 4));
  // What a run killed with SIGKILL leaves: OUT.incomplete-PID of a process that is gone.
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);
  const fs::path stale = dir / ("out.h5.incomplete-" + std::to_string(child));
  std::ofstream(stale) << std::string(4096, 'x');
  fs::last_write_time(stale, fs::file_time_type::clock::now() - std::chrono::hours(2));
  auto report = prep_dataset(prep_options(dir / "in", dir / "out.h5"));
  EXPECT_EQ(report.removed_stale, std::vector<fs::path>{stale});
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_EQ(read_dataset_info(dir / "out.h5").count, 1);
}

TEST(Prep, FollowsLinkedFoldersAndReportsWhatItSkips) {
  TempDir dir;
  // in/cats is a real folder, in/dogs a link to a folder elsewhere (a common layout for class
  // folders shared between splits); dangling links and link loops are reported, not fatal.
  save_image(dir / "in" / "cats" / "c0.png", coloured(0, 4, 4));
  save_image(dir / "elsewhere" / "dogs" / "d0.png", coloured(1, 4, 4));
  save_image(dir / "elsewhere" / "dogs" / "d1.png", coloured(2, 4, 4));
  fs::create_directory_symlink(dir / "elsewhere" / "dogs", dir / "in" / "dogs");
  fs::create_symlink(dir / "nowhere.png", dir / "in" / "cats" / "gone.png");
  fs::create_directory_symlink(dir / "in", dir / "in" / "cats" / "loop");
  fs::create_symlink("self", dir / "in" / "cats" / "self");
  fs::create_directory_symlink(dir / "elsewhere" / "dogs", dir / "in" / "cats" / "dogs-again");
  auto options = prep_options(dir / "in", dir / "out.h5");
  options.labels_from_folders = true;
  auto report = prep_dataset(options);
  EXPECT_EQ(report.written, 3);
  EXPECT_EQ(report.class_names, (std::vector<std::string>{"cats", "dogs"}));
  EXPECT_TRUE(torch::equal(read_labels(dir / "out.h5"), torch::tensor({0, 1, 1}, torch::kInt64)));
  std::map<std::string, std::string> skipped;
  for (const auto& entry : report.skipped_entries) skipped[entry.path.filename().string()] = entry.reason;
  EXPECT_EQ(skipped.size(), 4u);
  EXPECT_EQ(skipped["gone.png"], "dangling symbolic link to '" + (dir / "nowhere.png").string() + "'");
  EXPECT_EQ(skipped["loop"], "symbolic link loop: leads back to '" + (dir / "in").string() + "'");
  EXPECT_EQ(skipped["self"], "symbolic link loop: 'self' never resolves to a file or folder");
  EXPECT_EQ(skipped["dogs-again"], "same folder as '" + (dir / "in" / "dogs").string() + "', already searched");

  // A folder whose only entries are skipped says so instead of a bare "no images".
  fs::create_directory(dir / "links");
  fs::create_symlink("self", dir / "links" / "self");
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "links", dir / "o.h5")),
                        "skipped 1 entry: '" + (dir / "links" / "self").string() + "': symbolic link loop");
}

// --- idx ----------------------------------------------------------------------------------------

void put_big_endian(std::string& out, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((v >> s) & 255));
}

std::string idx_images(int64_t n, int64_t rows, int64_t cols) {
  std::string out;
  put_big_endian(out, 0x803);
  put_big_endian(out, n);
  put_big_endian(out, rows);
  put_big_endian(out, cols);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < rows * cols; ++k) out.push_back(static_cast<char>(fixture_byte(i, k)));
  }
  return out;
}

std::string idx_labels(int64_t n) {
  std::string out;
  put_big_endian(out, 0x801);
  put_big_endian(out, n);
  for (int64_t i = 0; i < n; ++i) out.push_back(static_cast<char>(fixture_label(i)));
  return out;
}

void write_file(const fs::path& path, const std::string& bytes, bool gzip = false) {
  fs::create_directories(path.parent_path());
  if (gzip) {
    gzFile file = gzopen(path.c_str(), "wb");
    gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(file);
  } else {
    std::ofstream(path, std::ios::binary) << bytes;
  }
}

TEST(Prep, IdxFilesPlainAndGzippedWithSiblingLabels) {
  for (bool gzip : {false, true}) {
    TempDir dir;
    const std::string suffix = gzip ? ".gz" : "";
    write_file(dir / ("train-images-idx3-ubyte" + suffix), idx_images(23, 5, 4), gzip);
    write_file(dir / ("train-labels-idx1-ubyte" + suffix), idx_labels(23), gzip);
    auto report = prep_dataset(prep_options(dir / ("train-images-idx3-ubyte" + suffix), dir / "out.h5"));
    EXPECT_EQ(report.written, 23);
    EXPECT_TRUE(report.has_labels);
    auto info = read_dataset_info(dir / "out.h5");
    EXPECT_EQ(info.height, 5);
    EXPECT_EQ(info.width, 4);
    EXPECT_EQ(info.channels, 1);
    EXPECT_TRUE(torch::equal(read_images(dir / "out.h5", 0, 23), fixture_images(23, 5, 4, 1)));
    auto labels = read_labels(dir / "out.h5");
    for (int i = 0; i < 23; ++i) EXPECT_EQ(labels[i].item<int64_t>(), fixture_label(i));
    EXPECT_EQ(info.class_names.size(), 10u);
  }
}

TEST(Prep, IdxResizedToThreeChannels) {
  TempDir dir;
  write_file(dir / "t10k-images-idx3-ubyte", idx_images(6, 7, 7));
  auto options = prep_options(dir / "t10k-images-idx3-ubyte", dir / "out.h5");
  options.size = 10;
  options.channels = 3;
  auto report = prep_dataset(options);
  EXPECT_FALSE(report.has_labels);  // no labels file beside it
  auto images = read_images(dir / "out.h5", 0, 6);
  for (int i = 0; i < 6; ++i) {
    EXPECT_TRUE(torch::equal(images[i], convert_image_channels(square_resize_image(fixture_image(i, 7, 7, 1), 10), 3)));
  }
}

TEST(Prep, IdxBadInputs) {
  TempDir dir;
  auto wrong_magic = idx_images(3, 4, 4);
  wrong_magic[3] = 0x04;
  write_file(dir / "a-images-idx3-ubyte", wrong_magic);
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "a-images-idx3-ubyte", dir / "o.h5")),
                        "magic number 0x00000804, expected 0x00000803");
  auto format_idx = prep_options(dir / "a-images-idx3-ubyte", dir / "o.h5");
  format_idx.format = "idx";
  EXPECT_ERROR_CONTAINS(prep_dataset(format_idx), "not an idx image file");

  auto full = idx_images(3, 4, 4);
  write_file(dir / "b-images-idx3-ubyte", full.substr(0, full.size() - 5));
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "b-images-idx3-ubyte", dir / "o.h5")), "is truncated");

  // A gzip stream cut short.
  write_file(dir / "c.gz", full, true);
  {
    std::ifstream in(dir / "c.gz", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    write_file(dir / "c-images-idx3-ubyte.gz", bytes.substr(0, bytes.size() - 12));
  }
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "c-images-idx3-ubyte.gz", dir / "o.h5")), "truncated");

  write_file(dir / "d-images-idx3-ubyte", idx_images(3, 4, 4));
  write_file(dir / "d-labels-idx1-ubyte", idx_labels(4));
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "d-images-idx3-ubyte", dir / "o.h5")), "has 3 images");

  write_file(dir / "e-labels-idx1-ubyte", idx_labels(4));
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "e-labels-idx1-ubyte", dir / "o.h5")), "labels file");
  EXPECT_FALSE(fs::exists(dir / "o.h5"));
}

// --- CIFAR-10 -----------------------------------------------------------------------------------

// CIFAR-10 records: label byte, then the R, G and B planes of 32x32 (pixel p of plane c = byte).
std::string cifar_records(int64_t first, int64_t n) {
  std::string out;
  for (int64_t i = first; i < first + n; ++i) {
    out.push_back(static_cast<char>(fixture_label(i)));
    auto hwc = fixture_image(i, 32, 32, 3);
    for (int c = 0; c < 3; ++c) {
      for (int p = 0; p < 1024; ++p) out.push_back(static_cast<char>(hwc.data_ptr<uint8_t>()[p * 3 + c]));
    }
  }
  return out;
}

TEST(Prep, CifarBatchesFileAndFolder) {
  TempDir dir;
  write_file(dir / "cifar" / "data_batch_1.bin", cifar_records(0, 5));
  write_file(dir / "cifar" / "data_batch_2.bin", cifar_records(5, 4));
  write_file(dir / "cifar" / "data_batch_10.bin", cifar_records(9, 2));  // numeric, not text, order
  write_file(dir / "cifar" / "test_batch.bin", cifar_records(100, 3));
  write_file(dir / "cifar" / "batches.meta.txt", "a0\na1\na2\na3\na4\na5\na6\na7\na8\na9\n\n");
  auto report = prep_dataset(prep_options(dir / "cifar", dir / "train.h5"));
  EXPECT_EQ(report.written, 11);
  EXPECT_EQ(report.class_names[3], "a3");
  EXPECT_TRUE(torch::equal(read_images(dir / "train.h5", 0, 11), fixture_images(11, 32, 32, 3)));
  auto labels = read_labels(dir / "train.h5");
  for (int i = 0; i < 11; ++i) EXPECT_EQ(labels[i].item<int64_t>(), fixture_label(i));

  auto test = prep_options(dir / "cifar" / "test_batch.bin", dir / "test.h5");
  test.size = 16;
  prep_dataset(test);
  auto images = read_images(dir / "test.h5", 0, 3);
  EXPECT_TRUE(torch::equal(images[2], square_resize_image(fixture_image(102, 32, 32, 3), 16)));
}

TEST(Prep, CifarBadInputs) {
  TempDir dir;
  write_file(dir / "short.bin", cifar_records(0, 2).substr(0, 3000));
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "short.bin", dir / "o.h5")), "not a multiple of 3073");
  auto records = cifar_records(0, 2);
  records[3073] = static_cast<char>(42);
  write_file(dir / "labels.bin", records);
  EXPECT_ERROR_CONTAINS(prep_dataset(prep_options(dir / "labels.bin", dir / "o.h5")), "record 1 has label 42");
}

// --- synthetic ------------------------------------------------------------------------------------

TEST(Synthetic, DeterministicWhateverTheThreads) {
  TempDir dir;
  PrepOptions options;
  options.synthetic = "shapes";
  options.count = 200;
  options.size = 24;
  options.seed = 3;
  options.output = dir / "a.h5";
  options.threads = 1;
  auto report = prep_dataset(options);
  EXPECT_EQ(report.class_names, (std::vector<std::string>{"circle", "square", "triangle"}));
  options.output = dir / "b.h5";
  options.threads = 3;
  prep_dataset(options);
  EXPECT_TRUE(torch::equal(read_images(dir / "a.h5", 0, 200), read_images(dir / "b.h5", 0, 200)));
  EXPECT_TRUE(torch::equal(read_labels(dir / "a.h5"), read_labels(dir / "b.h5")));
  options.output = dir / "c.h5";
  options.seed = 4;
  prep_dataset(options);
  EXPECT_FALSE(torch::equal(read_images(dir / "a.h5", 0, 200), read_images(dir / "c.h5", 0, 200)));
  auto info = read_dataset_info(dir / "a.h5");
  EXPECT_EQ(info.height, 24);
  EXPECT_EQ(info.channels, 3);
  EXPECT_NE(info.source.find("synthetic shapes seed=3"), std::string::npos);
}

TEST(Synthetic, LabelsAreTheShapesDrawn) {
  // Each image: one shape on a background. Foreground = pixels far from the background colour
  // of their row; its bounding-box fill tells the shape: square ~1, circle ~pi/4, triangle ~1/2.
  // Synthetic images are also looked at by eye: see data/README.md.
  const int64_t size = 48, n = 300;
  std::vector<int> per_class(3, 0);
  std::vector<uint8_t> rgb(size * size * 3);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = render_synthetic("shapes", 7, i, size, rgb.data());
    ASSERT_GE(label, 0);
    ASSERT_LT(label, 3);
    ++per_class[label];
    int64_t area = 0, x0 = size, x1 = -1, y0 = size, y1 = -1;
    for (int64_t y = 0; y < size; ++y) {
      // The gradient background is uniform along a row, and every shape stays at least one
      // pixel away from the border: the row's first pixel is its background.
      const uint8_t* background = &rgb[y * size * 3];
      for (int64_t x = 0; x < size; ++x) {
        const uint8_t* p = &rgb[(y * size + x) * 3];
        int distance = std::abs(p[0] - background[0]) + std::abs(p[1] - background[1]) + std::abs(p[2] - background[2]);
        if (distance > 90) {
          ++area;
          x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
        }
      }
    }
    ASSERT_GT(area, 0) << "image " << i << " shows no shape";
    const double fill = static_cast<double>(area) / ((x1 - x0 + 1) * (y1 - y0 + 1));
    const double relative_area = static_cast<double>(area) / (size * size);
    EXPECT_GT(relative_area, 0.05) << i;
    EXPECT_LT(relative_area, 0.30) << i;
    if (label == 1) {
      EXPECT_GT(fill, 0.88) << "square " << i;
    } else if (label == 0) {
      EXPECT_TRUE(fill > 0.68 && fill < 0.88) << "circle " << i << " fill " << fill;
    } else {
      EXPECT_TRUE(fill > 0.38 && fill < 0.62) << "triangle " << i << " fill " << fill;
    }
  }
  for (int c = 0; c < 3; ++c) EXPECT_GT(per_class[c], n / 5) << "class " << c;
}

TEST(Synthetic, RedBlueLabelsAreTheColour) {
  // Label 0: a red shape (red well above blue inside it), label 1: a blue one; both classes common.
  const int64_t size = 24, n = 200;
  std::vector<int> per_class(2, 0);
  std::vector<uint8_t> rgb(size * size * 3);
  EXPECT_EQ(synthetic_class_names("red-blue"), (std::vector<std::string>{"red", "blue"}));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = render_synthetic("red-blue", 5, i, size, rgb.data());
    ASSERT_TRUE(label == 0 || label == 1) << label;
    ++per_class[label];
    double red_minus_blue = 0;  // over the pixels of the shape (strongly saturated ones)
    for (int64_t k = 0; k < size * size; ++k) {
      const int r = rgb[k * 3], b = rgb[k * 3 + 2];
      if (std::abs(r - b) > 100) red_minus_blue += r - b;
    }
    if (label == 0) EXPECT_GT(red_minus_blue, 0) << "image " << i;
    if (label == 1) EXPECT_LT(red_minus_blue, 0) << "image " << i;
  }
  EXPECT_GT(per_class[0], n / 3);
  EXPECT_GT(per_class[1], n / 3);
}

TEST(Synthetic, GreyAndBadOptions) {
  TempDir dir;
  PrepOptions options;
  options.synthetic = "shapes";
  options.count = 10;
  options.size = 16;
  options.channels = 1;
  options.output = dir / "g.h5";
  prep_dataset(options);
  EXPECT_EQ(read_dataset_info(dir / "g.h5").channels, 1);
  options.synthetic = "clouds";
  options.output = dir / "x.h5";
  EXPECT_ERROR_CONTAINS(prep_dataset(options), "unknown synthetic dataset 'clouds'");
  options.synthetic = "shapes";
  options.count = 0;
  EXPECT_ERROR_CONTAINS(prep_dataset(options), "--count");
  options.count = 5;
  options.input = dir.path();
  EXPECT_ERROR_CONTAINS(prep_dataset(options), "not both");
}

}  // namespace
}  // namespace diffuse::testing
