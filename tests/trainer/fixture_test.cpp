// fixture_test: files written by an older diffuse (format version 1, tests/trainer/fixtures/v1/,
// made by make_fixtures.sh with the build of commit f5a1ba6) still work: the dataset reads, and
// the 2-rank checkpoint resumes to the same losses the old build logged without interruption, and
// inspect, sample and export accept it.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "model/safetensors.h"
#include "support.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

fs::path fixtures() { return fs::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "tests/trainer/fixtures/v1"; }

/// metrics.jsonl as step -> (key -> value), numbers only.
std::map<int64_t, std::map<std::string, double>> read_metrics(const fs::path& path) {
  std::map<int64_t, std::map<std::string, double>> rows;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    auto value = util::json::parse(line);
    std::map<std::string, double> row;
    for (const auto& [key, v] : value.as_object()) {
      if (v.type() == util::json::Value::Type::Number) row[key] = v.as_double();
    }
    rows[static_cast<int64_t>(row.at("step"))] = row;
  }
  return rows;
}

/// A run directory holding a copy of the fixture checkpoint, with `latest` pointing at it.
fs::path run_with_fixture_checkpoint(const TempDir& dir) {
  auto run = dir / "run";
  fs::create_directories(run / "checkpoints");
  fs::copy(fixtures() / "checkpoint", run / "checkpoints", fs::copy_options::recursive);
  fs::create_directory_symlink("step-000010", run / "checkpoints/latest");
  return run;
}

TEST(FormatV1, DatasetReads) {
  auto result = run_command(diffuse_exe() + " inspect " + (fixtures() / "shapes16.h5").string());
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("32"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("16"), std::string::npos) << result.output;
}

TEST(FormatV1, CheckpointResumesToTheLossesTheOldBuildLogged) {
  TempDir dir;
  auto run = run_with_fixture_checkpoint(dir);
  auto config = fs::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "configs/tiny.yaml";
  auto result = run_command(mpirun(2) + diffuse_exe() + " train -c " + config.string() + " --set data.path=" +
                            (fixtures() / "shapes16.h5").string() + " --set train.steps=15 --run-dir " +
                            run.string() + " --resume latest");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("at step 10"), std::string::npos) << result.output;
  auto expected = read_metrics(fixtures() / "expected-metrics.jsonl");
  auto got = read_metrics(run / "metrics.jsonl");
  ASSERT_TRUE(got.count(15)) << result.output;
  for (const char* key : {"loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr", "samples_seen"}) {
    double want = expected.at(15).at(key), have = got.at(15).at(key);
    EXPECT_NEAR(have, want, 1e-6 * std::max(1.0, std::abs(want))) << key;
  }
}

TEST(FormatV1, CheckpointInspectsSamplesAndExports) {
  TempDir dir;
  auto ckpt = (fixtures() / "checkpoint/step-000010").string();
  auto inspect = run_command(diffuse_exe() + " inspect " + ckpt);
  ASSERT_EQ(inspect.exit_code, 0) << inspect.output;
  EXPECT_NE(inspect.output.find("saved by    2 ranks"), std::string::npos) << inspect.output;
  EXPECT_NE(inspect.output.find("result      OK"), std::string::npos) << inspect.output;

  auto grid = dir / "grid.png";
  auto sample = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --n 4 --steps 5 --out " + grid.string());
  ASSERT_EQ(sample.exit_code, 0) << sample.output;
  EXPECT_GT(fs::file_size(grid), 100u);

  auto out = dir / "unet.safetensors";
  auto exported = run_command(diffuse_exe() + " export --ckpt " + ckpt + " --weights 0.5 --out " + out.string());
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  auto file = model::load_safetensors(out);
  EXPECT_EQ(file.metadata.at("weights"), "ema.0.5");
  EXPECT_EQ(file.metadata.at("step"), "10");
  EXPECT_FALSE(file.tensors.empty());
}

}  // namespace
}  // namespace diffuse::testing
