// `diffuse prep` end to end through the real executable, and the dataset report of `inspect`.
#include <gtest/gtest.h>

#include "data/dataset.h"
#include "data/image_io.h"
#include "support.h"
#include "app/commands.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

TEST(PrepCommand, MakesTheSyntheticDatasetAndRefusesToOverwrite) {
  TempDir dir;
  const auto out = (dir / "shapes.h5").string();
  auto result = run_command(diffuse_exe() + " prep --synthetic shapes --count 64 --size 16 --seed 2 -o " + out);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("wrote " + out + ": 64 images of 16x16x3"), std::string::npos) << result.output;
  auto info = data::read_dataset_info(out);
  EXPECT_EQ(info.count, 64);
  EXPECT_EQ(info.class_names.size(), 3u);

  result = run_command(diffuse_exe() + " prep --synthetic shapes --count 64 -o " + out);
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("--overwrite"), std::string::npos) << result.output;
  result = run_command(diffuse_exe() + " prep --synthetic shapes --count 8 --size 8 --overwrite -o " + out);
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(data::read_dataset_info(out).count, 8);
}

TEST(PrepCommand, TerminatedRunRemovesItsIncompleteFile) {
  // A killed prep used to leave OUT.incomplete-PID (190-330 MB for real sets) every time.
  TempDir dir;
  const std::string out = (dir / "big.h5").string();
  // Long enough to be caught while writing (a million images); terminated as soon as its
  // temporary file exists. SIGTERM, not SIGINT: a background job of a script ignores SIGINT.
  const std::string script = diffuse_exe() + " prep --synthetic shapes --count 1000000 --size 16 -o " + out +
                             " & pid=$!; for i in $(seq 1 6000); do ls " + dir.path().string() +
                             " | grep -q incomplete && break; sleep 0.01; done; kill -TERM $pid; wait $pid; "
                             "echo \"exit status $?\"";
  auto result = run_command("bash -c '" + script + "'");
  EXPECT_NE(result.output.find("exit status 143"), std::string::npos) << "expected death by SIGTERM: " << result.output;
  EXPECT_TRUE(fs::is_empty(dir.path())) << "left behind: " << fs::directory_iterator(dir.path())->path();
}

TEST(PrepCommand, ConvertsAFolderAndReportsSkippedImages) {
  TempDir dir;
  for (int i = 0; i < 3; ++i) {
    data::save_image(dir / "in" / ("a" + std::to_string(i) + ".png"), torch::full({5, 5, 3}, 50 * i, torch::kUInt8));
  }
  std::ofstream(dir / "in" / "broken.png") << "not a png";
  const std::string base = diffuse_exe() + " prep " + (dir / "in").string() + " -o " + (dir / "o.h5").string();
  auto result = run_command(base);
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("broken.png"), std::string::npos) << result.output;
  result = run_command(base + " --skip-bad --threads 2");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("skipped unreadable input " + (dir / "in" / "broken.png").string()), std::string::npos)
      << result.output;
  EXPECT_NE(result.output.find("1 unreadable skipped"), std::string::npos) << result.output;
  EXPECT_EQ(data::read_dataset_info(dir / "o.h5").count, 3);
}

TEST(PrepCommand, UsageErrors) {
  auto result = run_command(diffuse_exe() + " prep -o x.h5");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("--synthetic"), std::string::npos) << result.output;
  result = run_command(diffuse_exe() + " prep --synthetic shapes -o x.h5");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("--count"), std::string::npos) << result.output;
  result = run_command(diffuse_exe() + " prep /no/such/input -o x.h5");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("/no/such/input"), std::string::npos) << result.output;
  result = run_command(diffuse_exe() + " prep --synthetic shapes --count 4 --channels 2 -o x.h5");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_FALSE(fs::exists("x.h5"));
}

TEST(InspectDataset, PrintsTheShapeLabelsAndSavesAGrid) {
  TempDir dir;
  auto result = run_command(diffuse_exe() + " prep --synthetic shapes --count 30 --size 16 -o " +
                            (dir / "s.h5").string());
  ASSERT_EQ(result.exit_code, 0) << result.output;
  ::testing::internal::CaptureStdout();
  int code = app::inspect_dataset_command(dir / "s.h5", dir / "grid.png", 10);
  std::fflush(stdout);
  std::string printed = ::testing::internal::GetCapturedStdout();
  EXPECT_EQ(code, 0);
  EXPECT_NE(printed.find("30 x 16 x 16 x 3 (N x H x W x C), uint8"), std::string::npos) << printed;
  EXPECT_NE(printed.find("compression none"), std::string::npos) << printed;
  EXPECT_NE(printed.find("circle"), std::string::npos) << printed;
  EXPECT_NE(printed.find("triangle"), std::string::npos) << printed;
  EXPECT_NE(printed.find("synthetic shapes"), std::string::npos) << printed;
  // 10 images, 4 per row, 2 pixels of padding: 3 rows.
  auto grid = data::load_image(dir / "grid.png");
  EXPECT_EQ(grid.sizes(), (std::vector<int64_t>{3 * 18 + 2, 4 * 18 + 2, 3}));
  EXPECT_TRUE(torch::equal(grid.narrow(0, 2, 16).narrow(1, 2, 16), data::read_images(dir / "s.h5", 0, 1)[0]));
  EXPECT_THROW(app::inspect_dataset_command(dir / "grid.png", std::nullopt, 4), std::runtime_error);
}

}  // namespace
}  // namespace diffuse::testing
