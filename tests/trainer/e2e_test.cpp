// End-to-end tests of the real `diffuse` CLI on tiny configurations (CPU, MPI ranks): training,
// exact resume, resharded resume, corrupt-checkpoint fallback, preemption by signal, precision,
// config errors, sampling, export and evaluation.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <thread>

#include "data/hdf5_tensors.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "model/unet.h"
#include "support.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

class EndToEnd : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto result = run_command(diffuse_exe() + " prep --synthetic shapes --count 96 --size 16 -o " +
                              (dir_->path() / "shapes16.h5").string());
    ASSERT_EQ(result.exit_code, 0) << result.output;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path data() { return dir_->path() / "shapes16.h5"; }
  static fs::path path(const std::string& name) { return dir_->path() / name; }

  /// `diffuse train` on configs/tiny.yaml with `ranks` MPI ranks (1: no mpirun).
  static CommandResult train(int ranks, const fs::path& run_dir, const std::string& extra = "") {
    std::string launcher = ranks > 1 ? mpirun(ranks) : std::string();
    return run_command(launcher + diffuse_exe() + " train -c " + config() + " --set data.path=" + data().string() +
                       " --run-dir " + run_dir.string() + " " + extra);
  }
  static std::string config() { return (fs::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "configs/tiny.yaml").string(); }

  /// The online and EMA weights of a run's latest checkpoint, as exported safetensors bytes.
  static std::string exported(const fs::path& run_dir, const std::string& weights) {
    auto out = run_dir / ("export-" + weights + ".safetensors");
    auto result = run_command(diffuse_exe() + " export --ckpt " + (run_dir / "checkpoints/latest").string() +
                              " --weights " + weights + " --out " + out.string());
    EXPECT_EQ(result.exit_code, 0) << result.output;
    return read_file(out);
  }

  static std::vector<std::string> metric_lines(const fs::path& run_dir) {
    std::ifstream in(run_dir / "metrics.jsonl");
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  static TempDir* dir_;
};
TempDir* EndToEnd::dir_ = nullptr;

TEST_F(EndToEnd, ResumeOnSameWorldIsBitIdentical) {
  auto full = path("full"), split = path("split");
  auto a = train(2, full);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b1 = train(2, split, "--set train.steps=10");
  ASSERT_EQ(b1.exit_code, 0) << b1.output;
  auto b2 = train(2, split, "--resume latest");
  ASSERT_EQ(b2.exit_code, 0) << b2.output;
  EXPECT_NE(b2.output.find("resumed from"), std::string::npos) << b2.output;
  EXPECT_EQ(exported(full, "online"), exported(split, "online"));
  EXPECT_EQ(exported(full, "ema"), exported(split, "ema"));
  // Same losses after the resume point, and one consistent history of 4 logged steps.
  auto la = metric_lines(full), lb = metric_lines(split);
  ASSERT_EQ(la.size(), 4u);
  ASSERT_EQ(lb.size(), 4u);
  auto loss_of = [](const std::string& line) {
    std::smatch m;
    std::regex_search(line, m, std::regex(R"("loss": ([-0-9.e]+))"));
    return m[1].str();
  };
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(loss_of(la[i]), loss_of(lb[i])) << la[i] << "\n" << lb[i];
}

TEST_F(EndToEnd, ResumeOnAnotherWorldSizeContinuesTheSampleCount) {
  for (auto [first, second] : {std::pair{2, 1}, std::pair{1, 2}}) {
    auto run = path("reshard-" + std::to_string(first) + "-" + std::to_string(second));
    auto a = train(first, run, "--set train.steps=10");
    ASSERT_EQ(a.exit_code, 0) << a.output;
    auto b = train(second, run, "--resume latest");
    ASSERT_EQ(b.exit_code, 0) << b.output;
    auto manifest = read_file(run / "checkpoints/step-000020/manifest.json");
    int64_t expected = 10 * 4 * first + 10 * 4 * second;  // batch 4 per rank
    EXPECT_NE(manifest.find("\"samples_seen\": \"" + std::to_string(expected) + "\""), std::string::npos)
        << manifest.substr(0, 2000);
    EXPECT_EQ(metric_lines(run).size(), 4u);
  }
}

TEST_F(EndToEnd, CorruptLatestFallsBackToPreviousWithWarning) {
  auto run = path("corrupt");
  auto a = train(2, run);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  fs::path shard;
  for (const auto& entry : fs::directory_iterator(run / "checkpoints/step-000020")) {
    if (entry.path().extension() == ".h5") shard = entry.path();
  }
  ASSERT_FALSE(shard.empty());
  {
    std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(fs::file_size(shard) / 2));
    char byte = 0;
    file.read(&byte, 1);
    file.seekp(static_cast<std::streamoff>(fs::file_size(shard) / 2));
    byte = static_cast<char>(byte ^ 0x5a);
    file.write(&byte, 1);
  }
  auto b = train(2, run, "--resume latest --set train.steps=30");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("step-000020"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("step 10"), std::string::npos) << b.output;
}

TEST_F(EndToEnd, SigtermCheckpointsAndExitsZeroThenResumes) {
  auto run = path("preempted");
  auto marker = run.string();
  std::thread killer([&] {
    // Wait until training is under way (the first metrics line), then signal one rank only: the
    // ranks must agree among themselves to stop at the same step.
    for (int i = 0; i < 600; ++i) {
      if (fs::exists(run / "metrics.jsonl") && fs::file_size(run / "metrics.jsonl") > 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    // The rank processes are the ones named diffuse whose command line names this run.
    auto listing = run_command("pgrep -a -x diffuse").output;
    std::istringstream in(listing);
    std::vector<pid_t> ranks;
    for (std::string line; std::getline(in, line);) {
      if (line.find(marker) != std::string::npos) ranks.push_back(static_cast<pid_t>(std::stol(line)));
    }
    if (!ranks.empty()) ::kill(ranks.back(), SIGTERM);
  });
  auto a = train(2, run, "--set train.steps=100000 --set log.every=1 --set checkpoint.every=100000");
  killer.join();
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_NE(a.output.find("stop signal"), std::string::npos) << a.output;
  ASSERT_TRUE(fs::exists(run / "checkpoints/latest")) << a.output;
  auto b = train(1, run, "--resume latest --set train.steps=1");  // already past step 1: nothing to train
  EXPECT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("resumed from"), std::string::npos) << b.output;
}

TEST_F(EndToEnd, ResumeAllowsTrainingChangesAndRefusesModelChanges) {
  auto run = path("changes");
  auto a = train(1, run, "--set train.steps=10");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b = train(1, run, "--resume latest --set train.steps=15 --set log.sample_steps=40 --set train.lr=1e-4");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("changed on resume: log.sample_steps 5 -> 40"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find("changed on resume: train.lr 0.001 -> 0.0001"), std::string::npos) << b.output;
  auto c = train(1, run, "--resume latest --set train.steps=20 --set model.dim=16");
  EXPECT_NE(c.exit_code, 0) << c.output;
  EXPECT_NE(c.output.find("model.dim 8 -> 16"), std::string::npos) << c.output;
  EXPECT_NE(c.output.find("new run directory"), std::string::npos) << c.output;
}

TEST_F(EndToEnd, Bf16OnCpuTrains) {
  auto run = path("bf16");
  auto result = train(1, run, "--set train.precision=bf16 --set train.steps=10");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  auto lines = metric_lines(run);
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(lines.back().find("null"), std::string::npos) << lines.back();
}

TEST_F(EndToEnd, Fp16OnCpuTrainsWithLossScale) {
  auto run = path("fp16");
  auto result = train(1, run, "--set train.precision=fp16 --set train.steps=10");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  auto lines = metric_lines(run);
  ASSERT_FALSE(lines.empty());
  EXPECT_NE(lines.back().find("\"loss_scale\""), std::string::npos) << lines.back();
}

// The first step's loss (same batch, timesteps and noise: same seed) under bf16 and fp16 autocast
// is the fp32 loss within what the narrower types lose; through the real trainer (AutocastScope,
// and channels_last batches on CUDA).
void expect_autocast_losses_near_fp32(const std::string& device, const fs::path& dir,
                                      const std::function<CommandResult(const fs::path&, const std::string&)>& train) {
  std::map<std::string, double> first;
  for (std::string precision : {"fp32", "bf16", "fp16"}) {
    auto run = dir / ("autocast-" + device + "-" + precision);
    auto result = train(run, "--set train.device=" + device + " --set train.precision=" + precision +
                                 " --set train.steps=1 --set log.every=1");
    ASSERT_EQ(result.exit_code, 0) << result.output;
    std::ifstream in(run / "metrics.jsonl");
    std::string line;
    ASSERT_TRUE(std::getline(in, line)) << "no metrics for " << precision;
    std::smatch m;
    ASSERT_TRUE(std::regex_search(line, m, std::regex("\"loss\": ([-+0-9.eE]+)"))) << line;
    first[precision] = std::stod(m[1]);
  }
  EXPECT_GT(first["fp32"], 0);
  EXPECT_NEAR(first["bf16"], first["fp32"], 0.03 * first["fp32"]) << "bf16 on " << device;
  EXPECT_NEAR(first["fp16"], first["fp32"], 0.01 * first["fp32"]) << "fp16 on " << device;
}

TEST_F(EndToEnd, AutocastLossesNearFp32OnCpu) {
  expect_autocast_losses_near_fp32("cpu", path("."), [](const fs::path& run, const std::string& extra) {
    return train(1, run, extra);
  });
}

TEST_F(EndToEnd, AutocastLossesNearFp32_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  expect_autocast_losses_near_fp32("cuda", path("."), [](const fs::path& run, const std::string& extra) {
    return train(1, run, extra);
  });
}

TEST_F(EndToEnd, ConfigErrorsFailBeforeAnythingStarts) {
  struct Case {
    std::string args, expect;
  };
  for (const auto& c : std::vector<Case>{{"--set train.stepz=3", "train.stepz"},
                                         {"--set train.precision=fp8", "train.precision"},
                                         {"--set data.image_size=32", "32"},
                                         {"--set data.path=/nonexistent/x.h5", "/nonexistent/x.h5"},
                                         {"--set train.batch_size=1000", "batch"}}) {
    auto run = path("bad-config");
    auto result = train(1, run, c.args);
    EXPECT_NE(result.exit_code, 0) << c.args << "\n" << result.output;
    EXPECT_NE(result.output.find(c.expect), std::string::npos) << c.args << "\n" << result.output;
    EXPECT_FALSE(fs::exists(run / "checkpoints")) << c.args;
  }
}

TEST_F(EndToEnd, DryRunPrintsSizesAndWritesNothing) {
  auto run = path("dry");
  auto result = train(2, run, "--dry-run");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("global batch"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("parameters"), std::string::npos) << result.output;
  EXPECT_FALSE(fs::exists(run));
}

TEST_F(EndToEnd, SampleExportInspectAndEvalProduceValidFiles) {
  auto run = path("artefacts");
  auto trained = train(1, run, "--set train.steps=10");
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  auto ckpt = (run / "checkpoints/latest").string();

  auto grid = path("grid.png"), h5 = path("samples.h5");
  auto sampled = run_command(mpirun(2) + diffuse_exe() + " sample --ckpt " + ckpt + " --n 5 --steps 4 --seed 3 --out " +
                             grid.string() + " --out-h5 " + h5.string());
  ASSERT_EQ(sampled.exit_code, 0) << sampled.output;
  EXPECT_EQ(read_file(grid).substr(1, 3), "PNG");
  auto images = data::read_hdf5_tensors(h5);
  ASSERT_EQ(images.tensors.size(), 1u);
  EXPECT_EQ(images.tensors[0].second.sizes(), (std::vector<int64_t>{5, 16, 16, 3}));
  // The same seed on one rank gives the same images: sharding does not change the result.
  auto h5_single = path("samples1.h5");
  auto single = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --n 5 --steps 4 --seed 3 --out-h5 " +
                            h5_single.string());
  ASSERT_EQ(single.exit_code, 0) << single.output;
  EXPECT_TRUE(torch::equal(data::read_hdf5_tensors(h5_single).tensors[0].second, images.tensors[0].second));

  auto weights = path("model.safetensors");
  auto exported = run_command(diffuse_exe() + " export --ckpt " + ckpt + " --out " + weights.string());
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  auto file = model::load_safetensors(weights);
  ASSERT_TRUE(file.metadata.count("unet_options"));
  model::Unet unet(model::UnetOptions::from_json(file.metadata.at("unet_options")));
  model::load_state_dict(*unet, file.tensors);
  auto out = unet->forward(torch::randn({2, 3, 16, 16}), torch::tensor({1, 40}));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 3, 16, 16}));
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());

  auto inspected = run_command(diffuse_exe() + " inspect " + ckpt);
  EXPECT_EQ(inspected.exit_code, 0) << inspected.output;
  EXPECT_NE(inspected.output.find("10"), std::string::npos) << inspected.output;

  auto evaluated = run_command(mpirun(2) + diffuse_exe() + " eval --ckpt " + ckpt + " --data " + data().string() +
                               " --n 4 --batch 2");
  ASSERT_EQ(evaluated.exit_code, 0) << evaluated.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(evaluated.output, m, std::regex(R"(total\s+([0-9.]+) bits/dim)"))) << evaluated.output;
  EXPECT_GT(std::stod(m[1]), 0.0);
  EXPECT_LT(std::stod(m[1]), 20.0);
}

}  // namespace
}  // namespace diffuse::testing
