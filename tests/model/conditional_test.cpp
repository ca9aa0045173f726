// Classifier-free guidance: the ConditionalUnet and a GaussianDiffusion around it against the
// reference's classifier_free_guidance module (golden/unet_cfg.safetensors and the cfg_* cases of
// golden/cases.safetensors, written by golden/generate.py), plus the API's own contracts.
//
// Achieved relative max errors (max |ours - reference| / max |reference|), CPU float32. With one
// thread (OMP_NUM_THREADS=1, as ctest runs it, and as generate.py ran the reference) every value
// below is bit-identical: error 0. With torch's default threads, reductions round differently:
//   forward kept / dropped / randomly dropped            1.6e-6
//   forward_with_cond_scale, 7 settings (guided, null)   8.8e-6
//   losses (3 cases)                                     2.1e-7
//   training step: loss 1.1e-7, 8 gradients 1.3e-5, grad norm 2.9e-6
//   sampler replays (DDPM, DDIM eta 0 / 0.5 / 1)         2.4e-5
// The limits asserted below hold in both modes.
#include <gtest/gtest.h>

#include <iomanip>
#include <sstream>

#include "model_support.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using model::ConditionalUnet;
using model::ConditionalUnetOptions;
using model::DiffusionOptions;
using model::GaussianDiffusion;

std::string sci(double v) {
  std::ostringstream out;
  out << std::scientific << std::setprecision(2) << v;
  return out.str();
}

/// Checks `ours` against golden tensor `key` within `limit` (relative max error) and records it.
void expect_golden(const torch::Tensor& ours, const std::string& key, double limit) {
  const auto& expected = cases().at(key);
  ASSERT_EQ(ours.sizes(), expected.sizes()) << key;
  const double err = relative_max_error(ours, expected);
  EXPECT_LT(err, limit) << key;
  ::testing::Test::RecordProperty(key, sci(err));
}

ConditionalUnetOptions tiny_conditional_options(int64_t num_classes = 3) {
  ConditionalUnetOptions o;
  o.dim = 4;
  o.num_classes = num_classes;
  o.dim_mults = {1, 2};
  o.attn_heads = 2;
  o.attn_dim_head = 8;
  return o;
}

DiffusionOptions small_diffusion_options() {
  DiffusionOptions o;
  o.image_size = 8;
  o.timesteps = 30;
  return o;
}

TEST(GoldenConditional, WeightsLoadStrictlyInTheReferenceStateDictOrder) {
  auto file = load_golden("unet_cfg.safetensors");
  EXPECT_NE(file.str("@generated").find("generate.py"), std::string::npos);
  ConditionalUnet unet(ConditionalUnetOptions::from_json(file.str("conditional_unet_options")));
  auto ours = model::state_dict(*unet);
  std::istringstream keys(file.str("keys"));
  std::string key;
  size_t i = 0;
  while (std::getline(keys, key)) {
    ASSERT_LT(i, ours.size()) << "reference has more entries, next " << key;
    EXPECT_EQ(ours[i].first, key) << "entry " << i;
    EXPECT_EQ(ours[i].second.sizes(), file.tensors.at(key).sizes()) << key;
    ++i;
  }
  EXPECT_EQ(i, ours.size());
  EXPECT_EQ(ours.front().first, "null_classes_emb");  // the U-Net's own parameter precedes its children
  EXPECT_NO_THROW(model::load_state_dict(*unet, file.ordered));
}

TEST(GoldenConditional, SeededInitialisationMatchesPythonBitForBit) {
  auto file = load_golden("unet_cfg.safetensors");
  torch::manual_seed(std::stoull(file.str("seed")));
  ConditionalUnet unet(ConditionalUnetOptions::from_json(file.str("conditional_unet_options")));
  for (const auto& [key, tensor] : model::state_dict(*unet)) {
    EXPECT_TRUE(torch::equal(tensor, file.tensors.at(key))) << key;
  }
}

TEST(GoldenConditional, ForwardWithKeptDroppedAndRandomlyDroppedClasses) {
  const auto& g = cases();
  auto unet = golden_conditional_unet();
  const auto& x = g.at("cfg_forward.x");
  const auto& t = g.at("cfg_forward.t");
  const auto& classes = g.at("cfg_forward.classes");
  torch::NoGradGuard no_grad;
  expect_golden(unet->forward(x, t, classes), "cfg_forward.kept", 1e-5);
  expect_golden(unet->forward(x, t, classes, torch::zeros({4}, torch::kBool)), "cfg_forward.dropped", 1e-5);
  // The reference draws its dropout mask from the global generator; ours from the one passed in.
  auto keep = unet->draw_keep_mask(4, torch::kCPU, cpu_generator(std::stoull(g.str("cfg_forward.seed"))));
  EXPECT_TRUE(torch::equal(keep, g.at("cfg_forward.keep_mask")));
  expect_golden(unet->forward(x, t, classes, keep), "cfg_forward.random", 1e-5);
}

TEST(GoldenConditional, GuidedPredictionsAtSeveralScalesAndRescales) {
  const auto& g = cases();
  auto unet = golden_conditional_unet();
  torch::NoGradGuard no_grad;
  auto settings = util::json::parse(g.str("cfg_guidance"));
  ASSERT_GE(settings.as_array().size(), 5u);
  int i = 0;
  for (const auto& s : settings.as_array()) {
    const std::string c = "cfg_guided_" + std::to_string(i++);
    auto out = unet->forward_with_cond_scale(
        g.at("cfg_forward.x"), g.at("cfg_forward.t"), g.at("cfg_forward.classes"), s.find("cond_scale")->as_double(),
        s.find("rescaled_phi")->as_double(), s.find("remove_parallel_component")->as_bool(),
        s.find("keep_parallel_frac")->as_double());
    expect_golden(out.guided, c + ".out", 5e-5);
    if (g.tensors.count(c + ".null")) {
      expect_golden(out.null, c + ".null", 1e-5);
    } else {
      EXPECT_FALSE(out.null.defined()) << c << ": cond_scale 1 runs no unconditional pass";
    }
  }
}

TEST(GoldenConditional, TrainingLossesWithConditionDropoutMatchReference) {
  const auto& g = cases();
  for (std::string c : {"cfg_loss_noise", "cfg_loss_v_offset", "cfg_loss_x0_l1"}) {
    auto d = golden_conditional_diffusion(c);
    const auto noise = g.at(c + ".noise").clone();
    auto loss = d->training_losses(g.at(c + ".x_start"), g.at(c + ".t"), noise,
                                   cpu_generator(std::stoull(g.str(c + ".seed"))), g.at(c + ".classes"));
    EXPECT_TRUE(torch::equal(noise, g.at(c + ".noise"))) << c << ": the caller's noise was modified";
    expect_golden(loss, c + ".loss", 2e-6);
  }
}

TEST(GoldenConditional, OneTrainingStepLossAndGradientsMatchReference) {
  const auto& g = cases();
  auto d = golden_conditional_diffusion("cfg_train");
  d->train();
  auto loss = d->forward(g.at("cfg_train.img"), cpu_generator(std::stoull(g.str("cfg_train.seed"))),
                         g.at("cfg_train.classes"));
  loss.backward();
  expect_golden(loss.reshape({1}), "cfg_train.loss", 2e-6);
  std::map<std::string, torch::Tensor> params;
  for (const auto& item : d->conditional_model->named_parameters()) params.emplace(item.key(), item.value());
  std::istringstream keys(g.str("cfg_train.grad_keys"));
  std::string key;
  while (std::getline(keys, key, ',')) {
    ASSERT_TRUE(params.count(key)) << key;
    expect_golden(params.at(key).grad(), "cfg_train.grad." + key, 5e-5);
  }
  std::vector<torch::Tensor> norms;
  for (const auto& p : d->conditional_model->parameters()) norms.push_back(p.grad().norm());
  expect_golden(torch::stack(norms).norm().reshape({1}), "cfg_train.grad_norm", 5e-5);
}

TEST(GoldenConditional, GuidedSamplersMatchReferenceAndConsumeTheSameRandomNumbers) {
  const auto& g = cases();
  for (std::string c : {"cfg_sample_ddpm", "cfg_sample_ddim_eta0", "cfg_sample_ddim_eta05", "cfg_sample_ddim_noise"}) {
    auto d = golden_conditional_diffusion(c);
    auto gen = cpu_generator(std::stoull(g.str(c + ".seed")));
    auto sampling = d->options().reference_sample_options();
    sampling.cond_scale = std::stod(g.str(c + ".cond_scale"));
    sampling.rescaled_phi = std::stod(g.str(c + ".rescaled_phi"));
    const auto& classes = g.at(c + ".classes");
    auto samples = d->sample(classes.size(0), sampling, gen, classes);
    // Guidance multiplies (cond_scale - 1) the difference of two predictions, and x0 from a noise
    // prediction divides by sqrt(alpha_bar): perturbing the weights by 1e-6 (relative) moves the
    // reference's own samples by 1.4e-5 to 5.5e-5 here. Single-threaded (as ctest runs it) ours are
    // bit-identical; multi-threaded reductions round differently, hence the margin.
    expect_golden(samples, c + ".samples", 1e-4);
    EXPECT_TRUE(torch::equal(torch::randn({4}, gen), g.at(c + ".next_draw"))) << c << ": different number of draws";
  }
}

// ---- contracts beyond the golden values

TEST(ConditionalUnet, KeepMaskAtProbabilityZeroOrOneDrawsNothing) {
  seed_everything(1);
  ConditionalUnet unet(tiny_conditional_options());
  for (double p : {0.0, 1.0}) {
    auto gen = cpu_generator(5);
    auto keep = unet->draw_keep_mask(6, torch::kCPU, gen, p);
    EXPECT_TRUE(torch::equal(keep, torch::full({6}, p == 0.0, torch::kBool))) << p;
    EXPECT_TRUE(torch::equal(torch::rand({3}, gen), torch::rand({3}, cpu_generator(5)))) << p << " consumed draws";
  }
  // In between, the frequency follows the probability.
  auto keep = unet->draw_keep_mask(20000, torch::kCPU, cpu_generator(6), 0.25);
  EXPECT_NEAR(keep.to(torch::kFloat64).mean().item<double>(), 0.75, 0.01);
}

TEST(ConditionalUnet, DroppedClassesAllGiveTheNullPrediction) {
  seed_everything(2);
  ConditionalUnet unet(tiny_conditional_options());
  torch::NoGradGuard no_grad;
  auto x = torch::randn({3, 3, 8, 8});
  auto t = torch::tensor({5, 5, 5});
  auto x_same = x[0].unsqueeze(0).expand({3, -1, -1, -1}).contiguous();
  auto dropped = unet->forward(x_same, t, torch::tensor({0, 1, 2}), torch::zeros({3}, torch::kBool));
  expect_allclose(dropped[1], dropped[0], 0, 1e-6, "class 1 vs 0 when dropped");
  expect_allclose(dropped[2], dropped[0], 0, 1e-6, "class 2 vs 0 when dropped");
  auto kept = unet->forward(x_same, t, torch::tensor({0, 1, 2}));
  EXPECT_GT((kept[1] - kept[0]).abs().max().item<double>(), 1e-4) << "classes must change the prediction";
}

TEST(ConditionalUnet, RejectsBadClassesWithActionableMessages) {
  seed_everything(3);
  ConditionalUnet unet(tiny_conditional_options());
  auto x = torch::randn({2, 3, 8, 8});
  auto t = torch::tensor({1, 2});
  EXPECT_TRUE(throws_with([&] { unet->forward(x, t, torch::tensor({0, 3})); }, {"[0, 3)", "0 to 3"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(x, t, torch::tensor({0})); }, {"one class per image", "[2]"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(x, t, torch::tensor({0.5, 1.0})); }, {"int64"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(x, t, torch::tensor({0, 1}), torch::ones({2})); }, {"keep_mask", "bool"}));
}

TEST(ConditionalUnetOptions, JsonRoundTripAndValidation) {
  auto o = tiny_conditional_options(7);
  o.cond_drop_prob = 0.2;
  o.init_dim = 6;
  EXPECT_EQ(ConditionalUnetOptions::from_json(o.to_json()), o);
  EXPECT_TRUE(throws_with([] { ConditionalUnetOptions::from_json(R"({"num_classes":0})"); }, {"num_classes", "0"}));
  EXPECT_TRUE(throws_with([] { ConditionalUnetOptions::from_json(R"({"cond_drop_prob":1.5})"); }, {"cond_drop_prob"}));
  EXPECT_TRUE(throws_with([] { ConditionalUnetOptions::from_json(R"({"full_attn":true})"); }, {"full_attn", "unknown"}));
}

TEST(ConditionalDiffusion, ClassesAreRequiredExactlyWhenConditional) {
  seed_everything(4);
  GaussianDiffusion cond(ConditionalUnet(tiny_conditional_options()), small_diffusion_options());
  GaussianDiffusion plain(model::Unet(tiny_unet_options()), small_diffusion_options());
  EXPECT_TRUE(cond->conditional());
  EXPECT_EQ(cond->num_classes(), 3);
  EXPECT_EQ(plain->num_classes(), 0);
  EXPECT_EQ(cond->denoiser().get(), cond->conditional_model.get());
  EXPECT_EQ(model::state_dict(*cond)[13].first, "model.null_classes_emb");
  auto img = torch::rand({2, 3, 8, 8});
  auto labels = torch::tensor({0, 2});
  EXPECT_TRUE(throws_with([&] { cond->forward(img, cpu_generator(0)); }, {"class-conditional", "classes"}));
  EXPECT_TRUE(throws_with([&] { plain->forward(img, cpu_generator(0), labels); }, {"unconditional"}));
  model::SampleOptions s;
  s.steps = 2;
  EXPECT_TRUE(throws_with([&] { cond->sample(2, s, cpu_generator(0)); }, {"class-conditional"}));
  EXPECT_TRUE(throws_with([&] { cond->sample(3, s, cpu_generator(0), labels); }, {"one class per image", "[3]"}));
  auto loss = cond->forward(img, cpu_generator(0), labels);
  EXPECT_TRUE(std::isfinite(loss.item<double>()));
  auto images = cond->sample(2, s, cpu_generator(0), labels);
  EXPECT_EQ(images.sizes(), (std::vector<int64_t>{2, 3, 8, 8}));
}

TEST(ConditionalDiffusion, RefusesALearnedVarianceConditionalUnet) {
  auto o = tiny_conditional_options();
  o.learned_variance = true;
  EXPECT_TRUE(throws_with([&] { GaussianDiffusion(ConditionalUnet(o), small_diffusion_options()); },
                          {"out_dim == channels", "learned variance"}));
}

TEST(ConditionalDiffusion, GuidanceOptionsAreValidated) {
  model::SampleOptions s;
  s.rescaled_phi = 1.5;
  EXPECT_TRUE(throws_with([&] { s.validate(1000); }, {"rescaled_phi", "[0, 1]"}));
  s.rescaled_phi = 0.7;
  s.cond_scale = std::numeric_limits<double>::infinity();
  EXPECT_TRUE(throws_with([&] { s.validate(1000); }, {"cond_scale", "finite"}));
}

// With cond_scale 1 guidance is off: the sampler must give what the plain conditional U-Net gives,
// which a hand-written DDIM loop over forward() reproduces.
TEST(ConditionalDiffusion, ScaleOneSamplesWithTheConditionalPredictionAlone) {
  seed_everything(5);
  auto options = small_diffusion_options();
  options.objective = "pred_x0";
  GaussianDiffusion d(ConditionalUnet(tiny_conditional_options()), options);
  d->eval();
  model::SampleOptions s;
  s.steps = 3;
  s.cond_scale = 1.0;
  auto labels = torch::tensor({1, 0});
  auto noise = torch::randn({2, 3, 8, 8});
  auto guided = d->sample_from(noise, s, cpu_generator(9), labels);
  s.cond_scale = 4.0;
  auto stronger = d->sample_from(noise, s, cpu_generator(9), labels);
  EXPECT_GT((guided - stronger).abs().max().item<double>(), 1e-5) << "cond_scale must matter";
  torch::NoGradGuard no_grad;
  auto img = noise;
  const std::vector<int64_t> times{29, 19, 9, -1};  // linspace(-1, 29, 4) truncated, reversed
  for (size_t i = 0; i + 1 < times.size(); ++i) {
    auto t = torch::full({2}, times[i], torch::kLong);
    auto x0 = d->conditional_model->forward(img, t, labels).clamp(-1, 1);
    if (times[i + 1] < 0) {
      img = x0;
      break;
    }
    auto eps = d->predict_noise_from_start(img, t, x0);
    auto an = d->alphas_cumprod[times[i + 1]];
    img = x0 * an.sqrt() + (1 - an).sqrt() * eps;  // eta 0: the drawn noise has weight 0
  }
  expect_allclose(guided, (img + 1) * 0.5, 1e-5, 1e-6, "cond_scale 1");
}

}  // namespace
}  // namespace diffuse::testing
