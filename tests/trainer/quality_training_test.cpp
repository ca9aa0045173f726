// End-to-end tests of the eval: section and checkpoint.keep_best with the real `diffuse` CLI on
// configs/tiny.yaml and the committed tiny TorchScript feature network: the evaluations reach
// metrics.jsonl, the log and TensorBoard, and their time is left out of images/s (checked through
// the recorded fields, not by timing); missing or foreign files are refused before training;
// keep_best follows a planted FID sequence through retention and a resume; a class-conditional
// run evaluates, and `eval --fid` on its checkpoint passes classes.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "support.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;
namespace json = util::json;

fs::path fixtures() { return source_dir() / "tests/trainer/fixtures"; }
std::string features() { return (fixtures() / "tiny_features.pt").string(); }

std::vector<json::Value> metric_rows(const fs::path& run_dir) {
  std::ifstream in(run_dir / "metrics.jsonl");
  std::vector<json::Value> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(json::parse(line));
  return rows;
}

double number(const json::Value& row, const std::string& key) {
  const json::Value* value = row.find(key);
  if (value == nullptr) {
    ADD_FAILURE() << "no " << key << " in a metrics row";
    return NAN;
  }
  return value->as_double();
}

/// The names of the checkpoint directories (step-NNNNNN) of a run.
std::set<std::string> checkpoint_dirs(const fs::path& run_dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(run_dir / "checkpoints")) {
    auto name = entry.path().filename().string();
    if (name.rfind("step-", 0) == 0) names.insert(name);
  }
  return names;
}

class QualityTraining : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    for (const auto& command :
         {" prep --synthetic shapes --count 64 --size 16 -o " + path("shapes16.h5").string(),
          " stats --data " + path("shapes16.h5").string() + " --features " + features() + " -o " +
              path("shapes.stats.h5").string(),
          " stats --data " + path("shapes16.h5").string() + " --features " +
              (fixtures() / "tiny_features_other.pt").string() + " -o " + path("other.stats.h5").string()}) {
      auto result = run_command(diffuse_exe() + command);
      ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;
    }
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path path(const std::string& name) { return dir_->path() / name; }

  /// The eval: section as --set options: 8 samples of 2 DDIM steps every `every` steps.
  static std::string eval_section(int every, const fs::path& ref = {}) {
    return " --set eval.every=" + std::to_string(every) + " --set eval.n=8 --set eval.steps=2 --set eval.features=" +
           features() + " --set eval.ref=" + (ref.empty() ? path("shapes.stats.h5") : ref).string();
  }

  /// `diffuse train` on configs/tiny.yaml (`env`: variables for the command).
  static CommandResult train(int ranks, const fs::path& run_dir, const std::string& extra,
                             const std::string& env = "") {
    std::string launcher = ranks > 1 ? mpirun(ranks) : std::string();
    return run_command(env + " " + launcher + diffuse_exe() + " train -c " + (source_dir() / "configs/tiny.yaml").string() +
                       " --set data.path=" + path("shapes16.h5").string() + " --run-dir " + run_dir.string() + " " +
                       extra);
  }

  static TempDir* dir_;
};
TempDir* QualityTraining::dir_ = nullptr;

TEST_F(QualityTraining, EvaluationsAreRecordedAndTheirTimeIsNotTraining) {
  auto run = path("eval-run");
  // tiny.yaml: batch 4 per rank, log every 5 steps; 2 ranks -> 40 images per log interval.
  // Sample grids at steps 10 and 20 are not training either.
  auto result = train(2, run,
                      "--set train.steps=20 --set eval.ema=0.9 --set log.sample_every=10 --set log.sample_steps=2" +
                          eval_section(5));
  ASSERT_EQ(result.exit_code, 0) << result.output;
  std::map<int64_t, json::Value> evaluations, logs;
  for (auto& row : metric_rows(run)) {
    auto step = static_cast<int64_t>(number(row, "step"));
    (row.find("fid") != nullptr ? evaluations : logs).emplace(step, std::move(row));
  }
  ASSERT_EQ(evaluations.size(), 4u);
  for (const auto& [step, row] : evaluations) {
    SCOPED_TRACE("evaluation at step " + std::to_string(step));
    EXPECT_EQ(step % 5, 0);
    EXPECT_GT(number(row, "fid"), 0.0);
    for (const char* key : {"kid", "kid_std", "precision", "recall"}) EXPECT_NE(row.find(key), nullptr) << key;
    EXPECT_GT(number(row, "eval_seconds"), 0.0);
    EXPECT_EQ(number(row, "eval_n"), 8);
    EXPECT_EQ(number(row, "eval_steps"), 2);
    EXPECT_EQ(row.find("eval_sampler")->as_string(), "ddim");
    EXPECT_EQ(row.find("eval_weights")->as_string(), "ema.0.9");
    EXPECT_EQ(row.find("best_fid"), nullptr) << "no keep_best, no best";
  }
  ASSERT_EQ(logs.size(), 4u);
  for (const auto& [step, row] : logs) {
    SCOPED_TRACE("log row at step " + std::to_string(step));
    // The evaluation of the previous log step ran inside this interval (after that step's row).
    double evaluated = step > 5 ? number(evaluations.at(step - 5), "eval_seconds") : 0.0;
    EXPECT_NEAR(number(row, "eval_s"), evaluated, 1e-6 * evaluated + 1e-9);
    // The grid of step 10 ran inside the interval ending at step 15 (the one of step 20 after the last row).
    if (step == 15) {
      EXPECT_GT(number(row, "grid_s"), 0.0);
    } else {
      EXPECT_EQ(number(row, "grid_s"), 0.0);
    }
    double training = number(row, "interval_s") - number(row, "eval_s") - number(row, "grid_s");
    ASSERT_GT(training, 0.0);
    EXPECT_NEAR(number(row, "images_per_sec") * training, 40.0, 1e-4 * 40.0)
        << "images/s must count the interval's training seconds only";
  }
  // The same code path as `diffuse eval --fid`: its number for the last checkpoint (on one rank,
  // sampling train.batch_size images at a time) is the run's last evaluation.
  auto offline = run_command(diffuse_exe() + " eval --ckpt " + (run / "checkpoints/latest").string() +
                             " --fid --features " + features() + " --ref " + path("shapes.stats.h5").string() +
                             " --n 8 --steps 2 --batch 4 --seed 0 --weights 0.9");
  ASSERT_EQ(offline.exit_code, 0) << offline.output;
  std::istringstream lines(offline.output);
  double offline_fid = NAN;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("{\"fid\"", 0) == 0) offline_fid = json::parse(line).find("fid")->as_double();
  }
  EXPECT_NEAR(offline_fid, number(evaluations.at(20), "fid"), 1e-6 * offline_fid) << offline.output;
  auto log = read_file(run / "logs/rank-0.log");
  EXPECT_NE(log.find("eval at step 5: FID"), std::string::npos) << log;
  std::string events;
  for (const auto& entry : fs::directory_iterator(run / "tensorboard")) events += read_file(entry.path());
  for (const char* tag : {"eval/fid", "eval/kid", "eval/precision", "eval/recall", "eval/seconds"}) {
    EXPECT_NE(events.find(tag), std::string::npos) << tag;
  }
}

TEST_F(QualityTraining, MissingOrForeignFilesAreRefusedBeforeTraining) {
  struct Case {
    std::string args, expect;
  };
  for (const auto& c : std::vector<Case>{
           {eval_section(5) + " --set eval.features=/nonexistent/net.pt", "eval.features"},
           {eval_section(5) + " --set eval.ref=/nonexistent/ref.stats.h5", "/nonexistent/ref.stats.h5"},
           {eval_section(5, path("other.stats.h5")), "made with another feature network"},
           {eval_section(5) + " --set eval.evry=3", "eval.evry"},
           {"--set checkpoint.keep_best=fid", "checkpoint.keep_best"}}) {
    auto run = path("refused");
    auto result = train(1, run, c.args);
    EXPECT_NE(result.exit_code, 0) << c.args << "\n" << result.output;
    EXPECT_NE(result.output.find(c.expect), std::string::npos) << c.args << "\n" << result.output;
    EXPECT_FALSE(fs::exists(run)) << c.args;
  }
}

TEST_F(QualityTraining, KeepBestFollowsAPlantedFidThroughRetentionAndResume) {
  auto run = path("best-run");
  // Evaluations every 5 steps, checkpoints every 10, keep_last 1. The planted FIDs: the best is
  // step 10 (3) until step 25 (2.5); step 20 (3.5) beats it only if the resumed run forgot it.
  const std::string planted = "DIFFUSE_TEST_PLANTED_FID=5:5,10:3,15:4,20:3.5,25:2.5,30:6";
  const std::string options = eval_section(5) + " --set checkpoint.keep_best=fid --set checkpoint.keep_last=1";
  auto first = train(1, run, "--set train.steps=15" + options, planted);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_EQ(fs::read_symlink(run / "checkpoints/best"), fs::path("step-000010"));
  EXPECT_EQ(fs::read_symlink(run / "checkpoints/latest"), fs::path("step-000015"));
  EXPECT_EQ(checkpoint_dirs(run), (std::set<std::string>{"step-000010", "step-000015"}))
      << "the best must survive keep_last=1";

  auto second = train(1, run, "--resume latest --set train.steps=30" + options, planted);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("best fid so far: 3 at step 10"), std::string::npos) << second.output;
  std::map<int64_t, double> best_by_step;
  for (const auto& row : metric_rows(run)) {
    if (row.find("fid") != nullptr) best_by_step[static_cast<int64_t>(number(row, "step"))] = number(row, "best_fid");
  }
  EXPECT_EQ(best_by_step, (std::map<int64_t, double>{{5, 5}, {10, 3}, {15, 3}, {20, 3}, {25, 2.5}, {30, 2.5}}));
  EXPECT_EQ(fs::read_symlink(run / "checkpoints/best"), fs::path("step-000025"));
  EXPECT_EQ(checkpoint_dirs(run), (std::set<std::string>{"step-000025", "step-000030"}));
  // Step 25 is not a multiple of checkpoint.every: the new best was checkpointed when it was found.
  auto manifest = read_file(run / "checkpoints/step-000030/manifest.json");
  EXPECT_TRUE(std::regex_search(manifest, std::regex(R"("best_step":\s*"25")"))) << manifest;
  auto sampled = run_command(diffuse_exe() + " sample --ckpt " + (run / "checkpoints/best").string() +
                             " --n 2 --steps 2 --out " + path("best.png").string());
  EXPECT_EQ(sampled.exit_code, 0) << sampled.output;
  EXPECT_NE(sampled.output.find("step 25"), std::string::npos) << sampled.output;
}

TEST_F(QualityTraining, ConditionalRunsEvaluateAndEvalFidPassesClasses) {
  auto data = path("redblue16.h5"), ref = path("redblue.stats.h5");
  for (const auto& command : {" prep --synthetic red-blue --count 64 --size 16 --seed 1 -o " + data.string(),
                              " stats --data " + data.string() + " --features " + features() + " -o " + ref.string()}) {
    auto result = run_command(diffuse_exe() + command);
    ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;
  }
  auto run = path("conditional-run");
  auto trained = train(1, run,
                       "--set data.path=" + data.string() + " --set model.num_classes=2 --set train.steps=10" +
                           eval_section(10, ref));
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  int evaluations = 0;
  for (const auto& row : metric_rows(run)) evaluations += row.find("fid") != nullptr;
  EXPECT_EQ(evaluations, 1);

  auto eval_fid = [&](const std::string& extra) {
    auto result = run_command(diffuse_exe() + " eval --ckpt " + (run / "checkpoints/latest").string() +
                              " --fid --features " + features() + " --ref " + ref.string() +
                              " --n 6 --steps 2 --batch 3 " + extra);
    EXPECT_EQ(result.exit_code, 0) << extra << "\n" << result.output;
    std::istringstream lines(result.output);
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind("{\"fid\"", 0) == 0) return json::parse(line);
    }
    ADD_FAILURE() << "no JSON line in:\n" << result.output;
    return json::Value();
  };
  auto cycled = eval_fid(""), red = eval_fid("--classes 0"), blue = eval_fid("--classes 1");
  ASSERT_NE(cycled.find("classes"), nullptr);
  EXPECT_EQ(cycled.find("classes")->as_string(), "i mod 2");
  EXPECT_EQ(blue.find("classes")->as_string(), "1");
  EXPECT_EQ(cycled.find("guidance")->as_double(), 6.0);
  EXPECT_NE(red.find("fid")->as_double(), blue.find("fid")->as_double()) << "the class must reach the sampler";
}

}  // namespace
}  // namespace diffuse::testing
