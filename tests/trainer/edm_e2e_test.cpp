// End-to-end tests of the EDM family through the real `diffuse` CLI on CPU: diffusion.type:
// elucidated around the reference's Unet (configs/tiny-edm.yaml) and around EDM2's KarrasUnet
// (configs/tiny-karras.yaml). Each trains on 2 ranks, resumes bit-identically from a mid-run
// checkpoint, exports the reference's state dict (the golden nets' keys, order and shapes of
// tests/model/golden/edm.safetensors, so a strict load_state_dict into the Python classes works),
// samples with Heun and DPM-Solver++ the same on 1 and 2 ranks, and refuses what does not apply
// (a DDPM sampler, the bound, a resume that changes the formulation, keys of the other type).
#include <gtest/gtest.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "data/hdf5_tensors.h"
#include "model/elucidated_diffusion.h"
#include "model/karras_unet.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "model/unet.h"
#include "support.h"
#include "trainer/checkpoint.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

/// A temporary directory holding shapes16.h5 (64 synthetic 16x16 images).
TempDir* with_shapes() {
  auto* dir = new TempDir();
  auto result = run_command(diffuse_exe() + " prep --synthetic shapes --count 64 --size 16 --seed 3 -o " +
                            (dir->path() / "shapes16.h5").string());
  EXPECT_EQ(result.exit_code, 0) << result.output;
  return dir;
}

/// One formulation under test: its config and the golden net whose options it has.
struct Flavour {
  std::string config;       ///< configs/<config>.yaml
  std::string golden;       ///< the net's name in edm.safetensors ("unet", "karras")
  std::string python_class;  ///< what `export` says to load it into
};

class Edm : public ::testing::TestWithParam<Flavour> {
 protected:
  static void SetUpTestSuite() { dir_ = with_shapes(); }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path path(const std::string& name) { return dir_->path() / (GetParam().golden + "-" + name); }
  static fs::path data() { return dir_->path() / "shapes16.h5"; }

  static CommandResult train(int ranks, const fs::path& run_dir, const std::string& extra = "") {
    std::string launcher = ranks > 1 ? mpirun(ranks) : std::string();
    auto config = source_dir() / "configs" / (GetParam().config + ".yaml");
    return run_command(launcher + diffuse_exe() + " train -c " + config.string() + " --set data.path=" +
                       data().string() + " --run-dir " + run_dir.string() + " " + extra);
  }
  static CommandResult export_weights(const fs::path& run_dir, const std::string& weights, const fs::path& out) {
    return run_command(diffuse_exe() + " export --ckpt " + (run_dir / "checkpoints/latest").string() + " --weights " +
                       weights + " --out " + out.string() + " --overwrite");
  }
  static std::string exported(const fs::path& run_dir, const std::string& weights) {
    auto out = run_dir / ("export-" + weights + ".safetensors");
    auto result = export_weights(run_dir, weights, out);
    EXPECT_EQ(result.exit_code, 0) << result.output;
    return read_file(out);
  }
  /// The run trained for the other tests (2 ranks, 20 steps), made once per flavour.
  static fs::path trained_run() {
    auto run = path("full");
    if (!fs::exists(run / "checkpoints/latest")) {
      auto result = train(2, run);
      EXPECT_EQ(result.exit_code, 0) << result.output;
    }
    return run;
  }

  static TempDir* dir_;
};
TempDir* Edm::dir_ = nullptr;

std::vector<double> logged_losses(const fs::path& run_dir) {
  std::ifstream in(run_dir / "metrics.jsonl");
  std::vector<double> losses;
  for (std::string line; std::getline(in, line);) {
    auto row = util::json::parse(line);
    if (const auto* loss = row.find("loss")) losses.push_back(loss->as_double());
  }
  return losses;
}

TEST_P(Edm, TrainsOnTwoRanksAndResumesBitIdentically) {
  auto full = trained_run();
  auto losses = logged_losses(full);
  ASSERT_EQ(losses.size(), 4u) << "log.every=5 over 20 steps";
  for (double loss : losses) EXPECT_TRUE(std::isfinite(loss) && loss > 0) << loss;

  auto split = path("split");
  auto first = train(2, split, "--set train.steps=10");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto resumed = train(2, split, "--resume latest");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resumed from"), std::string::npos) << resumed.output;
  EXPECT_EQ(exported(full, "online"), exported(split, "online"));
  EXPECT_EQ(exported(full, "ema"), exported(split, "ema"));
  EXPECT_EQ(logged_losses(split), losses);

  // The formulation defines what the weights mean: a resume that changes it is refused.
  auto changed = train(2, split, "--resume latest --set diffusion.sigma_data=0.3 --set train.steps=30");
  EXPECT_NE(changed.exit_code, 0);
  EXPECT_NE(changed.output.find("diffusion.sigma_data 0.5 -> 0.3"), std::string::npos) << changed.output;
}

TEST_P(Edm, ExportHasTheReferenceStateDict) {
  auto run = trained_run();
  auto out = path("export.safetensors");
  auto result = export_weights(run, "ema", out);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("in Python: " + GetParam().python_class + "("), std::string::npos) << result.output;
  auto file = model::load_safetensors(out);
  EXPECT_EQ(file.metadata.at("diffusion_type"), "elucidated");
  // Exactly the reference's state_dict keys, in its order, with its shapes (strict load_state_dict).
  auto golden = model::load_safetensors(fs::path(source_dir()) / "tests/model/golden/edm.safetensors");
  auto meta = util::json::parse(golden.metadata.at("golden"));
  const std::string prefix = GetParam().golden + ".weights";
  std::istringstream keys(meta.find(prefix + ".keys")->as_string());
  std::map<std::string, std::vector<int64_t>> golden_shapes;
  for (const auto& [name, tensor] : golden.tensors) golden_shapes[name] = tensor.sizes().vec();
  size_t i = 0;
  for (std::string key; std::getline(keys, key, ','); ++i) {
    ASSERT_LT(i, file.tensors.size()) << "export lacks " << key;
    EXPECT_EQ(file.tensors[i].first, key) << "entry " << i;
    EXPECT_EQ(file.tensors[i].second.sizes().vec(), golden_shapes.at(prefix + "." + key)) << key;
  }
  EXPECT_EQ(i, file.tensors.size());
  // The metadata rebuilds the network and the diffusion.
  auto options = model::ElucidatedOptions::from_json(file.metadata.at("diffusion_options"));
  EXPECT_EQ(options.image_size, 16);
  if (GetParam().golden == "karras") {
    model::KarrasUnet net(model::KarrasUnetOptions::from_json(file.metadata.at("unet_options")));
    model::load_state_dict(*net, file.tensors);
    model::ElucidatedDiffusion(net, options);
  } else {
    model::Unet net(model::UnetOptions::from_json(file.metadata.at("unet_options")));
    model::load_state_dict(*net, file.tensors);
    model::ElucidatedDiffusion(net, options);
  }
}

TEST_P(Edm, SamplesWithHeunAndDpmppAlikeOnOneAndTwoRanks) {
  auto ckpt = (trained_run() / "checkpoints/latest").string();
  for (std::string sampler : {"heun", "dpmpp"}) {
    auto one = path(sampler + "-1.h5"), two = path(sampler + "-2.h5");
    const std::string args = " sample --ckpt " + ckpt + " --n 5 --batch 2 --steps 4 --seed 9 --sampler " + sampler +
                             " --overwrite --out-h5 ";
    auto a = run_command(diffuse_exe() + args + one.string());
    ASSERT_EQ(a.exit_code, 0) << a.output;
    auto b = run_command(mpirun(2) + diffuse_exe() + args + two.string());
    ASSERT_EQ(b.exit_code, 0) << b.output;
    auto images = data::read_hdf5_tensors(one);
    EXPECT_EQ(images.tensors.at(0).second.sizes(), (std::vector<int64_t>{5, 16, 16, 3}));
    EXPECT_EQ(images.attributes.at("sampler"), sampler);
    EXPECT_TRUE(torch::equal(images.tensors.at(0).second, data::read_hdf5_tensors(two).tensors.at(0).second))
        << sampler;
    // Not a constant image: the sampler ran from noise.
    EXPECT_GT(images.tensors.at(0).second.to(torch::kFloat).std().item<double>(), 1.0) << sampler;
  }
  // The default sampler of an elucidated model is Heun.
  auto auto_sampled = path("auto.h5");
  auto c = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --n 5 --batch 2 --steps 4 --seed 9 --out-h5 " +
                       auto_sampled.string() + " --overwrite");
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_TRUE(torch::equal(data::read_hdf5_tensors(auto_sampled).tensors.at(0).second,
                           data::read_hdf5_tensors(path("heun-1.h5")).tensors.at(0).second));
}

TEST_P(Edm, RefusesWhatDoesNotApplyToTheFormulation) {
  auto ckpt = (trained_run() / "checkpoints/latest").string();
  auto ddim = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --n 2 --sampler ddim --out-h5 " +
                          path("x.h5").string());
  EXPECT_NE(ddim.exit_code, 0);
  EXPECT_NE(ddim.output.find("sampler 'ddim' is not one of this model's (diffusion.type: elucidated): auto, heun or "
                             "dpmpp"),
            std::string::npos)
      << ddim.output;
  auto bound = run_command(diffuse_exe() + " eval --ckpt " + ckpt + " --data " + data().string() + " --n 4");
  EXPECT_NE(bound.exit_code, 0);
  EXPECT_NE(bound.output.find("the variational bound (bits/dim) is defined for diffusion.type: gaussian"),
            std::string::npos)
      << bound.output;
  // A gaussian-only key given to an elucidated run is refused before training, naming it.
  auto timesteps = train(1, path("refused"), "--set diffusion.timesteps=50");
  EXPECT_NE(timesteps.exit_code, 0);
  EXPECT_NE(timesteps.output.find("diffusion.timesteps"), std::string::npos) << timesteps.output;
  EXPECT_NE(timesteps.output.find("belongs to diffusion.type: gaussian"), std::string::npos) << timesteps.output;
  EXPECT_FALSE(fs::exists(path("refused") / "checkpoints"));
}

/// Post-hoc EMA through the CLI: snapshots on disk, resume, synthesis for export/sample and the sweep.
class Posthoc : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = with_shapes(); }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path path(const std::string& name) { return dir_->path() / name; }
  static CommandResult train(const fs::path& run_dir, const std::string& extra = "") {
    return run_command(mpirun(2) + diffuse_exe() + " train -c " +
                       (source_dir() / "configs/tiny-karras.yaml").string() +
                       " --set data.path=" + path("shapes16.h5").string() +
                       " --set ema.posthoc.sigma_rels=[0.05,0.28] --set ema.posthoc.snapshot_every=5 --run-dir " +
                       run_dir.string() + " " + extra);
  }
  static fs::path snapshot(const fs::path& run_dir, const std::string& sigma_rel, int step) {
    char name[32];
    std::snprintf(name, sizeof name, "step-%06d", step);
    return run_dir / "posthoc" / ("sigma_rel-" + sigma_rel) / name;
  }
  static trainer::NamedTensors read(const fs::path& dir) { return trainer::read_checkpoint_single_process(dir).replicated; }
  static TempDir* dir_;
};
TempDir* Posthoc::dir_ = nullptr;

TEST_F(Posthoc, SnapshotsAreStoredResumedAndSynthesized) {
  auto full = path("full");
  auto trained = train(full);
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  EXPECT_NE(trained.output.find("post-hoc EMA snapshot at step 20: 2 profile(s)"), std::string::npos)
      << trained.output;
  // Every 5 steps, each profile: its own checkpoint (manifest, checksummed shards of both ranks), bf16.
  int64_t parameters = 0, tensors = 0;
  for (const auto& [name, tensor] : read(snapshot(full, "0.05", 20))) {
    EXPECT_EQ(tensor.scalar_type(), torch::kBFloat16) << name;
    parameters += tensor.numel();
    ++tensors;
  }
  for (std::string sigma : {"0.05", "0.28"}) {
    for (int step : {5, 10, 15, 20}) {
      auto dir = snapshot(full, sigma, step);
      ASSERT_TRUE(fs::exists(dir / "manifest.json")) << dir;
      auto manifest = trainer::parse_manifest(read_file(dir / "manifest.json"), dir.string());
      EXPECT_EQ(manifest.shards.size(), 2u) << "split across the ranks";
      std::map<std::string, std::string> metadata(manifest.metadata.begin(), manifest.metadata.end());
      EXPECT_EQ(metadata.at("posthoc_ema_step"), std::to_string(step));
      // The stated bound: 2 bytes per parameter (bf16) plus the per-tensor and per-file overhead of
      // HDF5 and the manifest (about 1.2 KB per tensor, 4 KB per shard, measured), nothing else.
      int64_t bytes = 0;
      for (const auto& entry : fs::directory_iterator(dir)) bytes += static_cast<int64_t>(entry.file_size());
      EXPECT_LE(bytes, 2 * parameters + 1536 * tensors + 8192 * 2) << dir;
    }
  }

  // Resume from step 10 of a copy: the snapshots after it (15, 20) are the interrupted future's and
  // are removed, then written again identically; the weights end bit-identical.
  auto split = path("split");
  auto first = train(split, "--set train.steps=15 --set checkpoint.every=10");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  ASSERT_TRUE(fs::exists(snapshot(split, "0.28", 15)));
  auto resumed = train(split, "--resume step-000010");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("removed 2 post-hoc EMA snapshot(s) after step 10"), std::string::npos)
      << resumed.output;
  for (std::string sigma : {"0.05", "0.28"}) {
    auto a = read(snapshot(full, sigma, 20)), b = read(snapshot(split, sigma, 20));
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  }

  // Synthesis: a stored profile at the last step comes back as that snapshot (the solve puts all the
  // weight on it); another width is a genuine combination; export, sample and eval take it.
  auto out = path("posthoc-0.05.safetensors");
  auto exported = run_command(diffuse_exe() + " export --ckpt " + (full / "checkpoints/latest").string() +
                              " --posthoc-sigma-rel 0.05 --out " + out.string());
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_NE(exported.output.find("posthoc.0.05 weights"), std::string::npos) << exported.output;
  auto synthesized = model::load_safetensors(out).tensors;
  auto stored = read(snapshot(full, "0.05", 20));
  ASSERT_EQ(synthesized.size(), stored.size());
  for (size_t i = 0; i < stored.size(); ++i) {
    EXPECT_EQ(synthesized[i].first, stored[i].first);
    EXPECT_LT((synthesized[i].second - stored[i].second.to(torch::kFloat)).abs().max().item<double>(), 1e-4)
        << stored[i].first;
  }
  auto other = path("posthoc-0.15.safetensors");
  auto exported_other = run_command(diffuse_exe() + " export --ckpt " + (full / "checkpoints/latest").string() +
                                    " --posthoc-sigma-rel 0.15 --out " + other.string());
  ASSERT_EQ(exported_other.exit_code, 0) << exported_other.output;
  EXPECT_NE(read_file(out), read_file(other));
  auto sampled = run_command(diffuse_exe() + " sample --ckpt " + full.string() +
                             " --posthoc-sigma-rel 0.15 --n 2 --steps 3 --out-h5 " + path("posthoc.h5").string());
  EXPECT_EQ(sampled.exit_code, 0) << sampled.output;

  // The sweep: each width measured, the best named.
  auto fixtures = fs::path(source_dir()) / "tests/trainer/fixtures";
  auto ref = path("ref.stats.h5");
  auto stats = run_command(diffuse_exe() + " stats --data " + path("shapes16.h5").string() + " --features " +
                           (fixtures / "tiny_features.pt").string() + " -o " + ref.string());
  ASSERT_EQ(stats.exit_code, 0) << stats.output;
  auto sweep = run_command(diffuse_exe() + " eval --ckpt " + full.string() + " --fid --features " +
                           (fixtures / "tiny_features.pt").string() + " --ref " + ref.string() +
                           " --n 8 --steps 3 --posthoc-sigma-rel 0.05,0.15,0.28");
  ASSERT_EQ(sweep.exit_code, 0) << sweep.output;
  std::smatch best;
  ASSERT_TRUE(std::regex_search(sweep.output, best, std::regex("\\{\"posthoc_sweep\": \\[.*\\], \"best_sigma_rel\": ([0-9.]+)")))
      << sweep.output;
  EXPECT_NE(sweep.output.find("best post-hoc EMA width by FID: sigma_rel " + best[1].str()), std::string::npos);

  // Refusals: a width beyond what a power profile can have; a run without snapshots.
  auto wide = run_command(diffuse_exe() + " export --ckpt " + full.string() + " --posthoc-sigma-rel 0.5 --out " +
                          path("x.safetensors").string());
  EXPECT_NE(wide.exit_code, 0);
  EXPECT_NE(wide.output.find("post-hoc EMA sigma_rel '0.5': expected a relative width in (0, 0.30"), std::string::npos)
      << wide.output;
  fs::remove_all(full / "posthoc");
  auto none = run_command(diffuse_exe() + " export --ckpt " + full.string() + " --posthoc-sigma-rel 0.1 --out " +
                          path("x.safetensors").string());
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.output.find("no post-hoc EMA snapshots"), std::string::npos) << none.output;
}

INSTANTIATE_TEST_SUITE_P(Formulations, Edm,
                         ::testing::Values(Flavour{"tiny-edm", "unet", "Unet"},
                                           Flavour{"tiny-karras", "karras", "KarrasUnet"}),
                         [](const auto& info) { return info.param.golden; });

}  // namespace
}  // namespace diffuse::testing
