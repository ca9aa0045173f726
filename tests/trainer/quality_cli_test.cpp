// quality_cli_test: `diffuse stats` and `diffuse eval --fid` through the real CLI on the v1
// fixture checkpoint and dataset with the tiny TorchScript feature network: the same statistics
// and the same FID on 1, 2 and 4 ranks, the JSON line, and the refusals.
#include <gtest/gtest.h>

#include <sstream>

#include "support.h"
#include "trainer/feature_statistics.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

fs::path fixtures() { return fs::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "tests/trainer/fixtures"; }

std::string launcher(int ranks) { return ranks == 1 ? std::string() : mpirun(ranks); }

/// The JSON line of `eval --fid`'s output.
util::json::Value eval_json(const std::string& output) {
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("{\"fid\"", 0) == 0) return util::json::parse(line);
  }
  ADD_FAILURE() << "no JSON line in:\n" << output;
  return util::json::Value();
}

TEST(QualityCli, StatsAndFidDoNotDependOnTheRankCount) {
  TempDir dir;
  auto data = (fixtures() / "v1/shapes16.h5").string(), net = (fixtures() / "tiny_features.pt").string();
  auto ckpt = (fixtures() / "v1/checkpoint/step-000010").string();
  std::vector<double> fids;
  std::vector<std::string> hashes;
  for (int ranks : {1, 2, 4}) {
    auto ref = dir / ("ref" + std::to_string(ranks) + ".stats.h5");
    auto stats = run_command(launcher(ranks) + diffuse_exe() + " stats --data " + data + " --features " + net +
                             " --batch 5 -o " + ref.string());
    ASSERT_EQ(stats.exit_code, 0) << stats.output;
    hashes.push_back(trainer::read_reference_statistics(ref).content_sha256);
    auto eval = run_command(launcher(ranks) + diffuse_exe() + " eval --ckpt " + ckpt + " --fid --features " + net +
                            " --ref " + ref.string() + " --n 6 --steps 3 --batch 2 --seed 3 --kid-subset-size 8");
    ASSERT_EQ(eval.exit_code, 0) << eval.output;
    auto json = eval_json(eval.output);
    EXPECT_EQ(json.find("n")->as_int64(), 6);
    EXPECT_EQ(json.find("sampler")->as_string(), "ddim");
    EXPECT_EQ(json.find("steps")->as_int64(), 3);
    EXPECT_EQ(json.find("ranks")->as_int64(), ranks);
    EXPECT_EQ(json.find("kid_subset_size")->as_int64(), 6);  // capped at the 6 samples
    EXPECT_NE(json.find("precision"), nullptr);
    EXPECT_EQ(json.find("features_sha256")->as_string().size(), 64u);
    EXPECT_NE(eval.output.find("FID"), std::string::npos);
    EXPECT_NE(eval.output.find("N = 6 samples"), std::string::npos) << "no warning about N < D? " << eval.output;
    fids.push_back(json.find("fid")->as_double());
  }
  EXPECT_GT(fids[0], 0.0);
  for (size_t i = 1; i < fids.size(); ++i) {
    EXPECT_NEAR(fids[i], fids[0], 1e-9 * fids[0]) << "ranks index " << i;
    EXPECT_EQ(hashes[i], hashes[0]);
  }
}

TEST(QualityCli, RefusesStatsOfAnotherNetworkAndMissingOptions) {
  TempDir dir;
  auto data = (fixtures() / "v1/shapes16.h5").string();
  auto ckpt = (fixtures() / "v1/checkpoint/step-000010").string();
  auto ref = dir / "other.stats.h5";
  auto stats = run_command(diffuse_exe() + " stats --data " + data + " --features " +
                           (fixtures() / "tiny_features_other.pt").string() + " --n 10 -o " + ref.string());
  ASSERT_EQ(stats.exit_code, 0) << stats.output;
  auto eval = run_command(diffuse_exe() + " eval --ckpt " + ckpt + " --fid --features " +
                          (fixtures() / "tiny_features.pt").string() + " --ref " + ref.string() + " --n 4 --steps 2");
  EXPECT_NE(eval.exit_code, 0);
  EXPECT_NE(eval.output.find("made with another feature network"), std::string::npos) << eval.output;
  auto missing = run_command(diffuse_exe() + " eval --ckpt " + ckpt + " --fid --n 4");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("give --features NET.pt and --ref"), std::string::npos) << missing.output;
  auto again = run_command(diffuse_exe() + " stats --data " + data + " --features " +
                           (fixtures() / "tiny_features.pt").string() + " -o " + ref.string());
  EXPECT_NE(again.exit_code, 0) << "an existing output must not be replaced without --overwrite";
}

TEST(QualityCli, ImagesAgainstTheirOwnStatisticsGiveZero) {
  TempDir dir;
  auto data = (fixtures() / "v1/shapes16.h5").string(), net = (fixtures() / "tiny_features.pt").string();
  auto ref = dir / "first20.stats.h5";
  auto stats = run_command(diffuse_exe() + " stats --data " + data + " --features " + net + " --n 20 -o " + ref.string());
  ASSERT_EQ(stats.exit_code, 0) << stats.output;
  auto measure = [&](int64_t n) {
    auto eval = run_command(mpirun(2) + diffuse_exe() + " eval --fid --images " + data + " --n " + std::to_string(n) +
                            " --features " + net + " --ref " + ref.string() + " --batch 5");
    EXPECT_EQ(eval.exit_code, 0) << eval.output;
    return eval_json(eval.output);
  };
  auto same = measure(20);
  EXPECT_EQ(same.find("n")->as_int64(), 20);
  EXPECT_EQ(same.find("images")->as_string(), data);
  EXPECT_EQ(same.find("images_content_sha256")->as_string(), trainer::read_reference_statistics(ref).content_sha256)
      << "the same images, read as `stats` reads them";
  EXPECT_EQ(same.find("sampler"), nullptr) << "no sampling without a checkpoint";
  EXPECT_NEAR(same.find("fid")->as_double(), 0.0, 1e-9);
  EXPECT_EQ(same.find("precision")->as_double(), 1.0);
  EXPECT_EQ(same.find("recall")->as_double(), 1.0);
  auto more = measure(32);  // 12 images the reference has not seen
  EXPECT_GT(more.find("fid")->as_double(), 1e-6);

  for (const auto& [args, expect] : std::vector<std::pair<std::string, std::string>>{
           {" eval --images " + data + " --features " + net + " --ref " + ref.string(), "give it with --fid"},
           {" eval --fid --images " + data + " --ckpt " + (fixtures() / "v1/checkpoint/step-000010").string() +
                " --features " + net + " --ref " + ref.string(),
            "without --ckpt"},
           {" eval --fid --features " + net + " --ref " + ref.string(), "give --ckpt"}}) {
    auto refused = run_command(diffuse_exe() + args);
    EXPECT_NE(refused.exit_code, 0) << args;
    EXPECT_NE(refused.output.find(expect), std::string::npos) << args << "\n" << refused.output;
  }
}

}  // namespace
}  // namespace diffuse::testing
