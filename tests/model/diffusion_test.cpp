// Gaussian diffusion against theory: schedules and buffers against their closed forms, q_sample
// moments, the posterior, objective conversions, samplers (determinism, random-number consumption,
// range), loss plumbing, learned variance, the likelihood terms and the bits/dim of a perfect
// denoiser; and the overfit check (its own ctest entry, model_overfit).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <numbers>

#include "model/likelihood.h"
#include "model/schedules.h"
#include "model_support.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using model::DiffusionOptions;
using model::GaussianDiffusion;
using model::SampleOptions;
using model::Unet;
using model::UnetOptions;

GaussianDiffusion tiny_diffusion(int64_t channels, int64_t timesteps, const std::string& schedule = "cosine",
                                 const std::string& objective = "pred_v", int64_t image_size = 8,
                                 std::function<void(UnetOptions&)> tweak = {}) {
  auto uo = tiny_unet_options(channels, {1, 2});
  if (tweak) tweak(uo);
  DiffusionOptions o;
  o.image_size = image_size;
  o.timesteps = timesteps;
  o.beta_schedule = schedule;
  o.objective = objective;
  GaussianDiffusion d(Unet(uo), o);
  d->eval();
  return d;
}

double to_d(const torch::Tensor& t) { return t.item<double>(); }

SampleOptions ddim(int64_t steps, double eta) {
  SampleOptions s;
  s.sampler = "ddim";
  s.steps = steps;
  s.eta = eta;
  return s;
}

SampleOptions ddpm() {
  SampleOptions s;
  s.sampler = "ddpm";
  return s;
}

SampleOptions with_sampler(const std::string& name) {
  SampleOptions s;
  s.sampler = name;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Schedules and buffers

TEST(Schedules, LinearMatchesClosedForm) {
  for (int64_t T : {21, 100, 1000}) {
    auto b = model::linear_beta_schedule(T);
    ASSERT_EQ(b.scalar_type(), torch::kFloat64);
    ASSERT_EQ(b.size(0), T);
    const double s = 1000.0 / T, lo = s * 1e-4, hi = s * 0.02;
    for (int64_t i = 0; i < T; ++i) {
      EXPECT_NEAR(to_d(b[i]), lo + (hi - lo) * i / (T - 1), 1e-15) << T << " " << i;
    }
  }
  EXPECT_DOUBLE_EQ(to_d(model::linear_beta_schedule(1000)[999]), 0.02);
}

TEST(Schedules, CosineMatchesClosedForm) {
  const int64_t T = 1000;
  const double s = 0.008;
  auto f = [&](double t) {
    const double c = std::cos((t / T + s) / (1 + s) * std::numbers::pi / 2);
    return c * c;
  };
  auto b = model::cosine_beta_schedule(T);
  for (int64_t i = 0; i < T; ++i) {
    const double expected = std::min(1 - f(static_cast<double>(i + 1)) / f(static_cast<double>(i)), 0.999);
    EXPECT_NEAR(to_d(b[i]), expected, 1e-12) << i;
  }
  EXPECT_EQ(to_d(b[T - 1]), 0.999);  // clipped
}

TEST(Schedules, SigmoidMatchesClosedFormUpToTheFloat32Quirk) {
  const int64_t T = 1000;
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto ac = [&](double t) { return (-sig(t * 6 - 3) + sig(3)) / (sig(3) - sig(-3)); };
  auto b = model::sigmoid_beta_schedule(T);
  double worst = 0;
  for (int64_t i = 0; i < T; ++i) {
    const double ti = static_cast<double>(i) / T, tn = static_cast<double>(i + 1) / T;
    const double expected = std::clamp(1 - (ac(tn) / ac(0)) / (ac(ti) / ac(0)), 0.0, 0.999);
    worst = std::max(worst, std::abs(to_d(b[i]) - expected));
  }
  // The reference takes sigmoid(+-3) as float32 scalars and subtracts them in float32 (REFERENCE.md:
  // up to 6.5e-6 in betas): reproduced, so close to but not exactly the float64 formula.
  EXPECT_LT(worst, 1e-5);
  EXPECT_GT(worst, 1e-8);
  EXPECT_EQ(to_d(b[T - 1]), 0.999);
}

TEST(Schedules, AreValidProbabilitiesAndUnknownNamesThrow) {
  for (std::string name : {"linear", "cosine", "sigmoid"}) {
    auto b = model::beta_schedule(name, 200);
    EXPECT_TRUE((b > 0).all().item<bool>()) << name;
    EXPECT_TRUE((b <= 0.999).all().item<bool>()) << name;
    auto ac = torch::cumprod(1 - b, 0);
    EXPECT_TRUE((ac.slice(0, 1) < ac.slice(0, 0, -1)).all().item<bool>()) << name;
  }
  EXPECT_TRUE(throws_with([] { model::beta_schedule("quadratic", 10); }, {"quadratic", "linear, cosine, sigmoid"}));
}

TEST(Buffers, FollowTheirDefinitions) {
  for (std::string objective : {"pred_noise", "pred_x0", "pred_v"}) {
    for (bool min_snr : {false, true}) {
      auto uo = tiny_unet_options(1, {1});
      DiffusionOptions o;
      o.image_size = 8;
      o.timesteps = 300;
      o.beta_schedule = "cosine";
      o.objective = objective;
      o.min_snr_loss_weight = min_snr;
      o.min_snr_gamma = 4;
      GaussianDiffusion d(Unet(uo), o);
      auto betas = model::cosine_beta_schedule(300);
      double ac = 1;
      for (int64_t t = 0; t < 300; ++t) {
        const double beta = to_d(betas[t]), ac_prev = ac;
        ac *= 1 - beta;
        auto near = [&](const torch::Tensor& buf, double expected, const char* name) {
          EXPECT_NEAR(to_d(buf[t]), expected, 2e-6 * std::max(1.0, std::abs(expected))) << name << " t=" << t;
        };
        const double pv = beta * (1 - ac_prev) / (1 - ac);
        near(d->betas, beta, "betas");
        near(d->alphas_cumprod, ac, "alphas_cumprod");
        near(d->alphas_cumprod_prev, ac_prev, "alphas_cumprod_prev");
        near(d->sqrt_alphas_cumprod, std::sqrt(ac), "sqrt_alphas_cumprod");
        near(d->sqrt_one_minus_alphas_cumprod, std::sqrt(1 - ac), "sqrt_one_minus_alphas_cumprod");
        near(d->log_one_minus_alphas_cumprod, std::log(1 - ac), "log_one_minus_alphas_cumprod");
        near(d->sqrt_recip_alphas_cumprod, std::sqrt(1 / ac), "sqrt_recip_alphas_cumprod");
        near(d->sqrt_recipm1_alphas_cumprod, std::sqrt(1 / ac - 1), "sqrt_recipm1_alphas_cumprod");
        near(d->posterior_variance, pv, "posterior_variance");
        near(d->posterior_log_variance_clipped, std::log(std::max(pv, 1e-20)), "posterior_log_variance_clipped");
        near(d->posterior_mean_coef1, beta * std::sqrt(ac_prev) / (1 - ac), "posterior_mean_coef1");
        near(d->posterior_mean_coef2, (1 - ac_prev) * std::sqrt(1 - beta) / (1 - ac), "posterior_mean_coef2");
        const double snr = ac / (1 - ac), clipped = min_snr ? std::min(snr, 4.0) : snr;
        const double weight = objective == "pred_noise" ? clipped / snr : objective == "pred_x0" ? clipped
                                                                                                : clipped / (snr + 1);
        near(d->loss_weight, weight, "loss_weight");
      }
      EXPECT_EQ(to_d(d->posterior_variance[0]), 0.0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward process, posterior, parameterisations

TEST(Diffusion, QSampleHasTheRightMoments) {
  auto d = tiny_diffusion(1, 100);
  const int64_t n = 20000, t = 37;
  auto x0 = torch::linspace(-1, 1, 16).reshape({1, 1, 4, 4}).expand({n, 1, 4, 4});
  auto gen = cpu_generator(5);
  auto noise = torch::randn({n, 1, 4, 4}, gen);
  auto xt = d->q_sample(x0, torch::full({n}, t, torch::kLong), noise);
  const double ac = to_d(d->alphas_cumprod[t]);
  auto mean = xt.mean(0), var = xt.var(0);
  const double se_mean = std::sqrt((1 - ac) / n), se_var = (1 - ac) * std::sqrt(2.0 / n);
  EXPECT_LT((mean - std::sqrt(ac) * x0[0]).abs().max().item<double>(), 5 * se_mean);
  EXPECT_LT((var - (1 - ac)).abs().max().item<double>(), 5 * se_var);
}

TEST(Diffusion, PosteriorMatchesBayesRule) {
  auto d = tiny_diffusion(3, 1000, "sigmoid");
  auto betas = model::sigmoid_beta_schedule(1000);
  auto gen = cpu_generator(9);
  auto x0 = torch::rand({4, 3, 8, 8}, gen) * 2 - 1;
  auto xt = torch::randn({4, 3, 8, 8}, gen);
  auto t = torch::tensor({1, 10, 500, 998}, torch::kLong);
  auto post = d->q_posterior(x0, xt, t);
  for (int64_t i = 0; i < 4; ++i) {
    const int64_t ti = t[i].item<int64_t>();
    double ac_prev = 1;
    for (int64_t k = 0; k < ti; ++k) ac_prev *= 1 - to_d(betas[k]);
    const double beta = to_d(betas[ti]), alpha = 1 - beta;
    // x_{t-1} ~ N(sqrt(ac_prev) x0, 1 - ac_prev), x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta): multiply.
    const double precision = 1 / (1 - ac_prev) + alpha / beta, var = 1 / precision;
    auto mean = var * (std::sqrt(ac_prev) / (1 - ac_prev) * x0[i].to(torch::kFloat64) +
                       std::sqrt(alpha) / beta * xt[i].to(torch::kFloat64));
    expect_allclose(post.mean[i], mean, 1e-5, 1e-6, "posterior mean t=" + std::to_string(ti));
    EXPECT_NEAR(to_d(post.variance[i].flatten()[0]), var, 1e-6 * var) << ti;
    EXPECT_NEAR(to_d(post.log_variance[i].flatten()[0]), std::log(var), 1e-5) << ti;
  }
}

TEST(Diffusion, ObjectiveConversionsRoundTrip) {
  auto d = tiny_diffusion(3, 1000, "sigmoid");
  auto gen = cpu_generator(10);
  auto x0 = torch::rand({5, 3, 8, 8}, gen) * 2 - 1;
  auto noise = torch::randn({5, 3, 8, 8}, gen);
  auto t = torch::tensor({0, 1, 250, 700, 999}, torch::kLong);
  auto xt = d->q_sample(x0, t, noise);
  // float32 rounding is amplified by sqrt(1/alpha_bar) (x0 from noise, at large t) and by
  // sqrt(1/alpha_bar) / sqrt(1/alpha_bar - 1) (noise from x0, at small t): scale the tolerance.
  auto recip = d->sqrt_recip_alphas_cumprod.index_select(0, t).reshape({5, 1, 1, 1});
  auto recipm1 = d->sqrt_recipm1_alphas_cumprod.index_select(0, t).reshape({5, 1, 1, 1});
  auto check = [&](const torch::Tensor& got, const torch::Tensor& want, const torch::Tensor& amp, const char* what) {
    EXPECT_TRUE(((got - want).abs() <= 2e-6 * amp * (1 + want.abs())).all().item<bool>())
        << what << ": max err " << (got - want).abs().max().item<double>();
  };
  check(d->predict_start_from_noise(xt, t, noise), x0, recip, "noise -> x0");
  check(d->predict_noise_from_start(xt, t, x0), noise, recip / recipm1, "x0 -> noise");
  auto v = d->predict_v(x0, t, noise);
  check(d->predict_start_from_v(xt, t, v), x0, torch::ones_like(recip), "v -> x0");
  // v and (x0, noise) are a rotation of each other: |v|^2 + |x_t|^2 = |noise|^2 + |x0|^2 per element.
  expect_allclose(v.pow(2) + xt.pow(2), noise.pow(2) + x0.pow(2), 1e-5, 1e-5, "rotation");
}

// ---------------------------------------------------------------------------------------------
// Samplers

TEST(Samplers, DdimWithEtaZeroIsDeterministic) {
  torch::manual_seed(3);
  auto d = tiny_diffusion(3, 50);
  auto noise = torch::randn({2, 3, 8, 8}, cpu_generator(1));
  auto s = ddim(10, 0.0);
  auto a = d->sample_from(noise, s, cpu_generator(1));
  auto b = d->sample_from(noise, s, cpu_generator(2));
  EXPECT_TRUE(torch::equal(a, b)) << "DDIM with eta = 0 must not depend on the step noise";
  s.eta = 1.0;
  auto c = d->sample_from(noise, s, cpu_generator(1));
  auto e = d->sample_from(noise, s, cpu_generator(2));
  EXPECT_FALSE(torch::allclose(c, e));
  EXPECT_TRUE(torch::equal(c, d->sample_from(noise, s, cpu_generator(1))));
}

TEST(Samplers, ConsumeOneNoiseTensorPerNonFinalStep) {
  torch::manual_seed(4);
  auto d = tiny_diffusion(3, 30);
  auto expect_draws = [&](const SampleOptions& s, int64_t tensors) {
    auto gen = cpu_generator(7);
    d->sample(2, s, gen);
    auto ref = cpu_generator(7);
    for (int64_t i = 0; i < tensors; ++i) torch::randn({2, 3, 8, 8}, ref);
    EXPECT_TRUE(torch::equal(torch::randn({5}, gen), torch::randn({5}, ref))) << s.sampler << " " << s.steps;
  };
  expect_draws(ddim(6, 0.0), 6); // initial + 5 (even with eta = 0)
  expect_draws(ddim(30, 0.5), 30);
  expect_draws(ddpm(), 30); // initial + T - 1
}

TEST(Samplers, ClippedSamplesLieInTheUnitInterval) {
  torch::manual_seed(5);
  auto d = tiny_diffusion(1, 25, "linear", "pred_noise");
  for (const auto& s : {ddpm(), ddim(5, 0.3)}) {
    auto x = d->sample(3, s, cpu_generator(1));
    EXPECT_EQ(x.sizes(), (std::vector<int64_t>{3, 1, 8, 8}));
    EXPECT_GE(x.min().item<float>(), 0.0f) << s.sampler;
    EXPECT_LE(x.max().item<float>(), 1.0f) << s.sampler;
  }
}

TEST(Samplers, OptionsAreValidated) {
  auto d = tiny_diffusion(1, 25);
  auto gen = cpu_generator(0);
  EXPECT_TRUE(throws_with([&] { d->sample(1, with_sampler("euler"), gen); }, {"SampleOptions.sampler", "euler"}));
  EXPECT_TRUE(throws_with([&] { d->sample(1, ddim(26, 0), gen); }, {"SampleOptions.steps", "26"}));
  EXPECT_TRUE(throws_with([&] { d->sample(1, ddim(0, 0), gen); }, {"SampleOptions.steps"}));
  EXPECT_TRUE(throws_with([&] { d->sample(1, ddim(5, -1), gen); }, {"SampleOptions.eta"}));
  EXPECT_TRUE(throws_with([&] { d->sample_from(torch::randn({1, 1, 4, 4}), ddpm(), gen); }, {"[batch, 1, 8, 8]"}));
}

TEST(Samplers, ReferenceChoiceOfSampler) {
  DiffusionOptions o;
  auto s = o.reference_sample_options();
  EXPECT_EQ(s.sampler, "ddpm");
  EXPECT_EQ(s.steps, 1000);
  o.sampling_timesteps = 1000;
  EXPECT_EQ(o.reference_sample_options().sampler, "ddpm");
  o.sampling_timesteps = 250;
  o.ddim_sampling_eta = 0.5;
  s = o.reference_sample_options();
  EXPECT_EQ(s.sampler, "ddim");
  EXPECT_EQ(s.steps, 250);
  EXPECT_EQ(s.eta, 0.5);
}

// ---------------------------------------------------------------------------------------------
// Losses

TEST(Losses, ForwardIsAScalarWithGradientsForEveryParameter) {
  torch::manual_seed(6);
  auto d = tiny_diffusion(3, 100);
  d->train();
  auto img = torch::rand({4, 3, 8, 8});
  auto loss = d->forward(img, cpu_generator(2));
  EXPECT_EQ(loss.dim(), 0);
  EXPECT_GT(loss.item<float>(), 0.0f);
  loss.backward();
  for (const auto& item : d->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
    EXPECT_TRUE(torch::isfinite(item.value().grad()).all().item<bool>()) << item.key();
  }
  EXPECT_TRUE(throws_with([&] { d->forward(torch::rand({4, 3, 16, 16}), cpu_generator(2)); }, {"[batch, 3, 8, 8]"}));
}

TEST(Losses, OffsetNoiseIsAPerChannelConstantFromTheGenerator) {
  torch::manual_seed(7);
  auto uo = tiny_unet_options(3, {1, 2});
  DiffusionOptions o;
  o.image_size = 8;
  o.timesteps = 50;
  o.offset_noise_strength = 0.2;
  GaussianDiffusion d(Unet(uo), o);
  d->eval();
  auto gen = cpu_generator(1);
  auto x0 = torch::rand({2, 3, 8, 8}, gen) * 2 - 1;
  auto noise = torch::randn({2, 3, 8, 8}, gen);
  auto t = torch::tensor({3, 40}, torch::kLong);
  auto before = noise.clone();
  auto loss = d->training_losses(x0, t, noise, cpu_generator(11));
  EXPECT_TRUE(torch::equal(noise, before));
  auto offset = torch::randn({2, 3}, cpu_generator(11));
  EXPECT_TRUE(torch::equal(loss, d->p_losses(x0, t, noise + 0.2 * offset.unsqueeze(-1).unsqueeze(-1))));
}

TEST(Losses, SelfConditioningCoinComesFromTheGenerator) {
  torch::manual_seed(8);
  auto d = tiny_diffusion(1, 50, "cosine", "pred_v", 8, [](UnetOptions& o) { o.self_condition = true; });
  auto gen = cpu_generator(2);
  auto x0 = torch::rand({2, 1, 8, 8}, gen) * 2 - 1;
  auto noise = torch::randn({2, 1, 8, 8}, gen);
  auto t = torch::tensor({5, 30}, torch::kLong);
  auto with_sc = d->p_losses(x0, t, noise, true);
  auto without = d->p_losses(x0, t, noise, false);
  ASSERT_FALSE(torch::equal(with_sc, without));
  int on = 0, off = 0;
  for (uint64_t seed = 0; seed < 16; ++seed) {
    auto loss = d->training_losses(x0, t, noise, cpu_generator(seed));
    const bool coin = torch::rand({1}, cpu_generator(seed)).item<float>() < 0.5f;
    EXPECT_TRUE(torch::equal(loss, coin ? with_sc : without)) << seed;
    (coin ? on : off)++;
  }
  EXPECT_GT(on, 0);
  EXPECT_GT(off, 0);
}

TEST(Losses, MinSnrWeightingAndWeightsApplied) {
  torch::manual_seed(9);
  auto uo = tiny_unet_options(1, {1});
  DiffusionOptions o;
  o.image_size = 8;
  o.timesteps = 100;
  o.objective = "pred_x0";
  o.min_snr_loss_weight = true;
  o.min_snr_gamma = 2;
  GaussianDiffusion d(Unet(uo), o);
  d->eval();
  auto gen = cpu_generator(3);
  auto x0 = torch::rand({2, 1, 8, 8}, gen) * 2 - 1;
  auto noise = torch::randn({2, 1, 8, 8}, gen);
  auto t = torch::tensor({0, 99}, torch::kLong);
  auto loss = d->p_losses(x0, t, noise);
  torch::NoGradGuard no_grad;
  auto out = d->model->forward(d->q_sample(x0, t, noise), t);
  auto mse = (out - x0).pow(2).mean({1, 2, 3});
  const double ac99 = to_d(d->alphas_cumprod[99]);
  EXPECT_NEAR(to_d(loss[0]), to_d(mse[0]) * 2.0, 1e-5 * to_d(loss[0]));  // snr(0) is huge: clipped to gamma
  EXPECT_NEAR(to_d(loss[1]), to_d(mse[1]) * ac99 / (1 - ac99), 1e-4 * to_d(loss[1]));
}

// ---------------------------------------------------------------------------------------------
// Learned variance

Unet constant_unet(int64_t channels, bool learned_variance, std::vector<float> bias) {
  auto o = tiny_unet_options(channels, {1});
  o.learned_variance = learned_variance;
  Unet unet(o);
  torch::NoGradGuard no_grad;
  unet->final_conv->weight.zero_();
  unet->final_conv->bias.copy_(torch::tensor(bias));
  unet->eval();
  return unet;
}

TEST(LearnedVariance, InterpolatesBetweenBetaAndPosteriorVariance) {
  DiffusionOptions o;
  o.image_size = 8;
  o.timesteps = 50;
  o.objective = "pred_noise";
  o.beta_schedule = "cosine";
  auto x = torch::randn({3, 1, 8, 8}, cpu_generator(1));
  auto t = torch::tensor({0, 1, 49}, torch::kLong);
  auto at = [&](GaussianDiffusion& d) { return d->p_mean_variance(x, t).log_variance.flatten(1).select(1, 0); };
  GaussianDiffusion hi(constant_unet(1, true, {0.0f, 1.0f}), o), lo(constant_unet(1, true, {0.0f, -1.0f}), o),
      mid(constant_unet(1, true, {0.0f, 0.0f}), o);
  const auto& plv = hi->posterior_log_variance_clipped;
  auto beta_log = torch::log(hi->betas.index_select(0, t));
  auto post_log = torch::stack({plv[1], plv[1], plv[49]});  // t = 0 clipped to t = 1 (improved-diffusion)
  expect_allclose(at(hi), beta_log, 1e-6, 1e-6, "v = +1");
  expect_allclose(at(lo), post_log, 1e-6, 1e-6, "v = -1");
  expect_allclose(at(mid), (beta_log + post_log) / 2, 1e-6, 1e-6, "v = 0");
  EXPECT_TRUE(hi->learned_variance());
}

TEST(LearnedVariance, VlbTermTrainsOnlyTheVariance) {
  torch::manual_seed(10);
  auto d = tiny_diffusion(3, 40, "cosine", "pred_noise", 8, [](UnetOptions& o) { o.learned_variance = true; });
  auto gen = cpu_generator(4);
  auto x0 = torch::randint(0, 256, {2, 3, 8, 8}, gen).to(torch::kFloat) / 127.5 - 1;
  auto t = torch::tensor({0, 20}, torch::kLong);
  auto xt = d->q_sample(x0, t, torch::randn({2, 3, 8, 8}, gen));
  auto out = torch::randn({2, 6, 8, 8}, gen).requires_grad_();
  auto vlb = d->hybrid_vlb_loss(out, x0, xt, t);
  EXPECT_EQ(vlb.sizes(), (std::vector<int64_t>{2}));
  vlb.sum().backward();
  auto grad = out.grad();
  EXPECT_EQ(grad.slice(1, 0, 3).abs().max().item<float>(), 0.0f) << "mean channels must be detached";
  EXPECT_GT(grad.slice(1, 3, 6).abs().max().item<float>(), 0.0f);
  EXPECT_TRUE(torch::isfinite(grad).all().item<bool>());
  // The full loss adds it to the weighted MSE and trains the whole network.
  d->train();
  auto loss = d->forward(torch::rand({2, 3, 8, 8}), gen);
  loss.backward();
  EXPECT_GT(d->model->final_conv->weight.grad().abs().sum().item<float>(), 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Likelihood

TEST(Likelihood, NormalKlKnownValues) {
  auto t = [](double v) { return torch::tensor(v, torch::kFloat64); };
  EXPECT_NEAR(to_d(model::normal_kl(t(0.3), t(-1.2), t(0.3), t(-1.2))), 0.0, 1e-15);
  EXPECT_NEAR(to_d(model::normal_kl(t(0), t(0), t(1), t(0))), 0.5, 1e-15);
  // KL(N(0,1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2
  EXPECT_NEAR(to_d(model::normal_kl(t(0), t(0), t(1), t(std::log(4.0)))), std::log(2.0) - 0.25, 1e-15);
  // KL(N(1, 2^2) || N(0,1)) = -log 2 + (4 + 1) / 2 - 1/2: not symmetric
  EXPECT_NEAR(to_d(model::normal_kl(t(1), t(std::log(4.0)), t(0), t(0))), 2.0 - std::log(2.0), 1e-15);
}

double phi(double z) { return 0.5 * std::erfc(-z / std::numbers::sqrt2); }

TEST(Likelihood, DiscretizedDecoderBucketsSumToOne) {
  auto grid = torch::arange(256, torch::kFloat64) / 127.5 - 1;
  const std::vector<std::pair<double, double>> cases_ = {{0.0, 0.1},  {0.3, 0.01}, {-0.7, 1.0}, {0.999, 1e-4},
                                                         {5.0, 0.5},  {-1.0, 2.0}, {0.5, 30.0}, {-0.2, 1e-3}};
  for (const auto& [mean, sigma] : cases_) {
    auto means = torch::full({256}, mean, torch::kFloat64);
    auto log_scales = torch::full({256}, std::log(sigma), torch::kFloat64);
    auto logp = model::discretized_gaussian_log_likelihood(grid, means, log_scales);
    EXPECT_NEAR(logp.exp().sum().item<double>(), 1.0, 1e-9) << mean << " " << sigma;
    for (int64_t k : {0, 1, 127, 200, 254, 255}) {
      const double x = to_d(grid[k]);
      const double lo = k == 0 ? -INFINITY : (x - 1.0 / 255 - mean) / sigma;
      const double hi = k == 255 ? INFINITY : (x + 1.0 / 255 - mean) / sigma;
      const double p = (k == 0 ? phi(hi) : k == 255 ? 1 - phi(lo) : phi(hi) - phi(lo));
      EXPECT_NEAR(std::exp(to_d(logp[k])), p, 1e-12) << mean << " " << sigma << " k=" << k;
    }
  }
  // float32 in, float32 out
  auto f = model::discretized_gaussian_log_likelihood(grid.to(torch::kFloat), torch::zeros({256}),
                                                      torch::full({256}, -2.0f));
  EXPECT_EQ(f.scalar_type(), torch::kFloat);
}

TEST(Likelihood, LogCdfDifferenceIsAccurateInBothTails) {
  auto t = [](double v) { return torch::tensor({v}, torch::kFloat64); };
  auto q = [](double z) { return 0.5 * std::erfc(z / std::numbers::sqrt2); };  // 1 - Phi(z), accurate for z >> 0
  // Upper tail: Phi(10.5) - Phi(10) is 7.6e-24, invisible as a difference of CDF values near 1.
  const double upper = std::log(q(10.0) - q(10.5));
  EXPECT_NEAR(to_d(model::log_normal_cdf_diff(t(10.0), t(10.5))), upper, 1e-10 * std::abs(upper));
  // Lower tail.
  const double lower = std::log(q(29.5) - q(30.0));
  EXPECT_NEAR(to_d(model::log_normal_cdf_diff(t(-30.0), t(-29.5))), lower, 1e-10 * std::abs(lower));
  // Straddling zero and infinite ends.
  EXPECT_NEAR(to_d(model::log_normal_cdf_diff(t(-1.0), t(2.0))), std::log(phi(2) - phi(-1)), 1e-14);
  EXPECT_NEAR(to_d(model::log_normal_cdf_diff(t(-INFINITY), t(0.0))), std::log(0.5), 1e-15);
  EXPECT_NEAR(to_d(model::log_normal_cdf_diff(t(1.0), t(INFINITY))), std::log(q(1.0)), 1e-14);
}

TEST(Likelihood, DecoderGradientsStayFinite) {
  auto grid = torch::arange(256, torch::kFloat32) / 127.5 - 1;
  for (float log_sigma : {-9.0f, -4.0f, 0.0f, 3.0f}) {
    auto means = torch::full({256}, 0.4f).requires_grad_();
    auto log_scales = torch::full({256}, log_sigma).requires_grad_();
    model::discretized_gaussian_log_likelihood(grid, means, log_scales).sum().backward();
    EXPECT_TRUE(torch::isfinite(means.grad()).all().item<bool>()) << log_sigma;
    EXPECT_TRUE(torch::isfinite(log_scales.grad()).all().item<bool>()) << log_sigma;
  }
}

// A denoiser that always answers x0 = c is perfect on the constant image c: every KL term
// L_{t-1} (t >= 1) vanishes, the implied noise is exact, and what remains is the prior term and the
// decoder's bucket mass at the t = 1 posterior variance, both in closed form.
TEST(Likelihood, PerfectDenoiserOnAConstantImage) {
  DiffusionOptions o;
  o.image_size = 8;
  o.timesteps = 40;
  o.objective = "pred_x0";
  o.beta_schedule = "cosine";
  for (int level : {128, 0}) {  // interior bucket, and the edge bucket reaching to -inf
    const float c = static_cast<float>(level / 127.5 - 1);
    GaussianDiffusion d(constant_unet(1, false, {c}), o);
    auto x0 = torch::full({2, 1, 8, 8}, c);
    auto r = d->vlb_bits_per_dim(x0, cpu_generator(3));
    ASSERT_EQ(r.vb_bpd.sizes(), (std::vector<int64_t>{2, 40}));
    // KL(q || p) with equal means and variances: zero up to float32 rounding of -1 + lv - lv + exp(0).
    EXPECT_LT(r.vb_bpd.slice(1, 1).abs().max().item<float>(), 1e-6f) << "KL terms of a perfect denoiser";
    EXPECT_LT(r.mse.max().item<float>(), 1e-8f);
    const double sigma = std::sqrt(to_d(d->posterior_variance[1])), delta = 1.0 / 255;
    const double decoder = level == 0 ? -std::log2(phi(delta / sigma)) : -std::log2(std::erf(delta / sigma / std::numbers::sqrt2));
    const double ac = to_d(d->alphas_cumprod[39]);
    const double prior = 0.5 * (-1 - std::log(1 - ac) + (1 - ac) + ac * c * c) / std::numbers::ln2;
    for (int64_t b = 0; b < 2; ++b) {
      EXPECT_NEAR(to_d(r.vb_bpd[b][0]), decoder, 1e-5 * decoder) << level;
      EXPECT_NEAR(to_d(r.prior_bpd[b]), prior, 1e-6 + 1e-4 * prior) << level;
      EXPECT_NEAR(to_d(r.total_bpd[b]), decoder + prior, 1e-5 * (decoder + prior)) << level;
    }
    // Any error in the prediction costs bits.
    GaussianDiffusion off(constant_unet(1, false, {c + 0.05f}), o);
    auto worse = off->vlb_bits_per_dim(x0, cpu_generator(3));
    EXPECT_GT(worse.total_bpd.min().item<float>(), r.total_bpd.max().item<float>() + 0.01f) << level;
  }
}

// ---------------------------------------------------------------------------------------------
// Construction and options

TEST(Diffusion, ConstructorChecksTheUnet) {
  DiffusionOptions o;
  o.image_size = 8;
  auto uo = tiny_unet_options(3, {1, 2});
  uo.out_dim = 5;
  EXPECT_TRUE(throws_with([&] { GaussianDiffusion(Unet(uo), o); }, {"out_dim 5", "channels (3)"}));
  uo = tiny_unet_options(3, {1, 2});
  uo.learned_sinusoidal_cond = true;
  EXPECT_TRUE(throws_with([&] { GaussianDiffusion(Unet(uo), o); }, {"learned_sinusoidal_cond"}));
  uo = tiny_unet_options(3, {1, 2, 4, 8});
  o.image_size = 12;
  EXPECT_TRUE(throws_with([&] { GaussianDiffusion(Unet(uo), o); }, {"image_size 12", "downsample factor 8"}));
  o.image_size = 16;
  o.objective = "pred_eps";
  EXPECT_TRUE(throws_with([&] { GaussianDiffusion(Unet(uo), o); }, {"DiffusionOptions.objective", "pred_eps"}));
}

TEST(Diffusion, StateDictHasTheBuffersFirst) {
  auto d = tiny_diffusion(3, 30);
  auto sd = model::state_dict(*d);
  const char* names[] = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                         "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                         "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                         "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                         "loss_weight"};
  for (size_t i = 0; i < 13; ++i) EXPECT_EQ(sd[i].first, names[i]);
  EXPECT_EQ(sd[13].first, "model.init_conv.weight");
  EXPECT_EQ(sd.size(), 13 + model::state_dict(*d->model).size());
  EXPECT_EQ(model::parameter_count(*d), model::parameter_count(*d->model));  // buffers are not parameters
}

TEST(DiffusionOptions, ValidateJsonRoundTripAndErrors) {
  DiffusionOptions o;
  EXPECT_EQ(DiffusionOptions::from_json(o.to_json()), o);
  o.image_size = 32;
  o.timesteps = 250;
  o.sampling_timesteps = 50;
  o.objective = "pred_x0";
  o.beta_schedule = "linear";
  o.ddim_sampling_eta = 0.25;
  o.auto_normalize = false;
  o.offset_noise_strength = 0.1;
  o.min_snr_loss_weight = true;
  o.min_snr_gamma = 3.5;
  o.vlb_weight = 0.01;
  EXPECT_EQ(DiffusionOptions::from_json(o.to_json()), o) << o.to_json();
  auto bad = [](auto mutate, const std::string& field) {
    DiffusionOptions x;
    mutate(x);
    return throws_with([&] { x.validate(); }, {"DiffusionOptions." + field});
  };
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.image_size = 0; }, "image_size"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.timesteps = 1; }, "timesteps"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.sampling_timesteps = 1001; }, "sampling_timesteps"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.objective = "eps"; }, "objective"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.beta_schedule = "quadratic"; }, "beta_schedule"));
  EXPECT_TRUE(bad(
      [](DiffusionOptions& x) {
        x.beta_schedule = "linear";
        x.timesteps = 20;
      },
      "timesteps"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.ddim_sampling_eta = -0.1; }, "ddim_sampling_eta"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.offset_noise_strength = -1; }, "offset_noise_strength"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.min_snr_gamma = 0; }, "min_snr_gamma"));
  EXPECT_TRUE(bad([](DiffusionOptions& x) { x.vlb_weight = -1; }, "vlb_weight"));
  EXPECT_TRUE(throws_with([] { DiffusionOptions::from_json(R"({"timestep": 10})"); }, {"\"timestep\"", "unknown key"}));
  EXPECT_TRUE(throws_with([] { DiffusionOptions::from_json(R"({"objective": 3})"); }, {"\"objective\"", "string"}));
}

TEST(Samplers, CpuGeneratorDrivesAGpuModel_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(12);
  auto d = tiny_diffusion(3, 20);
  auto s = ddim(5, 0.5);
  auto cpu = d->sample(2, s, cpu_generator(1));
  d->to(torch::kCUDA);
  auto gpu = d->sample(2, s, cpu_generator(1));
  EXPECT_TRUE(gpu.is_cuda());
  // Same noise (drawn on the CPU generator): only TF32/kernel rounding separates the results.
  EXPECT_LT((gpu.cpu() - cpu).abs().max().item<float>(), 5e-2f);
  auto other = d->sample(2, s, cpu_generator(2));
  EXPECT_GT((other.cpu() - cpu).abs().max().item<float>(), 0.1f);
  auto loss = d->forward(torch::rand({2, 3, 8, 8}, torch::kCUDA), cpu_generator(3));
  EXPECT_TRUE(loss.is_cuda());
}

// ---------------------------------------------------------------------------------------------
// Overfitting (ctest: model_overfit)

TEST(Overfit, SmallUnetDrivesTheLossOnEightImagesDownFiveTimes) {
  torch::manual_seed(0);
  auto uo = tiny_unet_options(1, {1, 2});
  DiffusionOptions o;
  o.image_size = 16;
  o.timesteps = 100;  // the reference's defaults otherwise: pred_v, sigmoid schedule
  GaussianDiffusion d(Unet(uo), o);
  // Eight distinct patterns in [-1, 1]: stripes, checkerboards, gradients, a disc.
  auto coords = torch::arange(16, torch::kFloat);
  auto yy = coords.unsqueeze(1).expand({16, 16}), xx = coords.unsqueeze(0).expand({16, 16});
  std::vector<torch::Tensor> patterns = {
      torch::sin(xx * 0.8),           torch::cos(yy * 0.8),        ((xx + yy).remainder(2) * 2 - 1),
      (xx / 7.5 - 1),                 (yy / 7.5 - 1),              torch::sin((xx + yy) * 0.5),
      ((xx - 7.5).pow(2) + (yy - 7.5).pow(2) < 30).to(torch::kFloat) * 2 - 1,
      torch::sign(torch::sin(xx * 0.4) * torch::cos(yy * 0.4))};
  auto images = torch::stack(patterns).unsqueeze(1);  // [8, 1, 16, 16]
  // Evaluation: a fixed set of timesteps and noises, so the measured loss moves only with the model.
  auto eval_gen = cpu_generator(100);
  auto eval_x = images.repeat({4, 1, 1, 1});
  auto eval_t = torch::randint(0, 100, {32}, eval_gen, torch::kLong);
  auto eval_noise = torch::randn(eval_x.sizes(), eval_gen);
  auto evaluate = [&] {
    torch::NoGradGuard no_grad;
    d->eval();
    auto l = d->p_losses(eval_x, eval_t, eval_noise).mean().item<double>();
    d->train();
    return l;
  };
  const double initial = evaluate();
  torch::optim::Adam adam(d->parameters(), torch::optim::AdamOptions(3e-3));
  auto gen = cpu_generator(1);
  const auto start = std::chrono::steady_clock::now();
  double current = initial;
  int64_t step = 0;
  // Bounded by steps, not seconds: seeded, so the same run on any machine, loaded or not.
  for (; step < 1500; ++step) {
    auto t = torch::randint(0, 100, {8}, gen, torch::kLong);
    auto noise = torch::randn({8, 1, 16, 16}, gen);
    auto loss = d->training_losses(images, t, noise, gen).mean();
    adam.zero_grad();
    loss.backward();
    adam.step();
    if (step % 50 == 49) {
      current = evaluate();
      if (current * 5 <= initial) break;
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RecordProperty("initial_loss", std::to_string(initial));
  RecordProperty("final_loss", std::to_string(current));
  RecordProperty("steps", std::to_string(step + 1));
  RecordProperty("seconds", std::to_string(seconds));
  EXPECT_LE(current * 5, initial) << "loss " << initial << " -> " << current << " after " << step + 1 << " steps, "
                                  << seconds << " s";
}

}  // namespace
}  // namespace diffuse::testing
