// The U-Net on its own: shapes across configurations, input checks, options (validation and JSON),
// the analytic FLOP count, and GPU/CPU agreement when a GPU is present.
#include <gtest/gtest.h>

#include "model_support.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using model::Unet;
using model::UnetOptions;

struct ShapeCase {
  std::string label;
  int64_t channels;
  bool self_condition;
  bool learned_variance;
  std::vector<int64_t> mults;
  int64_t height, width;
  std::vector<bool> full_attn;
};

TEST(Unet, OutputShapesAcrossConfigurations) {
  const std::vector<ShapeCase> cases_ = {
      {"1ch-16", 1, false, false, {1, 2}, 16, 16, {}},
      {"3ch-32", 3, false, false, {1, 2, 4}, 32, 32, {}},
      {"self-cond-1ch", 1, true, false, {1, 2}, 16, 16, {}},
      {"learned-variance-3ch", 3, false, true, {1, 2}, 16, 16, {}},
      {"self-cond+learned-var", 3, true, true, {1, 2, 4}, 32, 32, {true}},
      {"4-stages-64", 3, false, false, {1, 2, 4, 8}, 64, 64, {}},
      {"4-stages-128", 1, false, false, {1, 2, 4, 8}, 128, 128, {}},
      {"non-square", 3, false, false, {1, 2, 2}, 16, 32, {false, true, false}},
  };
  torch::NoGradGuard no_grad;
  for (const auto& c : cases_) {
    auto o = tiny_unet_options(c.channels, c.mults);
    o.self_condition = c.self_condition;
    o.learned_variance = c.learned_variance;
    o.full_attn = c.full_attn;
    Unet unet(o);
    const int64_t b = 2;
    auto x = torch::randn({b, c.channels, c.height, c.width});
    auto t = torch::randint(0, 1000, {b}, torch::kLong);
    std::optional<torch::Tensor> sc;
    if (c.self_condition) sc = torch::randn_like(x);
    auto out = unet->forward(x, t, sc);
    const int64_t out_ch = c.channels * (c.learned_variance ? 2 : 1);
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{b, out_ch, c.height, c.width})) << c.label;
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>()) << c.label;
    EXPECT_EQ(unet->out_dim(), out_ch) << c.label;
  }
}

TEST(Unet, ExplicitInitAndOutDim) {
  auto o = tiny_unet_options(3, {1, 2});
  o.init_dim = 6;
  o.out_dim = 5;
  torch::NoGradGuard no_grad;
  Unet unet(o);
  EXPECT_EQ(unet->init_conv->weight.sizes(), (std::vector<int64_t>{6, 3, 7, 7}));
  EXPECT_EQ(unet->forward(torch::randn({1, 3, 8, 8}), torch::zeros({1}, torch::kLong)).size(1), 5);
  EXPECT_EQ(unet->downsample_factor(), 2);
}

TEST(Unet, TimeMayBeFloat) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  Unet unet(tiny_unet_options(1, {1, 2}));
  auto x = torch::randn({2, 1, 8, 8});
  auto a = unet->forward(x, torch::tensor({3, 700}, torch::kLong));
  auto b = unet->forward(x, torch::tensor({3.0f, 700.0f}));
  EXPECT_TRUE(torch::equal(a, b));
}

TEST(Unet, InputChecksSayWhatIsWrong) {
  torch::NoGradGuard no_grad;
  Unet unet(tiny_unet_options(3, {1, 2, 4}));  // downsample factor 4
  auto t = torch::zeros({2}, torch::kLong);
  EXPECT_TRUE(throws_with([&] { unet->forward(torch::randn({2, 1, 16, 16}), t); }, {"channels = 3", "[2, 1, 16, 16]"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(torch::randn({2, 3, 16, 18}), t); }, {"divisible by 4", "16x18"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(torch::randn({3, 16, 16}), t); }, {"[batch, 3, height, width]"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(torch::randn({2, 3, 16, 16}), torch::zeros({3}, torch::kLong)); },
                          {"one timestep per image", "[3]"}));
  EXPECT_TRUE(throws_with([&] { unet->forward(torch::randn({2, 3, 16, 16}), t, torch::randn({2, 3, 16, 16})); },
                          {"self_condition = false"}));

  auto o = tiny_unet_options(1, {1, 2});
  o.self_condition = true;
  Unet sc_unet(o);
  auto x = torch::randn({2, 1, 8, 8});
  EXPECT_TRUE(throws_with([&] { sc_unet->forward(x, t); }, {"self_condition = true", "x_self_cond"}));
  EXPECT_TRUE(throws_with([&] { sc_unet->forward(x, t, torch::randn({2, 1, 4, 4})); }, {"shape of x", "[2, 1, 4, 4]"}));
  EXPECT_NO_THROW(sc_unet->forward(x, t, torch::zeros_like(x)));
}

TEST(Unet, SelfConditioningChangesTheOutput) {
  torch::NoGradGuard no_grad;
  auto o = tiny_unet_options(1, {1, 2});
  o.self_condition = true;
  torch::manual_seed(1);
  Unet unet(o);
  auto x = torch::randn({1, 1, 8, 8});
  auto t = torch::tensor({10}, torch::kLong);
  EXPECT_FALSE(torch::allclose(unet->forward(x, t, torch::zeros_like(x)), unet->forward(x, t, torch::ones_like(x))));
}

TEST(UnetOptions, ValidateNamesTheField) {
  auto bad = [](auto mutate, const std::string& field) {
    UnetOptions o;
    mutate(o);
    return throws_with([&] { o.validate(); }, {"UnetOptions." + field});
  };
  EXPECT_TRUE(bad([](UnetOptions& o) { o.dim = 6 + 1; }, "dim"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.dim = 2; }, "dim"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.dim_mults = {}; }, "dim_mults"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.dim_mults = {1, 0}; }, "dim_mults"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.channels = 0; }, "channels"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.init_dim = 0; }, "init_dim"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.out_dim = -1; }, "out_dim"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.attn_heads = {4, 4}; }, "attn_heads"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.attn_dim_head = {0}; }, "attn_dim_head"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.full_attn = {true, false}; }, "full_attn"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.dropout = 1.0; }, "dropout"));
  EXPECT_TRUE(bad([](UnetOptions& o) { o.sinusoidal_pos_emb_theta = 1.0; }, "sinusoidal_pos_emb_theta"));
  EXPECT_TRUE(bad(
      [](UnetOptions& o) {
        o.learned_sinusoidal_cond = true;
        o.learned_sinusoidal_dim = 7;
      },
      "learned_sinusoidal_dim"));
  EXPECT_NO_THROW(UnetOptions{}.validate());
  UnetOptions odd;
  odd.dim = 3;
  EXPECT_THROW(Unet{odd}, std::invalid_argument);
}

TEST(UnetOptions, PerStageResolution) {
  UnetOptions o;
  EXPECT_EQ(o.stage_full_attn(), (std::vector<bool>{false, false, false, true}));
  o.full_attn = {true};
  EXPECT_EQ(o.stage_full_attn(), (std::vector<bool>{true, true, true, true}));
  o.attn_heads = {1, 2, 3, 4};
  EXPECT_EQ(o.stage_attn_heads(), (std::vector<int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(o.stage_attn_dim_head(), (std::vector<int64_t>{32, 32, 32, 32}));
  EXPECT_EQ(o.resolved_out_dim(), 3);
  o.learned_variance = true;
  EXPECT_EQ(o.resolved_out_dim(), 6);
}

TEST(UnetOptions, JsonRoundTripAndErrors) {
  UnetOptions o;
  EXPECT_EQ(UnetOptions::from_json(o.to_json()), o);
  o.dim = 32;
  o.init_dim = 20;
  o.out_dim = 2;
  o.dim_mults = {1, 3};
  o.channels = 1;
  o.self_condition = true;
  o.learned_sinusoidal_cond = true;
  o.learned_sinusoidal_dim = 12;
  o.sinusoidal_pos_emb_theta = 1234.5;
  o.dropout = 0.1;
  o.attn_heads = {2, 8};
  o.attn_dim_head = {16};
  o.full_attn = {true, false};
  o.flash_attn = true;
  EXPECT_EQ(UnetOptions::from_json(o.to_json()), o) << o.to_json();

  // Python-style scalars for per-stage fields, missing keys keep defaults.
  auto p = UnetOptions::from_json(R"({"dim": 16, "attn_heads": 2, "full_attn": true})");
  EXPECT_EQ(p.attn_heads, std::vector<int64_t>{2});
  EXPECT_EQ(p.full_attn, std::vector<bool>{true});
  EXPECT_EQ(p.dim_mults, (std::vector<int64_t>{1, 2, 4, 8}));
  EXPECT_TRUE(UnetOptions::from_json(R"({"full_attn": false})").full_attn.empty());

  EXPECT_TRUE(throws_with([] { UnetOptions::from_json(R"({"dimm": 16})"); }, {"\"dimm\"", "unknown key"}));
  EXPECT_TRUE(throws_with([] { UnetOptions::from_json(R"({"dim": "16"})"); }, {"\"dim\"", "expected an integer"}));
  EXPECT_TRUE(throws_with([] { UnetOptions::from_json(R"({"dim": 16.5})"); }, {"\"dim\"", "non-integer"}));
  EXPECT_TRUE(throws_with([] { UnetOptions::from_json(R"({"dim": 5})"); }, {"UnetOptions.dim"}));
  EXPECT_TRUE(throws_with([] { UnetOptions::from_json("[1]"); }, {"must be an object"}));
  EXPECT_TRUE(throws_with([] { UnetOptions::from_json("{"); }, {"UnetOptions JSON", "byte"}));
}

// A hand count for a tiny U-Net (dim 4, mults (1, 2), 1 channel, 1 head of width 2, 4x4 image):
// 2 x multiply-adds of every conv (2 cin cout k^2 HW), linear (2 in out) and attention matmul.
TEST(UnetFlops, MatchesHandCount) {
  UnetOptions o;
  o.dim = 4;
  o.dim_mults = {1, 2};
  o.channels = 1;
  o.attn_heads = {1};
  o.attn_dim_head = {2};
  // time_dim 16; dims [4, 4, 8]; stage 0 at 4x4 (16 px), stage 1 / mid at 2x2 (4 px)
  const int64_t time_mlp = 2 * 4 * 16 + 2 * 16 * 16;                 // 640
  const int64_t init_conv = 2 * 1 * 4 * 49 * 16;                     // 6272
  const int64_t res_4_4_at16 = 2 * 16 * 8 + 2 * (2 * 4 * 4 * 9 * 16);  // mlp + two 3x3 convs = 9472
  const int64_t lin_attn_4_at16 = 2 * 4 * 6 * 16                     // to_qkv
                                  + 2 * 2 * 2 * 20 + 2 * 2 * 2 * 16  // k v^T over 16+4 keys, ctx^T q
                                  + 2 * 2 * 4 * 16;                  // to_out = 1312
  const int64_t down0 = 2 * 16 * 4 * 4;                              // 1x1 conv 16->4 at 2x2 = 512
  const int64_t res_4_4_at4 = 2 * 16 * 8 + 2 * (2 * 4 * 4 * 9 * 4);    // 2560
  const int64_t full_attn_4_at4 = 2 * 4 * 6 * 4 + 2 * (2 * 4 * 8 * 2) + 2 * 2 * 4 * 4;  // 512
  const int64_t down1 = 2 * 4 * 8 * 9 * 4;                           // last: 3x3 conv 4->8 = 2304
  const int64_t res_8_8_at4 = 2 * 16 * 16 + 2 * (2 * 8 * 8 * 9 * 4);  // 9728
  const int64_t full_attn_8_at4 = 2 * 8 * 6 * 4 + 2 * (2 * 4 * 8 * 2) + 2 * 2 * 8 * 4;  // 768
  const int64_t res_12_8_at4 = 2 * 16 * 16 + 2 * 12 * 8 * 9 * 4 + 2 * 8 * 8 * 9 * 4 + 2 * 12 * 8 * 4;  // 12800
  const int64_t up0 = 2 * 8 * 4 * 9 * 16;                            // 3x3 conv 8->4 after 2x upsampling
  const int64_t res_8_4_at16 = 2 * 16 * 8 + 2 * 8 * 4 * 9 * 16 + 2 * 4 * 4 * 9 * 16 + 2 * 8 * 4 * 16;  // 15104
  const int64_t up1 = 2 * 4 * 4 * 9 * 16;                            // last: 3x3 conv 4->4
  const int64_t final_conv = 2 * 4 * 1 * 16;
  const int64_t per_image = time_mlp + init_conv + 2 * res_4_4_at16 + lin_attn_4_at16 + down0 + 2 * res_4_4_at4 +
                            full_attn_4_at4 + down1 + 2 * res_8_8_at4 + full_attn_8_at4 + 2 * res_12_8_at4 +
                            full_attn_8_at4 + up0 + 2 * res_8_4_at16 + lin_attn_4_at16 + up1 + res_8_4_at16 +
                            final_conv;
  EXPECT_EQ(per_image, 142'784);
  EXPECT_EQ(model::unet_forward_flops(o, 4, 1), per_image);
  EXPECT_EQ(model::unet_forward_flops(o, 4, 3), 3 * per_image);
  EXPECT_THROW(model::unet_forward_flops(o, 5, 1), std::invalid_argument);
}

TEST(UnetFlops, DefaultConfigAt64) {
  // The value itself is checked against torch.utils.flop_counter in Golden.FlopCountMatchesTorchFlopCounter;
  // here only how it scales.
  UnetOptions o;
  const auto f64 = model::unet_forward_flops(o, 64, 1);
  EXPECT_GT(f64, 1'000'000'000);
  EXPECT_EQ(model::unet_forward_flops(o, 64, 4), 4 * f64);
  EXPECT_GT(model::unet_forward_flops(o, 128, 1), 4 * f64);  // attention grows faster than the pixels
}

TEST(Unet, CpuAndGpuAgree_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto unet = golden_unet("b");
  const auto& g = cases();
  torch::NoGradGuard no_grad;
  auto cpu = unet->forward(g.at("forward_b.x"), g.at("forward_b.t"), g.at("forward_b.x_self_cond"));
  unet->to(torch::kCUDA);
  auto gpu = unet->forward(g.at("forward_b.x").cuda(), g.at("forward_b.t").cuda(), g.at("forward_b.x_self_cond").cuda());
  // TF32 may be on for convolutions on the GPU: compare at a looser, still meaningful, tolerance.
  EXPECT_LT(relative_max_error(gpu.cpu(), cpu), 5e-3);
}

/// fp32 on the GPU without TF32 (cuDNN allows it by default), restoring the global flags after.
class NoTf32 {
 public:
  NoTf32() : cudnn_(at::globalContext().allowTF32CuDNN()), cublas_(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTf32() {
    at::globalContext().setAllowTF32CuDNN(cudnn_);
    at::globalContext().setAllowTF32CuBLAS(cublas_);
  }

 private:
  bool cudnn_, cublas_;
};

/// The golden U-Net's output, input gradient and parameter gradients for one batch on `device`,
/// with the input in `format`; the loss weights every output element differently so each
/// gradient depends on every output position.
struct ForwardBackward {
  torch::Tensor out, dx;
  std::vector<torch::Tensor> grads;
};
ForwardBackward forward_backward(torch::Device device, torch::MemoryFormat format) {
  auto unet = golden_unet("b");
  unet->to(device);
  const auto& g = cases();
  auto x = g.at("forward_b.x").to(device).contiguous(format).requires_grad_(true);
  auto out = unet->forward(x, g.at("forward_b.t").to(device), g.at("forward_b.x_self_cond").to(device));
  auto weights = torch::linspace(-1, 1, out.numel(), torch::TensorOptions().device(device)).reshape(out.sizes());
  (out * weights).sum().backward();
  ForwardBackward r{out.detach().cpu(), x.grad().cpu(), {}};
  for (const auto& p : unet->parameters()) r.grads.push_back(p.grad().cpu());
  return r;
}

/// a equals b within float32 tolerance of a different kernel order: relative to b's largest value.
void expect_same_results(const ForwardBackward& a, const ForwardBackward& b, double tolerance, const std::string& what) {
  EXPECT_LT(relative_max_error(a.out, b.out), tolerance) << what << ": output";
  EXPECT_LT(relative_max_error(a.dx, b.dx), tolerance) << what << ": input gradient";
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i)
    EXPECT_LT(relative_max_error(a.grads[i], b.grads[i]), tolerance) << what << ": parameter " << i;
}

TEST(Unet, ForwardAndBackwardOnTheGpuEqualTheCpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  NoTf32 strict;
  auto cpu = forward_backward(torch::kCPU, torch::MemoryFormat::Contiguous);
  auto gpu = forward_backward(torch::kCUDA, torch::MemoryFormat::Contiguous);
  expect_same_results(gpu, cpu, 1e-4, "CUDA vs CPU");
}

// The trainer feeds CUDA batches as channels_last (train.channels_last): same numbers as contiguous.
void expect_channels_last_matches_contiguous(torch::Device device) {
  auto contiguous = forward_backward(device, torch::MemoryFormat::Contiguous);
  auto channels_last = forward_backward(device, torch::MemoryFormat::ChannelsLast);
  expect_same_results(channels_last, contiguous, 1e-4, "channels_last vs contiguous on " + device.str());
}

TEST(Unet, ChannelsLastEqualsContiguousOnCpu) { expect_channels_last_matches_contiguous(torch::kCPU); }

TEST(Unet, ChannelsLastEqualsContiguous_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  NoTf32 strict;
  expect_channels_last_matches_contiguous(torch::kCUDA);
}

}  // namespace
}  // namespace diffuse::testing
