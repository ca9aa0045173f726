// Unit tests of the trainer's small parts: configuration, EMA, loss scaler, LR schedule,
// timestep sampler and the metrics log. Closed forms and injected failures, no training.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>

#include "support.h"
#include "trainer/config.h"
#include "trainer/ema.h"
#include "trainer/optimization.h"
#include "trainer/run_directory.h"
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
                                         {"log.sample_steps=5000", "log.sample_steps"}}) {
    Config config;
    config.data.path = "x.h5";
    config.apply_override(c.assignment);
    auto message = error_of([&] { config.validate(); });
    EXPECT_NE(message.find(c.key), std::string::npos) << c.assignment << ": " << message;
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
  EXPECT_EQ(config.train.precision, "bf16");
  EXPECT_EQ(config.data.path, "/tmp/a=b.h5");
  EXPECT_NE(error_of([&] { config.apply_override("train.nope=1"); }).find("train.nope"), std::string::npos);
  EXPECT_NE(error_of([&] { config.apply_override("steps=1"); }).find("section.key=value"), std::string::npos);
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
  auto state = ema.state({"w"});
  Ema other({torch::zeros({4, 4})}, EmaOptions{.decays = {0.99, 0.9}, .update_every = 1, .update_after_step = 0});
  other.load_state(state, {"w"});
  EXPECT_EQ(other.step(), ema.step());
  EXPECT_TRUE(torch::equal(other.shadow(1)[0], ema.shadow(1)[0]));
  EXPECT_NE(error_of([&] { other.load_state({}, {"w"}); }).find("ema_state.step"), std::string::npos);
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
  LrSchedule constant{.base_lr = 1.0, .warmup_steps = 4, .kind = "constant", .total_steps = 100};
  EXPECT_DOUBLE_EQ(constant.at(0), 0.25);
  EXPECT_DOUBLE_EQ(constant.at(3), 1.0);
  EXPECT_DOUBLE_EQ(constant.at(50), 1.0);
  LrSchedule cosine{.base_lr = 1.0, .warmup_steps = 0, .kind = "cosine", .total_steps = 100, .min_lr_ratio = 0.1};
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
  TimestepSampler sampler("uniform", 10);
  torch::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1);
  auto draw = sampler.sample(1000, generator, torch::kCPU);
  EXPECT_EQ(draw.t.min().item<int64_t>(), 0);
  EXPECT_EQ(draw.t.max().item<int64_t>(), 9);
  EXPECT_TRUE(torch::equal(draw.weights, torch::ones({1000})));
}

TEST(TimestepSampler, LossAwareFollowsSecondMomentAndIsUnbiased) {
  TimestepSampler sampler("loss-aware", 4);
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
  TimestepSampler restored("loss-aware", 4);
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

}  // namespace
}  // namespace diffuse::trainer
