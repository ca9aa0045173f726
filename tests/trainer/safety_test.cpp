// safety_test: nothing lost, nothing silent. Regression tests of the faults a hostile user and a
// flaky cluster found (each failed before its fix): two jobs in one run directory, a diverging run
// destroying good checkpoints, resume verdicts that did not name the key, dry runs that disagreed
// with the real resume, corrupt checkpoints silently replaced by older ones, impossible memory
// requests, Ctrl-C, and late validation of command-line values and output paths.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "model/safetensors.h"
#include "support.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

class Safety : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto result = run_command(diffuse_exe() + " prep --synthetic shapes --count 64 --size 16 -o " +
                              (dir_->path() / "s16.h5").string());
    ASSERT_EQ(result.exit_code, 0) << result.output;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path path(const std::string& name) { return dir_->path() / name; }
  static std::string train_command(const fs::path& run_dir, const std::string& extra) {
    auto config = fs::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "configs/tiny.yaml";
    return diffuse_exe() + " train -c " + config.string() + " --set data.path=" + path("s16.h5").string() +
           " --run-dir " + run_dir.string() + " " + extra;
  }
  static CommandResult train(const fs::path& run_dir, const std::string& extra = "") {
    return run_command(train_command(run_dir, extra));
  }
  static CommandResult diffuse(const std::string& arguments) { return run_command(diffuse_exe() + " " + arguments); }
  static TempDir* dir_;
};
TempDir* Safety::dir_ = nullptr;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

/// Starts `command` in the background with its output in `log`; returns its PID.
pid_t start_in_background(const std::string& command, const fs::path& log) {
  FILE* shell = ::popen((command + " > " + log.string() + " 2>&1 & echo $!").c_str(), "r");
  if (shell == nullptr) return -1;
  char pid_text[32] = {};
  const bool read = std::fgets(pid_text, sizeof(pid_text), shell) != nullptr;
  ::pclose(shell);
  return read ? static_cast<pid_t>(std::atol(pid_text)) : -1;
}

/// Waits up to 30 s for `ready` to hold.
template <typename Predicate>
void wait_for(Predicate ready) {
  for (int i = 0; i < 300 && !ready(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

std::string host() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

TEST_F(Safety, ASecondJobInTheSameRunDirectoryIsRefused) {
  auto run = path("dup");
  fs::create_directories(run);
  // A live holder on this host: this test process.
  std::ofstream(run / "run.lock") << "host=" << host() << " pid=" << ::getpid() << " job=SLURM_JOB_ID:424242 started=2026-01-01T00:00:00Z\n";
  auto refused = train(run, "--set train.steps=5");
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_TRUE(contains(refused.output, "in use by another job")) << refused.output;
  EXPECT_TRUE(contains(refused.output, "pid=" + std::to_string(::getpid()))) << refused.output;
  EXPECT_TRUE(contains(refused.output, "SLURM_JOB_ID:424242")) << refused.output;
  EXPECT_TRUE(contains(refused.output, "remove " + (run / "run.lock").string())) << refused.output;
  EXPECT_FALSE(fs::exists(run / "config.yaml")) << "the refused job wrote into the run directory";

  // A lock left by a process that no longer exists on this host is taken over, with a warning.
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  std::ofstream(run / "run.lock") << "host=" << host() << " pid=" << child << " job=none started=2026-01-01T00:00:00Z\n";
  auto taken = train(run, "--set train.steps=5");
  ASSERT_EQ(taken.exit_code, 0) << taken.output;
  EXPECT_TRUE(contains(taken.output, "took over the stale run lock")) << taken.output;
  EXPECT_FALSE(fs::exists(run / "run.lock")) << "the lock outlived its job";

  // A killed rank not yet reaped (a zombie: kill(pid, 0) still succeeds) holds nothing either.
  pid_t zombie = ::fork();
  if (zombie == 0) ::_exit(0);
  siginfo_t info{};
  ASSERT_EQ(::waitid(P_PID, zombie, &info, WEXITED | WNOWAIT), 0) << "the child did not exit";
  ASSERT_EQ(::kill(zombie, 0), 0) << "not a zombie: already reaped";
  run = path("zombie-held");
  fs::create_directories(run);
  std::ofstream(run / "run.lock") << "host=" << host() << " pid=" << zombie << " job=none started=2026-01-01T00:00:00Z\n";
  auto after_zombie = train(run, "--set train.steps=5");
  ::waitpid(zombie, nullptr, 0);
  ASSERT_EQ(after_zombie.exit_code, 0) << after_zombie.output;
  EXPECT_TRUE(contains(after_zombie.output, "took over the stale run lock")) << after_zombie.output;
}

TEST_F(Safety, TwoConcurrentTrainingsCannotShareARunDirectory) {
  auto run = path("concurrent");
  const pid_t first = start_in_background(
      train_command(run, "--set train.steps=100000 --set checkpoint.every=100000"), path("first.log"));
  ASSERT_GT(first, 0);
  wait_for([&] { return fs::exists(run / "metrics.jsonl"); });
  auto second = train(run, "--set train.steps=5 --set train.seed=99");
  ::kill(first, SIGTERM);
  wait_for([&] { return ::kill(first, 0) != 0; });
  EXPECT_NE(second.exit_code, 0) << second.output;
  EXPECT_TRUE(contains(second.output, "in use by another job")) << second.output;
  std::ifstream config(run / "config.yaml");
  std::string text((std::istreambuf_iterator<char>(config)), {});
  EXPECT_TRUE(contains(text, "seed: 7")) << "config.yaml was overwritten by the second job:\n" << text;
}

TEST_F(Safety, ADivergedRunStopsAndKeepsItsFiniteCheckpoints) {
  auto run = path("diverge");
  ASSERT_EQ(train(run, "--set train.steps=10 --set checkpoint.every=5").exit_code, 0);
  auto diverged = train(run, "--resume latest --set train.lr=1e6 --set train.steps=40 --set checkpoint.every=5 "
                             "--set log.every=5");
  EXPECT_NE(diverged.exit_code, 0) << diverged.output;
  EXPECT_TRUE(contains(diverged.output, "training diverged")) << diverged.output;
  EXPECT_TRUE(contains(diverged.output, "last finite checkpoint")) << diverged.output;
  // Every checkpoint left is finite, and `latest` names one of them.
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(run / "checkpoints")) {
    auto name = entry.path().filename().string();
    if (name.rfind("step-", 0) != 0 || !fs::is_directory(entry.path())) continue;
    auto out = path("w-" + name + ".safetensors");
    auto exported = diffuse("export --ckpt " + entry.path().string() + " --weights online --out " + out.string());
    ASSERT_EQ(exported.exit_code, 0) << exported.output;
    for (const auto& [key, tensor] : model::load_safetensors(out).tensors) {
      ASSERT_TRUE(torch::isfinite(tensor).all().item<bool>()) << name << " " << key;
    }
    ++checked;
  }
  EXPECT_GE(checked, 1);
}

TEST_F(Safety, SkipPolicyDropsNonFiniteUpdatesThenGivesUp) {
  auto run = path("skip");
  auto result = train(run, "--set train.lr=1e6 --set train.steps=200 --set log.every=2 --set train.on_nonfinite=skip "
                           "--set train.max_nonfinite_skips=3 --set checkpoint.every=1000");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_TRUE(contains(result.output, "non-finite steps in a row, train.max_nonfinite_skips=3")) << result.output;
}

TEST_F(Safety, DryRunResumeGivesTheRealVerdict) {
  auto run = path("dry-resume");
  ASSERT_EQ(train(run, "--set train.steps=5").exit_code, 0);
  auto refused = train(run, "--dry-run --resume latest --set model.dim=16");
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_TRUE(contains(refused.output, "model.dim 8 -> 16")) << refused.output;
  auto accepted = train(run, "--dry-run --resume latest --set train.lr=1e-4 --set log.sample_steps=40");
  EXPECT_EQ(accepted.exit_code, 0) << accepted.output;
  EXPECT_TRUE(contains(accepted.output, "would continue from")) << accepted.output;
  EXPECT_TRUE(contains(accepted.output, "changed on resume: log.sample_steps 5 -> 40")) << accepted.output;
}

TEST_F(Safety, CommandsWarnWhenLatestIsCorruptAndRefuseANamedCorruptCheckpoint) {
  auto run = path("corrupt");
  ASSERT_EQ(train(run, "--set train.steps=20 --set checkpoint.every=10").exit_code, 0);
  auto newest = run / "checkpoints/step-000020";
  fs::resize_file(newest / "shard-00000-of-00001.h5", 100);
  auto fallback = diffuse("export --ckpt " + run.string() + " --out " + path("fallback.safetensors").string());
  EXPECT_EQ(fallback.exit_code, 0) << fallback.output;
  EXPECT_TRUE(contains(fallback.output, "step-000020 is unusable")) << fallback.output;
  EXPECT_TRUE(contains(fallback.output, "step 10")) << fallback.output;
  auto named = diffuse("export --ckpt " + newest.string() + " --out " + path("named.safetensors").string());
  EXPECT_NE(named.exit_code, 0) << named.output;
  EXPECT_TRUE(contains(named.output, "truncated")) << named.output;
}

TEST_F(Safety, ImpossibleMemoryRequestsAreRefusedUpFront) {
  auto run = path("memory");
  auto start = std::chrono::steady_clock::now();
  auto huge_batch = train(run, "--set train.batch_size=3000000");
  EXPECT_NE(huge_batch.exit_code, 0) << huge_batch.output;
  EXPECT_TRUE(contains(huge_batch.output, "needs at least")) << huge_batch.output;
  EXPECT_TRUE(contains(huge_batch.output, "train.batch_size=3000000")) << huge_batch.output;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));

  ASSERT_EQ(train(path("small"), "--set train.steps=2").exit_code, 0);
  auto huge_sample = diffuse("sample --ckpt " + path("small").string() + " --n 100000000 --out " +
                             path("huge.png").string());
  EXPECT_NE(huge_sample.exit_code, 0) << huge_sample.output;
  EXPECT_TRUE(contains(huge_sample.output, "needs at least")) << huge_sample.output;
  EXPECT_FALSE(contains(huge_sample.output, "Exception raised from")) << huge_sample.output;  // no LibTorch trace
}

TEST_F(Safety, FirstCtrlCCheckpointsAndExits) {
  auto run = path("ctrl-c");
  const pid_t pid = start_in_background(
      train_command(run, "--set train.steps=100000 --set checkpoint.every=100000 --set log.every=1"),
      path("ctrl-c.log"));
  ASSERT_GT(pid, 0);
  wait_for([&] { return fs::exists(run / "metrics.jsonl") && fs::file_size(run / "metrics.jsonl") > 0; });
  ::kill(pid, SIGINT);
  wait_for([&] { return ::kill(pid, 0) != 0; });
  std::ifstream log(path("ctrl-c.log"));
  std::string text((std::istreambuf_iterator<char>(log)), {});
  EXPECT_TRUE(contains(text, "stop signal received")) << text;
  EXPECT_TRUE(fs::exists(run / "checkpoints/latest")) << text;
}

TEST_F(Safety, CommandLineValuesAndOutputPathsAreCheckedBeforeWork) {
  ASSERT_EQ(train(path("cli"), "--set train.steps=2").exit_code, 0);
  auto zero = diffuse("sample --ckpt " + path("cli").string() + " --n 0 --out " + path("x.png").string());
  EXPECT_NE(zero.exit_code, 0);
  EXPECT_TRUE(contains(zero.output, "--n")) << zero.output;
  EXPECT_LT(zero.output.size(), 400u) << zero.output;  // no 309-digit bound
  auto jpg = diffuse("sample --ckpt " + path("cli").string() + " --n 2 --out " + path("x.jpg").string());
  EXPECT_NE(jpg.exit_code, 0);
  EXPECT_TRUE(contains(jpg.output, ".png")) << jpg.output;
  EXPECT_FALSE(contains(jpg.output, "wrote")) << jpg.output;
  std::ofstream(path("a-file")) << "x";
  auto not_dir = diffuse("sample --ckpt " + path("cli").string() + " --n 2 --out-dir " + path("a-file").string());
  EXPECT_NE(not_dir.exit_code, 0);
  EXPECT_TRUE(contains(not_dir.output, "not a directory")) << not_dir.output;
}

}  // namespace
}  // namespace diffuse::testing
