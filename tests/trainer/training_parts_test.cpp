// Unit tests of the trainer's small parts: configuration, EMA, loss scaler, LR schedule,
// timestep sampler and the metrics log. Closed forms and injected failures, no training.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <utility>

#include "support.h"
#include "trainer/config.h"
#include "trainer/checkpoint_manifest.h"
#include "trainer/ema.h"
#include "trainer/model_factory.h"
#include "trainer/nonfinite_guard.h"
#include "trainer/optimization.h"
#include "trainer/run_directory.h"
#include "trainer/sampling.h"
#include "trainer/timestep_sampler.h"

namespace diffuse::trainer {
namespace {

using diffuse::testing::error_of;
using diffuse::testing::TempDir;

// ---------------------------------------------------------------------------------------------
// Config

TEST(Config, YamlRoundTripsExactly) {
  Config config;
  config.data.path = "data/x.h5";
  config.model.dim_mults = {1, 2};
  config.model.full_attn = {false, true};
  config.ema.decay = {0.9999, 0.999};
  config.train.lr = 2e-4;
  config.train.adam_eps = 1e-8;
  auto text = config.to_yaml();
  auto back = Config::from_yaml(text);
  EXPECT_EQ(back.to_yaml(), text);
  EXPECT_EQ(back.ema.decay, (std::vector<double>{0.9999, 0.999}));
  EXPECT_EQ(back.train.lr, 2e-4);
  EXPECT_EQ(back.model.full_attn, (std::vector<bool>{false, true}));
}

TEST(Config, ShippedConfigsParseAndValidate) {
  auto dir = std::filesystem::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "configs";
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    auto config = Config::from_yaml_file(entry.path());
    EXPECT_NO_THROW(config.validate());
    ++count;
  }
  EXPECT_GE(count, 5);
}

// bench/formulations.sh compares these two configs as "DDPM vs EDM with everything else equal";
// a change to one of them alone (data, optimizer, batch, EMA, network shape) would make that
// comparison quietly unfair.
TEST(Config, Mnist32EdmDiffersFromMnist32OnlyInTheFormulation) {
  auto dir = std::filesystem::path(std::getenv("DIFFUSE_SOURCE_DIR")) / "configs";
  auto ddpm = Config::from_yaml_file(dir / "mnist32.yaml").values();
  auto edm = Config::from_yaml_file(dir / "mnist32-edm.yaml").values();
  ASSERT_EQ(ddpm.size(), edm.size());
  const std::set<std::string> formulation_keys{
      "diffusion.type", "diffusion.timesteps", "diffusion.objective", "diffusion.beta_schedule",
      "model.learned_sinusoidal_cond", "model.learned_sinusoidal_dim",  // EDM's Unet needs Fourier time
      "ema.posthoc.sigma_rels", "ema.posthoc.snapshot_every",           // EDM2's post-hoc EMA, on top
      "log.sample_steps"};                                              // Heun costs 2 evaluations a step
  std::set<std::string> differing;
  for (size_t i = 0; i < ddpm.size(); ++i) {
    ASSERT_EQ(ddpm[i].first, edm[i].first);
    if (ddpm[i].second != edm[i].second) differing.insert(ddpm[i].first);
  }
  for (const auto& key : differing) EXPECT_TRUE(formulation_keys.count(key)) << key << " differs";
  EXPECT_TRUE(differing.count("diffusion.type"));
}

TEST(Config, UnknownKeyNamesItAndTheAllowedKeys) {
  auto message = error_of([] { Config::from_yaml("train:\n  stepz: 10\n"); });
  EXPECT_NE(message.find("train.stepz"), std::string::npos) << message;
  EXPECT_NE(message.find("steps"), std::string::npos) << message;
}

TEST(Config, UnknownSectionIsRejected) {
  auto message = error_of([] { Config::from_yaml("trian:\n  steps: 10\n"); });
  EXPECT_NE(message.find("trian"), std::string::npos) << message;
}

TEST(Config, WrongTypeNamesKeyValueAndType) {
  auto message = error_of([] { Config::from_yaml("train:\n  steps: ten\n"); });
  EXPECT_NE(message.find("train.steps"), std::string::npos) << message;
  EXPECT_NE(message.find("ten"), std::string::npos) << message;
  EXPECT_NE(message.find("integer"), std::string::npos) << message;
}

TEST(Config, BadValuesFailValidationByName) {
  struct Case {
    std::string assignment, key;
  };
  for (const auto& c : std::vector<Case>{{"train.precision=fp8", "train.precision"},
                                         {"train.batch_size=0", "train.batch_size"},
                                         {"diffusion.objective=pred_eps", "diffusion.objective"},
                                         {"data.image_size=36", "data.image_size"},
                                         {"ema.decay=1.5", "ema.decay"},
                                         {"model.channels=2", "model.channels"},
                                         {"train.lr=-1", "train.lr"},
                                         {"log.sample_steps=5000", "log.sample_steps"},
                                         {"diffusion.loss_type=huber", "diffusion.loss_type"},
                                         {"model.num_classes=-1", "model.num_classes"},
                                         {"model.cond_drop_prob=1.5", "model.cond_drop_prob"}}) {
    Config config;
    config.data.path = "x.h5";
    // Choices are checked when read, ranges when validated: either way the key is named.
    auto message = error_of([&] {
      config.apply_override(c.assignment);
      config.validate();
    });
    EXPECT_NE(message.find(c.key), std::string::npos) << c.assignment << ": " << message;
  }
}

TEST(Config, FormulationKeysOfTheOtherTypeAreRefusedByName) {
  struct Case {
    std::vector<std::string> assignments;
    std::string key, why;
  };
  const std::vector<Case> cases{
      // gaussian-only keys under elucidated, and the reverse
      {{"diffusion.type=elucidated", "model.learned_sinusoidal_cond=true", "diffusion.timesteps=50"},
       "diffusion.timesteps", "belongs to diffusion.type: gaussian"},
      {{"diffusion.type=elucidated", "model.learned_sinusoidal_cond=true", "diffusion.timestep_sampler=loss-aware"},
       "diffusion.timestep_sampler", "belongs to diffusion.type: gaussian"},
      {{"diffusion.sigma_data=0.3"}, "diffusion.sigma_data", "belongs to diffusion.type: elucidated"},
      // the network's keys
      {{"model.type=karras_unet", "diffusion.type=elucidated", "model.dim_mults=[1,2]"}, "model.dim_mults",
       "belongs to model.type: unet"},
      {{"model.num_downsamples=2"}, "model.num_downsamples", "belongs to model.type: karras_unet"},
      {{"model.type=karras_unet"}, "model.type", "set diffusion.type: elucidated"},
      {{"diffusion.type=elucidated"}, "model.learned_sinusoidal_cond", "the reference asserts it"},
      {{"model.learned_sinusoidal_cond=true"}, "model.learned_sinusoidal_cond", "refuses a Fourier-time U-Net"},
      {{"diffusion.type=elucidated", "model.random_fourier_features=true", "model.num_classes=3"}, "model.num_classes",
       "passes its network no labels"},
      // ranges
      {{"diffusion.type=elucidated", "model.learned_sinusoidal_cond=true", "diffusion.sigma_max=0.001"},
       "diffusion.sigma_max", "> diffusion.sigma_min"},
      {{"model.type=karras_unet", "diffusion.type=elucidated", "model.dim_max=4", "model.dim=8"}, "model.dim_max",
       ">= model.dim"},
      {{"model.type=karras_unet", "diffusion.type=elucidated", "data.image_size=20"}, "data.image_size",
       "2^model.num_downsamples"},
      {{"diffusion.type=elucidated", "model.learned_sinusoidal_cond=true", "eval.every=10", "eval.features=f.pt",
        "eval.ref=r.h5", "eval.sampler=ddim"},
       "eval.sampler", "auto, heun or dpmpp"},
      {{"eval.every=10", "eval.features=f.pt", "eval.ref=r.h5", "eval.sampler=heun"}, "eval.sampler",
       "auto, ddim or ddpm"},
  };
  for (const auto& c : cases) {
    Config config;
    config.data.path = "x.h5";
    auto message = error_of([&] {
      for (const auto& assignment : c.assignments) config.apply_override(assignment);
      config.validate();
    });
    EXPECT_NE(message.find("config key " + c.key), std::string::npos) << c.key << ": " << message;
    EXPECT_NE(message.find(c.why), std::string::npos) << c.key << ": " << message;
  }
  // The two formulations' own configurations validate, and karras_unet needs no unet key.
  for (const std::vector<std::string>& ok :
       {std::vector<std::string>{"diffusion.type=elucidated", "model.learned_sinusoidal_cond=true"},
        std::vector<std::string>{"diffusion.type=elucidated", "model.random_fourier_features=true",
                                 "diffusion.P_mean=-0.4", "diffusion.S_churn=0"},
        std::vector<std::string>{"model.type=karras_unet", "diffusion.type=elucidated", "data.image_size=64"}}) {
    Config config;
    config.data.path = "x.h5";
    for (const auto& assignment : ok) config.apply_override(assignment);
    EXPECT_NO_THROW(config.validate()) << ok.back();
  }
}

TEST(Config, PosthocEmaIsANestedGroupThatRoundTrips) {
  auto nested = Config::from_yaml(
      "data:\n  path: x.h5\nema:\n  posthoc:\n    sigma_rels: [0.05, 0.28]\n    snapshot_every: 500\n"
      "    dtype: fp32\n");
  EXPECT_EQ(nested.ema.posthoc_sigma_rels, (std::vector<double>{0.05, 0.28}));
  EXPECT_EQ(nested.ema.posthoc_snapshot_every, 500);
  EXPECT_EQ(nested.ema.posthoc_dtype, SnapshotDtype::kFp32);
  EXPECT_NO_THROW(nested.validate());
  // Written with dotted keys, read back the same; --set takes the dotted key too.
  EXPECT_EQ(Config::from_yaml(nested.to_yaml()).to_yaml(), nested.to_yaml());
  Config flat;
  flat.apply_override("ema.posthoc.sigma_rels=[0.05,0.28]");
  flat.apply_override("ema.posthoc.snapshot_every=500");
  flat.apply_override("ema.posthoc.dtype=fp32");
  flat.data.path = "x.h5";
  EXPECT_EQ(flat.to_yaml(), nested.to_yaml());

  auto unknown = error_of([] { Config::from_yaml("ema:\n  posthoc:\n    sigma_rel: [0.1]\n"); });
  EXPECT_NE(unknown.find("unknown config key 'ema.posthoc.sigma_rel'"), std::string::npos) << unknown;
  for (const auto& [assignments, key] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"ema.posthoc.sigma_rels=[0.4]", "ema.posthoc.snapshot_every=10"}, "ema.posthoc.sigma_rels"},
           {{"ema.posthoc.sigma_rels=[0.1,0.1]", "ema.posthoc.snapshot_every=10"}, "ema.posthoc.sigma_rels"},
           {{"ema.posthoc.sigma_rels=[0.1]"}, "ema.posthoc.snapshot_every"},
           {{"ema.posthoc.snapshot_every=10"}, "ema.posthoc.snapshot_every"}}) {
    Config config;
    config.data.path = "x.h5";
    auto message = error_of([&] {
      for (const auto& assignment : assignments) config.apply_override(assignment);
      config.validate();
    });
    EXPECT_NE(message.find("config key " + key), std::string::npos) << message;
  }
}

TEST(Config, OverridesParseYamlValues) {
  Config config;
  config.apply_override("model.dim_mults=[1,2,4]");
  config.apply_override("ema.decay=0.999");
  config.apply_override("train.precision=bf16");
  config.apply_override("data.path=/tmp/a=b.h5");
  EXPECT_EQ(config.model.dim_mults, (std::vector<int64_t>{1, 2, 4}));
  EXPECT_EQ(config.ema.decay, (std::vector<double>{0.999}));
  EXPECT_EQ(config.train.precision, Precision::kBf16);
  EXPECT_EQ(config.data.path, "/tmp/a=b.h5");
  EXPECT_NE(error_of([&] { config.apply_override("train.nope=1"); }).find("train.nope"), std::string::npos);
  EXPECT_NE(error_of([&] { config.apply_override("steps=1"); }).find("section.key=value"), std::string::npos);
}

const char* kEvalYaml =
    "data:\n  path: x.h5\n"
    "checkpoint:\n  keep_best: kid\n"
    "eval:\n  every: 100\n  n: 500\n  features: net.pt\n  ref: x.stats.h5\n  sampler: ddpm\n  steps: 20\n"
    "  eta: 0.5\n  ema: 0.995\n  seed: 3\n";

TEST(Config, EvalSectionIsOffUnlessGivenAndRoundTrips) {
  Config off;
  off.data.path = "x.h5";
  EXPECT_EQ(off.eval.every, 0);
  EXPECT_EQ(off.checkpoint.keep_best, BestMetric::kNone);
  EXPECT_NO_THROW(off.validate());
  auto config = Config::from_yaml(kEvalYaml);
  EXPECT_NO_THROW(config.validate());
  EXPECT_EQ(config.eval.every, 100);
  EXPECT_EQ(config.eval.n, 500);
  EXPECT_EQ(config.eval.features, "net.pt");
  EXPECT_EQ(config.eval.ref, "x.stats.h5");
  EXPECT_EQ(config.eval.sampler, "ddpm");
  EXPECT_EQ(config.eval.steps, 20);
  EXPECT_EQ(config.eval.eta, 0.5);
  EXPECT_EQ(config.eval.ema, "0.995");
  EXPECT_EQ(config.eval.seed, 3);
  EXPECT_EQ(config.checkpoint.keep_best, BestMetric::kKid);
  EXPECT_EQ(Config::from_yaml(config.to_yaml()).to_yaml(), config.to_yaml());
  auto message = error_of([] { Config::from_yaml("eval:\n  evry: 10\n"); });
  EXPECT_NE(message.find("eval.evry"), std::string::npos) << message;
  EXPECT_NE(message.find("every"), std::string::npos) << message;
}

TEST(Config, EvalKeysAreCheckedByName) {
  for (const auto& [assignment, key] : std::vector<std::pair<std::string, std::string>>{
           {"eval.sampler=euler", "eval.sampler"},
           {"eval.n=1", "eval.n"},
           {"eval.steps=0", "eval.steps"},
           {"eval.steps=5000", "eval.steps"},
           {"eval.eta=-1", "eval.eta"},
           {"eval.ema=0.5", "eval.ema"},
           {"eval.features=", "eval.features"},
           {"eval.ref=", "eval.ref"},
           {"eval.seed=-1", "eval.seed"},
           {"eval.every=-1", "eval.every"},
           {"checkpoint.keep_best=psnr", "checkpoint.keep_best"}}) {
    auto config = Config::from_yaml(kEvalYaml);
    auto message = error_of([&] {
      config.apply_override(assignment);
      config.validate();
    });
    EXPECT_NE(message.find(key), std::string::npos) << assignment << ": " << message;
  }
  for (const std::string weights : {"ema", "online", "0.995"}) {
    auto config = Config::from_yaml(kEvalYaml);
    config.apply_override("eval.ema=" + weights);
    EXPECT_NO_THROW(config.validate()) << weights;
  }
}

TEST(Config, KeepBestAndEvalFilesNeedEvaluations) {
  Config config;
  config.data.path = "x.h5";
  config.apply_override("checkpoint.keep_best=fid");
  auto message = error_of([&] { config.validate(); });
  EXPECT_NE(message.find("checkpoint.keep_best"), std::string::npos) << message;
  EXPECT_NE(message.find("eval"), std::string::npos) << message;
  Config silent;
  silent.data.path = "x.h5";
  silent.apply_override("eval.features=net.pt");
  message = error_of([&] { silent.validate(); });
  EXPECT_NE(message.find("eval.every"), std::string::npos) << message;
}

TEST(Config, EvalAndKeepBestMayChangeOnResume) {
  Config saved;
  saved.data.path = "x.h5";
  auto current = Config::from_yaml(kEvalYaml);
  auto verdict = compare_for_resume(saved, current);
  EXPECT_TRUE(verdict.refused.empty());
  std::set<std::string> changed;
  for (const auto& change : verdict.allowed) changed.insert(change.key);
  EXPECT_TRUE(changed.count("eval.every") && changed.count("checkpoint.keep_best"));
}

TEST(Config, TensorBoardIsOnUnlessTurnedOff) {
  EXPECT_TRUE(Config{}.log.tensorboard);
  auto config = Config::from_yaml("log:\n  tensorboard: false\n");
  EXPECT_FALSE(config.log.tensorboard);
  EXPECT_FALSE(Config::from_yaml(config.to_yaml()).log.tensorboard);
  config.apply_override("log.tensorboard=true");
  EXPECT_TRUE(config.log.tensorboard);
}

TEST(Config, FolderAndFileWithoutSettingsAreRefused) {
  // Both used to train the built-in defaults (a 35.7 M-parameter model).
  TempDir dir;
  auto message = error_of([&] { Config::from_yaml_file(dir.path()); });
  EXPECT_NE(message.find("config " + dir.path().string() + " is a folder; give a YAML file"), std::string::npos)
      << message;
  for (const std::string text : {"", "\n  \n", "# model:\n#   dim: 32\n"}) {
    std::ofstream(dir / "empty.yaml") << text;
    message = error_of([&] { Config::from_yaml_file(dir / "empty.yaml"); });
    EXPECT_NE(message.find("config file " + (dir / "empty.yaml").string() + " holds no settings"), std::string::npos)
        << "'" << text << "': " << message;
  }
}

TEST(Config, InfinityAndNanAreRefusedForEveryFloatKey) {
  for (const std::string value : {".inf", "-.inf", ".nan", ".Inf", ".NaN"}) {
    auto message = error_of([&] { Config::from_yaml("train:\n  lr: " + value + "\n"); });
    EXPECT_NE(message.find("config key train.lr: got '" + value + "', expected a finite number"), std::string::npos)
        << message;
  }
  Config config;
  config.data.path = "x.h5";
  auto message = error_of([&] { config.apply_override("train.collective_timeout_s=.inf"); });
  EXPECT_NE(message.find("train.collective_timeout_s"), std::string::npos) << message;
  EXPECT_NE(message.find("finite"), std::string::npos) << message;
  message = error_of([&] { config.apply_override("ema.decay=[0.99, .nan]"); });
  EXPECT_NE(message.find("ema.decay"), std::string::npos) << message;
  // Set in code rather than parsed: validate() checks every float key by name.
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    std::string key;
    std::function<void(Config&)> set;
  };
  for (const auto& c : std::vector<Case>{{"train.adam_eps", [&](Config& x) { x.train.adam_eps = inf; }},
                                         {"diffusion.vlb_weight", [](Config& x) { x.diffusion.vlb_weight = std::nan(""); }},
                                         {"ema.power", [&](Config& x) { x.ema.power = inf; }},
                                         {"ema.decay", [&](Config& x) { x.ema.decay = {0.9, -inf}; }}}) {
    Config edited = config;
    c.set(edited);
    message = error_of([&] { edited.validate(); });
    EXPECT_NE(message.find("config key " + c.key + ": got "), std::string::npos) << c.key << ": " << message;
    EXPECT_NE(message.find("finite"), std::string::npos) << c.key << ": " << message;
  }
}

TEST(Config, RangesKeepConversionsFromOverflowing) {
  struct Case {
    std::string assignment, expected;
  };
  for (const auto& c : std::vector<Case>{
           // 1e16 s is 1e19 ms: it overflowed int64 milliseconds into a negative timeout.
           {"train.collective_timeout_s=1e16", "0.001 to 604800 seconds (7 days)"},
           {"train.collective_timeout_s=1e-6", "0.001 to 604800 seconds"},
           {"train.bucket_cap_mb=1e15", "<= 1048576 (1 TiB)"},
           {"train.loss_scale_init=1e39", "float32's largest"}}) {
    Config config;
    config.data.path = "x.h5";
    config.apply_override(c.assignment);
    auto message = error_of([&] { config.validate(); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.assignment << ": " << message;
  }
  Config config;
  config.data.path = "x.h5";
  config.apply_override("train.collective_timeout_s=604800");
  EXPECT_NO_THROW(config.validate());
}

TEST(Config, KeyOrSectionGivenTwiceIsAnError) {
  auto message = error_of([] { Config::from_yaml("train:\n  lr: 1e-4\n  steps: 5\n  lr: 2e-4\n"); });
  EXPECT_NE(message.find("config key train.lr is given twice (lines 2 and 4)"), std::string::npos) << message;
  message = error_of([] { Config::from_yaml("train:\n  lr: 1e-4\nmodel:\n  dim: 8\ntrain:\n  steps: 5\n"); });
  EXPECT_NE(message.find("config section 'train' is given twice (lines 1 and 5)"), std::string::npos) << message;
  // On the command line a repeated --set is deliberate: the last one wins.
  Config config;
  config.apply_override("train.lr=1e-4");
  config.apply_override("train.lr=3e-4");
  EXPECT_EQ(config.train.lr, 3e-4);
}

// ---------------------------------------------------------------------------------------------
// EMA (ema-pytorch semantics)

TEST(Ema, DecayMatchesEmaPytorchWarmup) {
  auto p = torch::zeros({1});
  Ema ema({p}, EmaOptions{.decays = {0.995}});
  // Reference values (REFERENCE.md §3): first lerp at internal step s=110 uses d = 0.79782, the cap
  // float32(0.995) is reached at s = 2930.
  EXPECT_NEAR(ema.decay_at(111, 0), 1 - std::pow(11.0, -2.0 / 3.0), 1e-6);
  EXPECT_NEAR(ema.decay_at(111, 0), 0.79782, 1e-5);
  EXPECT_EQ(ema.decay_at(101, 0), 0.0);
  EXPECT_EQ(ema.decay_at(2931, 0), static_cast<double>(0.995f));
  EXPECT_LT(ema.decay_at(2900, 0), static_cast<double>(0.995f));
}

TEST(Ema, FollowsClosedFormOverManySteps) {
  auto p = torch::zeros({3});
  EmaOptions options{.decays = {0.9, 0.5}, .update_every = 2, .update_after_step = 4};
  Ema ema({p}, options);
  // Replay ema-pytorch's update() by hand on doubles.
  std::vector<double> expected{0, 0};
  int64_t step = 0;
  bool initialized = false;
  for (int64_t k = 1; k <= 40; ++k) {
    p.fill_(static_cast<double>(k));
    ema.update();
    int64_t s = step++;
    for (size_t r = 0; r < 2; ++r) {
      if (!initialized) {
        expected[r] = k;
      } else if (s % 2 == 0) {
        if (s <= 4) {
          expected[r] = k;
        } else {
          double d = ema.decay_at(step, r);
          expected[r] += (1 - d) * (k - expected[r]);
        }
      }
    }
    initialized = true;
    for (size_t r = 0; r < 2; ++r) EXPECT_NEAR(ema.shadow(r)[0][0].item<double>(), expected[r], 1e-4) << k;
  }
  EXPECT_GT(ema.shadow(0)[0][0].item<double>(), ema.shadow(1)[0][0].item<double>() - 40);  // both track
  EXPECT_LT(ema.shadow(0)[0][0].item<double>(), ema.shadow(1)[0][0].item<double>());      // slower rate lags
}

TEST(Ema, StateRoundTrips) {
  auto p = torch::randn({4, 4});
  Ema ema({p}, EmaOptions{.decays = {0.99, 0.9}, .update_every = 1, .update_after_step = 0});
  for (int i = 0; i < 5; ++i) {
    p.add_(1.0);
    ema.update();
  }
  Ema other({torch::zeros({4, 4})}, EmaOptions{.decays = {0.99, 0.9}, .update_every = 1, .update_after_step = 0});
  other.load_state(ema.progress_state(), {ema.average_state(0, {"w"}), ema.average_state(1, {"w"})}, {"w"});
  EXPECT_EQ(other.step(), ema.step());
  EXPECT_TRUE(torch::equal(other.shadow(1)[0], ema.shadow(1)[0]));
  EXPECT_NE(error_of([&] { other.load_state({}, {{}, {}}, {"w"}); }).find("'step'"), std::string::npos);
  EXPECT_EQ(Ema::rate_text(0.9999), "0.9999");
}

// ---------------------------------------------------------------------------------------------
// Loss scaler

TEST(GradScaler, SkipsBacksOffAndGrows) {
  GradScaler scaler(GradScalerOptions{.enabled = true, .init_scale = 1024, .growth_interval = 3});
  auto g = torch::full({4}, 2048.0f);
  auto no_agreement = [](torch::Tensor&) {};
  EXPECT_FALSE(scaler.unscale_({g}, no_agreement));
  EXPECT_TRUE(torch::allclose(g, torch::full({4}, 2.0f)));
  scaler.update(false);
  auto bad = torch::tensor({1.0f, std::numeric_limits<float>::infinity()});
  EXPECT_TRUE(scaler.unscale_({bad}, no_agreement));
  scaler.update(true);
  EXPECT_EQ(scaler.scale_value(), 512);
  auto nan = torch::tensor({std::nanf("")});
  EXPECT_TRUE(scaler.unscale_({nan}, no_agreement));
  scaler.update(true);
  EXPECT_EQ(scaler.scale_value(), 256);
  for (int i = 0; i < 3; ++i) scaler.update(false);
  EXPECT_EQ(scaler.scale_value(), 512);
  EXPECT_EQ(scaler.total_skipped(), 2);
}

// A real backward through a layer on `device` (fp16 autocast on CUDA, as train.precision=fp16):
// an inf injected into one gradient is found by the fused check on that device, the step is
// skipped and the scale halves; the next, clean step unscales to the fp32 gradients.
void expect_scaler_skips_an_injected_inf(torch::Device device) {
  torch::manual_seed(3);
  torch::nn::Linear layer(16, 4);
  layer->to(device);
  auto x = torch::randn({8, 16}).to(device), y = torch::randn({8, 4}).to(device);
  auto params = layer->parameters();
  auto grads = [&] {
    std::vector<torch::Tensor> g;
    for (auto& p : params) g.push_back(p.grad());
    return g;
  };
  auto zero_grads = [&] {
    for (auto& p : params) p.mutable_grad().zero_();
  };
  auto loss = [&] {
    const bool fp16 = device.is_cuda();
    if (fp16) {
      at::autocast::set_autocast_enabled(device.type(), true);
      at::autocast::set_autocast_dtype(device.type(), torch::kHalf);
    }
    auto value = torch::mse_loss(layer->forward(x).to(torch::kFloat), y);
    if (fp16) {
      at::autocast::set_autocast_enabled(device.type(), false);
      at::autocast::clear_cache();
    }
    return value;
  };
  torch::mse_loss(layer->forward(x), y).backward();  // fp32 reference
  std::vector<torch::Tensor> expected;
  for (auto& g : grads()) expected.push_back(g.cpu().clone());
  zero_grads();

  GradScaler scaler(GradScalerOptions{.enabled = true, .init_scale = 1024});
  auto no_agreement = [](torch::Tensor&) {};
  scaler.scale(loss()).backward();
  {
    torch::NoGradGuard no_grad;
    params[0].mutable_grad().index_put_({1, 2}, std::numeric_limits<float>::infinity());
  }
  EXPECT_TRUE(scaler.unscale_(grads(), no_agreement)) << "the injected inf on " << device.str() << " was not found";
  scaler.update(true);
  EXPECT_EQ(scaler.scale_value(), 512);
  EXPECT_EQ(scaler.total_skipped(), 1);
  zero_grads();

  scaler.scale(loss()).backward();
  EXPECT_FALSE(scaler.unscale_(grads(), no_agreement));
  scaler.update(false);
  EXPECT_EQ(scaler.consecutive_skipped(), 0);
  const double rtol = device.is_cuda() ? 2e-2 : 1e-5, atol = device.is_cuda() ? 2e-3 : 1e-6;  // fp16 on CUDA
  auto got = grads();
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].device(), device);
    testing::expect_allclose(got[i].cpu(), expected[i], rtol, atol, "parameter " + std::to_string(i));
  }
}

TEST(GradScaler, SkipsAnInjectedInfInARealBackwardOnCpu) { expect_scaler_skips_an_injected_inf(torch::kCPU); }

TEST(GradScaler, SkipsAnInjectedInfInAnFp16BackwardOnTheGpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  expect_scaler_skips_an_injected_inf(torch::Device(torch::kCUDA, 0));
}

TEST(GradScaler, AgreementMakesEveryRankSkip) {
  GradScaler scaler(GradScalerOptions{.enabled = true});
  auto finite = torch::ones({3});
  // Another rank saw an inf: the agreed flag is 1 even though this rank's grads are finite.
  EXPECT_TRUE(scaler.unscale_({finite}, [](torch::Tensor& flag) { flag.fill_(1.0); }));
}

TEST(GradScaler, StopsWithDiagnosisWhenStuck) {
  GradScaler scaler(GradScalerOptions{.enabled = true, .init_scale = 1e6, .max_consecutive_skipped = 4});
  for (int i = 0; i < 3; ++i) scaler.update(true);
  EXPECT_THROW(scaler.update(true), LossScaleDiverged);
  GradScaler floor(GradScalerOptions{.enabled = true, .init_scale = 4, .max_consecutive_skipped = 100, .min_scale = 1});
  floor.update(true);
  floor.update(true);
  auto message = error_of([&] { floor.update(true); });
  EXPECT_NE(message.find("loss scale"), std::string::npos) << message;
}

TEST(GradScaler, DisabledIsIdentity) {
  GradScaler scaler(GradScalerOptions{.enabled = false});
  auto loss = torch::tensor(3.0f);
  EXPECT_EQ(scaler.scale(loss).item<float>(), 3.0f);
  auto g = torch::tensor({std::numeric_limits<float>::infinity()});
  EXPECT_FALSE(scaler.unscale_({g}, nullptr));
}

TEST(GradScaler, StateRoundTrips) {
  GradScaler scaler(GradScalerOptions{.enabled = true, .init_scale = 64});
  scaler.update(true);
  scaler.update(false);
  GradScaler other(GradScalerOptions{.enabled = true});
  other.load_state(scaler.state());
  EXPECT_EQ(other.scale_value(), 32);
  EXPECT_EQ(other.total_skipped(), 1);
}

// ---------------------------------------------------------------------------------------------
// LR schedule and clipping

TEST(LrSchedule, WarmupThenConstantOrCosine) {
  LrSchedule constant{.base_lr = 1.0, .warmup_steps = 4, .kind = LrScheduleKind::kConstant, .total_steps = 100};
  EXPECT_DOUBLE_EQ(constant.at(0), 0.25);
  EXPECT_DOUBLE_EQ(constant.at(3), 1.0);
  EXPECT_DOUBLE_EQ(constant.at(50), 1.0);
  LrSchedule cosine{.base_lr = 1.0, .warmup_steps = 0, .kind = LrScheduleKind::kCosine, .total_steps = 100, .min_lr_ratio = 0.1};
  EXPECT_DOUBLE_EQ(cosine.at(0), 1.0);
  EXPECT_NEAR(cosine.at(50), 0.1 + 0.9 * 0.5, 1e-12);
  EXPECT_NEAR(cosine.at(100), 0.1, 1e-12);
}

TEST(ClipGradNorm, MatchesTorchDefinition) {
  auto a = torch::tensor({3.0f, 0.0f}), b = torch::tensor({4.0f});
  auto norm = clip_grad_norm({a, b}, 1.0);
  EXPECT_NEAR(norm.item<double>(), 5.0, 1e-6);
  EXPECT_NEAR(a[0].item<double>(), 3.0 / (5.0 + 1e-6), 1e-6);
  EXPECT_NEAR(b[0].item<double>(), 4.0 / (5.0 + 1e-6), 1e-6);
  auto small = torch::tensor({0.1f});
  clip_grad_norm({small}, 1.0);
  EXPECT_FLOAT_EQ(small.item<float>(), 0.1f);  // never scaled up
}

// ---------------------------------------------------------------------------------------------
// Timestep sampler

TEST(TimestepSampler, UniformCoversRangeWithUnitWeights) {
  TimestepSampler sampler(TimestepSamplerKind::kUniform, 10);
  torch::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1);
  auto draw = sampler.sample(1000, generator, torch::kCPU);
  EXPECT_EQ(draw.t.min().item<int64_t>(), 0);
  EXPECT_EQ(draw.t.max().item<int64_t>(), 9);
  EXPECT_TRUE(torch::equal(draw.weights, torch::ones({1000})));
}

TEST(TimestepSampler, LossAwareFollowsSecondMomentAndIsUnbiased) {
  TimestepSampler sampler(TimestepSamplerKind::kLossAware, 4);
  EXPECT_FALSE(sampler.warmed_up());
  for (int round = 0; round < 10; ++round) {
    sampler.update(torch::tensor({0, 1, 2, 3}), torch::tensor({1.0, 1.0, 1.0, 3.0}));
  }
  ASSERT_TRUE(sampler.warmed_up());
  auto p = sampler.probabilities();
  // sqrt(E[L^2]) = (1, 1, 1, 3) -> (1/6, 1/6, 1/6, 1/2), mixed with 0.1% uniform.
  EXPECT_NEAR(p[3].item<double>(), 0.5 * 0.999 + 0.001 / 4, 1e-9);
  torch::Generator generator = at::make_generator<at::CPUGeneratorImpl>(2);
  auto draw = sampler.sample(20000, generator, torch::kCPU);
  // Importance weights keep the expected loss unchanged: E_p[w L] = mean_t L_t = 1.5.
  auto losses = torch::tensor({1.0, 1.0, 1.0, 3.0}).index_select(0, draw.t);
  EXPECT_NEAR((draw.weights.to(torch::kFloat64) * losses).mean().item<double>(), 1.5, 0.05);
  TimestepSampler restored(TimestepSamplerKind::kLossAware, 4);
  restored.load_state(sampler.state());
  EXPECT_TRUE(torch::equal(restored.probabilities(), p));
}

// ---------------------------------------------------------------------------------------------
// Metrics log

TEST(MetricsLogger, TruncateAfterKeepsOneConsistentHistory) {
  TempDir dir;
  MetricsLogger metrics(dir / "metrics.jsonl");
  for (int step = 10; step <= 50; step += 10) metrics.write({{"step", step}, {"loss", 1.0 / step}});
  metrics.truncate_after(30);
  metrics.write({{"step", 40}, {"loss", 0.5}});
  std::ifstream in(dir / "metrics.jsonl");
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_NE(lines[2].find("\"step\": 30"), std::string::npos) << lines[2];
  EXPECT_NE(lines[3].find("\"loss\": 0.5"), std::string::npos) << lines[3];
}

// ---------------------------------------------------------------------------------------------
// AdamW

TEST(AdamW, MatchesTorchAdamWAndRoundTripsItsState) {
  // One step of AdamW from zero moments: the update is lr * g / (|g| + eps) (bias-corrected),
  // plus decoupled weight decay lr * wd * w.
  auto w = torch::full({3}, 2.0f).requires_grad_(true);
  w.mutable_grad() = torch::tensor({0.5f, -1.0f, 2.0f});
  AdamW adam({w}, {"w"}, AdamWOptions{.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1});
  adam.step(0.01);
  auto expected = torch::tensor({2.0f * (1 - 0.001f) - 0.01f, 2.0f * (1 - 0.001f) + 0.01f, 2.0f * (1 - 0.001f) - 0.01f});
  EXPECT_TRUE(torch::allclose(w.detach(), expected, 1e-6, 1e-6)) << w;

  auto v = torch::full({3}, 2.0f).requires_grad_(true);
  AdamW restored({v}, {"w"}, AdamWOptions{.weight_decay = 0.1});
  restored.load_state(adam.state());
  auto state = restored.state();
  ASSERT_EQ(state.size(), 3u);
  EXPECT_EQ(state[0].first, "exp_avg.w");
  EXPECT_EQ(state[2].first, "step");
  EXPECT_EQ(state[2].second.item<float>(), 1.0f);
  EXPECT_TRUE(torch::equal(state[1].second, adam.state()[1].second));
  EXPECT_NE(error_of([&] { restored.load_state({}); }).find("exp_avg.w"), std::string::npos);
  auto wrong = adam.state();
  wrong[0].second = torch::zeros({4});
  EXPECT_NE(error_of([&] { restored.load_state(wrong); }).find("shape"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Resume compatibility

TEST(ResumeVerdict, RefusesOnlyWhatChangesTheWeightsMeaning) {
  Config saved;
  saved.data.path = "x.h5";
  Config current = saved;
  current.apply_override("log.sample_steps=20");
  current.apply_override("train.lr=1e-4");
  current.apply_override("diffusion.offset_noise_strength=0.1");
  current.apply_override("diffusion.vlb_weight=0.01");
  auto verdict = compare_for_resume(saved, current);
  EXPECT_TRUE(verdict.refused.empty());
  ASSERT_EQ(verdict.allowed.size(), 4u);
  EXPECT_EQ(verdict.allowed[0].key, "diffusion.offset_noise_strength");

  current.apply_override("model.dim=32");
  current.apply_override("diffusion.objective=pred_noise");
  verdict = compare_for_resume(saved, current);
  ASSERT_EQ(verdict.refused.size(), 2u);
  EXPECT_EQ(verdict.refused[0].key, "model.dim");
  EXPECT_EQ(verdict.refused[0].before, "64");
  EXPECT_EQ(verdict.refused[0].after, "32");
  auto message = resume_refusal_message("ckpt", verdict.refused);
  for (const char* expected : {"model.dim 64 -> 32", "diffusion.objective pred_v -> pred_noise", "new run directory"}) {
    EXPECT_NE(message.find(expected), std::string::npos) << message;
  }
}

TEST(ModelFactory, SamplingStepsAreNotPartOfTheDiffusion) {
  Config config;
  config.apply_override("log.sample_steps=7");
  EXPECT_FALSE(diffusion_options(config).sampling_timesteps.has_value());
  EXPECT_EQ(diffusion_options(config).objective, "pred_v");
}

TEST(ModelFactory, LossTypeAndImmiscibleReachTheDiffusion) {
  Config config;
  EXPECT_EQ(diffusion_options(config).loss_type, "l2");
  EXPECT_FALSE(diffusion_options(config).immiscible);
  config.apply_override("diffusion.loss_type=l1");
  config.apply_override("diffusion.immiscible=true");
  EXPECT_EQ(diffusion_options(config).loss_type, "l1");
  EXPECT_TRUE(diffusion_options(config).immiscible);
  EXPECT_EQ(Config::from_yaml(config.to_yaml()), config);
}

TEST(ModelFactory, NumClassesBuildsTheConditionalUnet) {
  Config config;
  config.data.path = "x.h5";
  config.data.image_size = 16;
  for (const char* set : {"model.dim=8", "model.dim_mults=[1, 2]", "model.num_classes=3", "model.cond_drop_prob=0.2",
                          "model.attn_heads=2", "model.attn_dim_head=8"}) {
    config.apply_override(set);
  }
  config.validate();
  auto diffusion = build_diffusion(config);
  ASSERT_TRUE(diffusion->conditional());
  EXPECT_EQ(diffusion->num_classes(), 3);
  EXPECT_EQ(diffusion->conditional_model->options().cond_drop_prob, 0.2);
  EXPECT_EQ(diffusion->conditional_model->options().attn_heads, 2);
  EXPECT_NE(unet_options_json(config).find("\"num_classes\""), std::string::npos);
  EXPECT_FALSE(build_diffusion(Config{})->conditional());
  // Keys the conditional U-Net lacks are refused by name, not ignored.
  for (const char* set : {"model.self_condition=true", "model.learned_variance=true", "model.dropout=0.1",
                          "model.full_attn=[true]", "model.flash_attn=true"}) {
    Config bad = config;
    bad.apply_override(set);
    auto key = std::string(set).substr(0, std::string(set).find('='));
    auto message = error_of([&] { bad.validate(); });
    EXPECT_NE(message.find(key), std::string::npos) << set << ": " << message;
    EXPECT_NE(message.find("model.num_classes"), std::string::npos) << message;
  }
}

TEST(ResumeVerdict, ClassCountDefinesTheModelTheLossDoesNot) {
  Config saved;
  saved.apply_override("model.num_classes=2");
  Config current = saved;
  for (const char* set : {"model.cond_drop_prob=0.1", "diffusion.loss_type=l1", "diffusion.immiscible=true"}) {
    current.apply_override(set);
  }
  auto verdict = compare_for_resume(saved, current);
  EXPECT_TRUE(verdict.refused.empty());
  EXPECT_EQ(verdict.allowed.size(), 3u);
  current.apply_override("model.num_classes=3");
  verdict = compare_for_resume(saved, current);
  ASSERT_EQ(verdict.refused.size(), 1u);
  EXPECT_EQ(verdict.refused[0].key, "model.num_classes");
}

TEST(Sampling, ClassListsAndFiles) {
  EXPECT_EQ(parse_class_list("all", 3), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(parse_class_list("0,2,2", 3), (std::vector<int64_t>{0, 2, 2}));
  EXPECT_NE(error_of([] { parse_class_list("0,3", 3); }).find("class 3 is outside [0, 3)"), std::string::npos);
  EXPECT_NE(error_of([] { parse_class_list("0,,1", 3); }).find("'' is not a class number"), std::string::npos);
  EXPECT_NE(error_of([] { parse_class_list("1x", 3); }).find("'1x' is not a class number"), std::string::npos);
  EXPECT_TRUE(torch::equal(class_rows({2, 0}, 2), torch::tensor({2, 2, 0, 0}, torch::kInt64)));
  TempDir dir;
  std::ofstream(dir / "c.txt") << "1 0,\n2\n";
  EXPECT_EQ(read_class_file(dir / "c.txt", 3), (std::vector<int64_t>{1, 0, 2}));
  std::ofstream(dir / "empty.txt") << "\n";
  EXPECT_NE(error_of([&] { read_class_file(dir / "empty.txt", 3); }).find("holds no classes"), std::string::npos);
  EXPECT_NE(error_of([&] { read_class_file(dir / "missing.txt", 3); }).find("missing.txt"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Checkpoint manifest (no MPI, no files)

TEST(CheckpointManifest, RoundTripsAndRejectsInconsistency) {
  Manifest m;
  m.step = 20;
  m.world_size = 2;
  m.created = "2026-12-02T00:00:00Z";
  m.diffuse_version = "0.1.0";
  m.git_hash = "abc";
  m.config = "model:\n  dim: 8\n";
  m.metadata = {{"elapsed_seconds", "1.5"}};
  for (int r = 0; r < 2; ++r) m.shards.push_back({shard_file_name(r, 2), r, 100 + r, std::string(64, 'a')});
  m.tensors.push_back({.name = "model.w", .shard = 1, .dtype = "float32", .shape = {2, 3}, .bytes = 24});
  m.tensors.push_back(
      {.name = "rank1.rng", .per_rank = true, .rank = 1, .shard = 1, .dtype = "uint8", .shape = {5}, .bytes = 5});
  auto text = manifest_to_json(m);
  auto back = parse_manifest(text, "test");
  EXPECT_EQ(manifest_to_json(back), text);
  EXPECT_EQ(back.tensors[1].rank, 1);

  auto broken = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    t.replace(at, from.size(), to);
    return error_of([&] { parse_manifest(t, "m.json"); });
  };
  EXPECT_NE(broken("\"bytes\": 24", "\"bytes\": 25").find("does not match float32 [2, 3]"), std::string::npos);
  EXPECT_NE(broken("\"world_size\": 2", "\"world_size\": 3").find("2 shards for world_size 3"), std::string::npos);
  EXPECT_NE(broken("\"format_version\": 1", "\"format_version\": 9").find("format_version 9"), std::string::npos);

  ShardRecord record{m.shards[1], {m.tensors[1]}};
  auto wire = shard_record_from_wire(shard_record_to_wire(record), "wire");
  EXPECT_EQ(wire.shard.sha256, record.shard.sha256);
  ASSERT_EQ(wire.per_rank_tensors.size(), 1u);
  EXPECT_EQ(wire.per_rank_tensors[0].name, "rank1.rng");
  EXPECT_THROW(checkpoint_dtype_name(torch::kComplexFloat), CheckpointError);
}

// ---------------------------------------------------------------------------------------------
// Divergence detection

TEST(NonfiniteGuard, FlagsTheStepNamesTheFirstCauseAndCountsRuns) {
  NonfiniteGuard guard(torch::kCPU);
  guard.add_losses(torch::tensor({0.5f, 0.25f}));
  auto drop = guard.end_step(torch::tensor({1.0f, 2.0f, 3.0f}), 1);
  EXPECT_EQ(drop.item<float>(), 0.0f);
  guard.add_losses(torch::tensor({0.5f}));
  drop = guard.end_step(torch::tensor({1.0f, NAN, INFINITY}), 2);
  EXPECT_EQ(drop.item<float>(), 1.0f);
  guard.add_losses(torch::tensor({INFINITY}));
  drop = guard.end_step(torch::tensor({1.0f, 1.0f, 1.0f}), 3);
  EXPECT_EQ(drop.item<float>(), 1.0f);
  auto report = guard.read();
  EXPECT_EQ(report.bad_steps, 2);
  EXPECT_EQ(report.consecutive, 2);
  EXPECT_EQ(report.first_step, 2);
  EXPECT_FALSE(report.first_was_loss);
  EXPECT_EQ(report.first_parameter, 1);
  guard.end_step(torch::tensor({1.0f}), 4);
  EXPECT_EQ(guard.read().consecutive, 0);
  EXPECT_EQ(guard.read().bad_steps, 2);
}

TEST(AdamW, ASkippedStepChangesNothing) {
  auto w = torch::full({3}, 2.0f).requires_grad_(true);
  w.mutable_grad() = torch::tensor({NAN, 1.0f, 1.0f});
  AdamW adam({w}, {"w"}, AdamWOptions{});
  adam.step(0.1, torch::ones({1}));
  EXPECT_TRUE(torch::equal(w.detach(), torch::full({3}, 2.0f))) << w;
  EXPECT_EQ(adam.state()[2].second.item<float>(), 0.0f);  // the step count was taken back
  w.mutable_grad() = torch::tensor({1.0f, 1.0f, 1.0f});
  adam.step(0.1, torch::zeros({1}));
  EXPECT_LT(w.detach()[0].item<float>(), 2.0f);
  EXPECT_EQ(adam.state()[2].second.item<float>(), 1.0f);
}

}  // namespace
}  // namespace diffuse::trainer
