// Tests of trainer/posthoc_ema.h against ema-pytorch 0.8.3 (golden values from
// tests/trainer/golden/make_posthoc_ema_golden.py): sigma_rel <-> gamma, the power-function EMA of
// a toy Linear(4, 3), solve_weights, and synthesize_ema_model over 300 steps with snapshots every
// 25 steps for sigma_rel 0.05 and 0.28; plus the errors a user can meet.
#include "trainer/posthoc_ema.h"

#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <iterator>

#include "golden/posthoc_ema_golden.h"
#include "support.h"

namespace diffuse::trainer {
namespace {

namespace golden = posthoc_golden;
using diffuse::testing::error_of;

// The golden script's "training": parameter i (weight then bias, flattened) at step k.
void set_online(torch::Tensor& weight, torch::Tensor& bias, int64_t k) {
  torch::NoGradGuard no_grad;
  std::vector<float> flat;
  for (int i = 0; i < 15; ++i) {
    flat.push_back(static_cast<float>(std::sin(0.37 * k + 0.11 * i) + 0.01 * k * std::cos(i)));
  }
  auto values = torch::tensor(flat);
  weight.copy_(values.slice(0, 0, 12).reshape({3, 4}));
  bias.copy_(values.slice(0, 12, 15));
}

torch::Tensor flat(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> parts;
  for (const auto& tensor : tensors) parts.push_back(tensor.reshape({-1}).to(torch::kFloat64));
  return torch::cat(parts);
}

torch::Tensor golden_tensor(const double* begin, const double* end) {
  return torch::tensor(std::vector<double>(begin, end), torch::kFloat64);
}

double max_error(const torch::Tensor& got, const torch::Tensor& expected) {
  return (got - expected).abs().max().item<double>();
}

TEST(PosthocEma, SigmaRelToGammaMatchesEmaPytorch) {
  double worst = 0.0;
  for (size_t i = 0; i < std::size(golden::kSigmaRels); ++i) {
    double gamma = sigma_rel_to_gamma(golden::kSigmaRels[i]);
    double error = std::abs(gamma - golden::kGammas[i]) / std::max(1.0, std::abs(golden::kGammas[i]));
    worst = std::max(worst, error);
    EXPECT_NEAR(gamma, golden::kGammas[i], 1e-10 * std::max(1.0, std::abs(golden::kGammas[i]))) << golden::kSigmaRels[i];
    EXPECT_NEAR(gamma_to_sigma_rel(gamma), golden::kSigmaRels[i], 1e-12) << golden::kSigmaRels[i];
  }
  std::cout << "sigma_rel -> gamma: max relative error " << worst << "\n";
  EXPECT_NEAR(max_sigma_rel(), 0.30028310600066, 1e-12);
  EXPECT_NEAR(sigma_rel_to_gamma(max_sigma_rel()), (std::sqrt(5.0) - 3.0) / 2.0, 1e-6);
}

TEST(PosthocEma, PowerEmaMatchesKarrasEma) {
  struct Case {
    double sigma_rel;
    int64_t update_every;
    const double* begin;
    const double* end;
  };
  const Case cases[] = {
      {0.05, 1, std::begin(golden::kPowerEmaSharpEvery1), std::end(golden::kPowerEmaSharpEvery1)},
      {0.05, 10, std::begin(golden::kPowerEmaSharpEvery10), std::end(golden::kPowerEmaSharpEvery10)},
      {0.28, 1, std::begin(golden::kPowerEmaWideEvery1), std::end(golden::kPowerEmaWideEvery1)},
      {0.28, 10, std::begin(golden::kPowerEmaWideEvery10), std::end(golden::kPowerEmaWideEvery10)},
  };
  for (const auto& c : cases) {
    auto weight = torch::zeros({3, 4}), bias = torch::zeros({3});
    set_online(weight, bias, 0);
    PowerEma ema({weight, bias}, sigma_rel_to_gamma(c.sigma_rel), c.update_every);
    for (int64_t k = 1; k <= 300; ++k) {
      set_online(weight, bias, k);
      ema.update();
    }
    EXPECT_EQ(ema.step(), 300);
    double error = max_error(flat(ema.average()), golden_tensor(c.begin, c.end));
    std::cout << "power EMA sigma_rel " << c.sigma_rel << " every " << c.update_every << ": max abs error " << error << "\n";
    EXPECT_LT(error, 1e-6);
  }
}

TEST(PosthocEma, PowerEmaFirstUpdateCopiesAndResumes) {
  auto weight = torch::full({2}, 3.0);
  PowerEma ema({weight}, 1.0);
  EXPECT_DOUBLE_EQ(ema.beta_at(1), 0.25);  // (1 - 1/2)^2
  ema.update();
  EXPECT_TRUE(ema.initialized());
  EXPECT_TRUE(ema.average()[0].equal(weight));
  weight.fill_(6.0);
  ema.update();  // beta (2/3)^2 = 4/9: 3 + 5/9 * 3
  EXPECT_NEAR(ema.average()[0][0].item<float>(), 3.0 + 3.0 * 5.0 / 9.0, 1e-6);

  PowerEma resumed({weight}, 1.0);
  resumed.load_state(ema.step(), ema.initialized(), ema.average());
  ema.update();
  resumed.update();
  EXPECT_TRUE(resumed.average()[0].equal(ema.average()[0]));
  EXPECT_NE(error_of([&] { resumed.load_state(2, true, {torch::zeros({3})}); }).find("shape"), std::string::npos);
}

TEST(PosthocEma, SolveWeightsMatchesEmaPytorch) {
  struct Case {
    const long long* steps;
    const double* gammas;
    size_t size;
    const double* target;
    const double* weights;
  };
  const Case cases[] = {
      {golden::kSolveSteps0, golden::kSolveGammas0, std::size(golden::kSolveSteps0), golden::kSolveTarget0, golden::kSolveWeights0},
      {golden::kSolveSteps1, golden::kSolveGammas1, std::size(golden::kSolveSteps1), golden::kSolveTarget1, golden::kSolveWeights1},
      {golden::kSolveSteps2, golden::kSolveGammas2, std::size(golden::kSolveSteps2), golden::kSolveTarget2, golden::kSolveWeights2},
  };
  for (size_t c = 0; c < std::size(cases); ++c) {
    std::vector<PosthocSnapshot> snapshots;
    for (size_t i = 0; i < cases[c].size; ++i) snapshots.push_back({cases[c].steps[i], cases[c].gammas[i]});
    auto weights = solve_posthoc_weights(snapshots, cases[c].target[1], static_cast<int64_t>(cases[c].target[0]));
    ASSERT_EQ(weights.size(), cases[c].size);
    double worst = 0.0, largest = 0.0;
    for (size_t i = 0; i < weights.size(); ++i) {
      worst = std::max(worst, std::abs(weights[i] - cases[c].weights[i]));
      largest = std::max(largest, std::abs(cases[c].weights[i]));
    }
    std::cout << "solve_weights case " << c << ": max abs error " << worst << " (largest weight " << largest << ")\n";
    EXPECT_LE(worst, 1e-9 * std::max(1.0, largest));
  }
}

// Trains the toy module 300 steps with PowerEmas for sigma_rel 0.05 and 0.28, snapshotting both
// every 25 steps (as PostHocEMA(checkpoint_every_num_steps=25) does), and keeps the snapshots.
struct ToyRun {
  std::vector<PosthocSnapshot> snapshots;
  std::vector<NamedTensors> saved;
};

ToyRun toy_run() {
  auto weight = torch::zeros({3, 4}), bias = torch::zeros({3});
  set_online(weight, bias, 0);
  std::vector<PowerEma> emas;
  for (double sigma_rel : {0.05, 0.28}) emas.emplace_back(std::vector<torch::Tensor>{weight, bias}, sigma_rel_to_gamma(sigma_rel));
  ToyRun run;
  for (int64_t k = 1; k <= 300; ++k) {
    set_online(weight, bias, k);
    for (auto& ema : emas) ema.update();
    if (k % 25 != 0) continue;
    for (auto& ema : emas) {
      run.snapshots.push_back({ema.step(), ema.gamma()});
      run.saved.push_back({{"weight", ema.average()[0].clone()}, {"bias", ema.average()[1].clone()}});
    }
  }
  return run;
}

TEST(PosthocEma, SynthesisMatchesSynthesizeEmaModel) {
  ToyRun run = toy_run();
  ASSERT_EQ(run.snapshots.size(), 24u);
  struct Case {
    const double* target;
    const double* begin;
    const double* end;
  };
  const Case cases[] = {
      {golden::kSynthLastTarget, std::begin(golden::kSynthLast), std::end(golden::kSynthLast)},
      {golden::kSynthStep150Target, std::begin(golden::kSynthStep150), std::end(golden::kSynthStep150)},
      {golden::kSynthWideTarget, std::begin(golden::kSynthWide), std::end(golden::kSynthWide)},
  };
  for (const auto& c : cases) {
    size_t reads = 0;
    auto read = [&](size_t index) {
      EXPECT_EQ(index, reads++) << "snapshots are read once each, in order";
      return run.saved.at(index);
    };
    auto synthesized = synthesize_posthoc_ema(run.snapshots, read, c.target[0], static_cast<int64_t>(c.target[1]));
    EXPECT_EQ(reads, run.snapshots.size());
    ASSERT_EQ(synthesized.size(), 2u);
    EXPECT_EQ(synthesized[0].first, "weight");
    EXPECT_EQ(synthesized[1].first, "bias");
    auto expected = golden_tensor(c.begin, c.end);
    double error = max_error(flat({synthesized[0].second, synthesized[1].second}), expected);
    double scale = expected.abs().max().item<double>();
    std::cout << "synthesized sigma_rel " << c.target[0] << " at step " << c.target[1] << ": max abs error " << error
              << " (largest value " << scale << ")\n";
    EXPECT_LT(error, 1e-5 * std::max(1.0, scale));
  }
  // A profile that was tracked comes back as (nearly) its own last snapshot.
  auto own = synthesize_posthoc_ema(run.snapshots, [&](size_t i) { return run.saved.at(i); }, 0.05);
  EXPECT_LT(max_error(own[0].second.to(torch::kFloat64), run.saved[22][0].second.to(torch::kFloat64)), 1e-3);
}

TEST(PosthocEma, ErrorsSayWhatIsWrong) {
  EXPECT_NE(error_of([] { sigma_rel_to_gamma(0.31); }).find("sigma_rel must be in (0, 0.3002"), std::string::npos);
  EXPECT_NE(error_of([] { sigma_rel_to_gamma(0.0); }).find("got 0"), std::string::npos);
  EXPECT_NE(error_of([] { gamma_to_sigma_rel(-1.0); }).find("> -1"), std::string::npos);

  auto none = [](size_t) -> NamedTensors { throw std::logic_error("no snapshot to read"); };
  EXPECT_NE(error_of([&] { synthesize_posthoc_ema({}, none, 0.1); }).find("no snapshots"), std::string::npos);
  EXPECT_NE(error_of([] { solve_posthoc_weights({}, 1.0, 10); }).find("at least one snapshot"), std::string::npos);
  EXPECT_NE(error_of([] { solve_posthoc_weights({{10, 2.0}, {10, 2.0}}, 1.0, 10); }).find("linearly dependent"),
            std::string::npos);

  ToyRun run = toy_run();
  EXPECT_NE(error_of([&] { synthesize_posthoc_ema(run.snapshots, none, 0.4); }).find("sigma_rel must be in"), std::string::npos);
  EXPECT_NE(error_of([&] { synthesize_posthoc_ema(run.snapshots, none, 0.1, 301); })
                .find("up to the last snapshot step 300, asked for step 301"),
            std::string::npos);

  auto renamed = run.saved;
  renamed[5][1].first = "bias_typo";
  std::string message = error_of([&] { synthesize_posthoc_ema(run.snapshots, [&](size_t i) { return renamed.at(i); }, 0.1); });
  EXPECT_NE(message.find("snapshot 5 (step 75"), std::string::npos) << message;
  EXPECT_NE(message.find("'bias_typo', snapshot 0 has 'bias'"), std::string::npos) << message;

  auto reshaped = run.saved;
  reshaped[7][0].second = torch::zeros({4, 3});
  message = error_of([&] { synthesize_posthoc_ema(run.snapshots, [&](size_t i) { return reshaped.at(i); }, 0.1); });
  EXPECT_NE(message.find("snapshot 7 (step 100"), std::string::npos) << message;
  EXPECT_NE(message.find("tensor 'weight' has shape [4, 3], snapshot 0 has [3, 4]"), std::string::npos) << message;

  auto shorter = run.saved;
  shorter[3].pop_back();
  message = error_of([&] { synthesize_posthoc_ema(run.snapshots, [&](size_t i) { return shorter.at(i); }, 0.1); });
  EXPECT_NE(message.find("snapshot 3 (step 50, gamma 0.169"), std::string::npos) << message;
  EXPECT_NE(message.find("has 1 tensors, snapshot 0 has 2"), std::string::npos) << message;
}

}  // namespace
}  // namespace diffuse::trainer
