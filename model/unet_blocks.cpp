// model/unet_blocks.cpp: the U-Net's blocks. Every forward reproduces the reference's operation order
// (not just its math) so float32 results agree to rounding; every constructor draws its initial
// weights in the reference's order so a seeded construction matches Python's.
#include "model/unet_blocks.h"

#include <cmath>
#include <numbers>

namespace diffuse::model {
namespace blocks {

RMSNormImpl::RMSNormImpl(int64_t dim) : scale_(std::sqrt(static_cast<double>(dim))) {
  g = register_parameter("g", torch::ones({1, dim, 1, 1}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  namespace F = torch::nn::functional;
  return F::normalize(x, F::NormalizeFuncOptions().dim(1)) * g * scale_;
}

SinusoidalPosEmbImpl::SinusoidalPosEmbImpl(int64_t dim, double theta) : dim_(dim), theta_(theta) {}

torch::Tensor SinusoidalPosEmbImpl::forward(const torch::Tensor& time) {
  const int64_t half = dim_ / 2;
  const double step = std::log(theta_) / static_cast<double>(half - 1);
  // int64 arange times a double scalar yields float32 (the default dtype), as in the reference:
  // the embedding is float32 whatever the model's dtype.
  auto freqs = torch::exp(torch::arange(half, torch::TensorOptions(torch::kLong).device(time.device())) * -step);
  auto emb = time.unsqueeze(1) * freqs.unsqueeze(0);
  return torch::cat({emb.sin(), emb.cos()}, -1);
}

RandomOrLearnedSinusoidalPosEmbImpl::RandomOrLearnedSinusoidalPosEmbImpl(int64_t dim, bool is_random) {
  TORCH_CHECK(dim % 2 == 0, "learned_sinusoidal_dim must be even, got ", dim);
  weights = register_parameter("weights", torch::randn({dim / 2}), /*requires_grad=*/!is_random);
}

torch::Tensor RandomOrLearnedSinusoidalPosEmbImpl::forward(const torch::Tensor& time) {
  auto x = time.unsqueeze(1);
  auto freqs = x * weights.unsqueeze(0) * 2 * std::numbers::pi;
  auto fouriered = torch::cat({freqs.sin(), freqs.cos()}, -1);
  return torch::cat({x.to(fouriered.scalar_type()), fouriered}, -1);
}

torch::nn::Sequential time_mlp(int64_t dim, bool learned_sinusoidal_cond, bool random_fourier_features,
                               int64_t learned_sinusoidal_dim, double theta) {
  namespace nn = torch::nn;
  const int64_t time_dim = dim * 4;
  if (learned_sinusoidal_cond || random_fourier_features) {
    RandomOrLearnedSinusoidalPosEmb pos(learned_sinusoidal_dim, random_fourier_features);
    nn::Linear l1(learned_sinusoidal_dim + 1, time_dim);
    nn::Linear l2(time_dim, time_dim);
    return nn::Sequential(pos, l1, nn::GELU(), l2);
  }
  SinusoidalPosEmb pos(dim, theta);
  nn::Linear l1(dim, time_dim);
  nn::Linear l2(time_dim, time_dim);
  return nn::Sequential(pos, l1, nn::GELU(), l2);
}

BlockImpl::BlockImpl(int64_t dim, int64_t dim_out, double dropout) : dropout_(dropout) {
  proj = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim_out, 3).padding(1)));
  norm = register_module("norm", RMSNorm(dim_out));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& shift) {
  auto h = norm(proj(x));
  if (scale.defined()) h = h * (scale + 1) + shift;
  h = torch::silu(h);
  // p == 0 is skipped (and draws no random numbers), exactly like nn.Dropout(0).
  return dropout_ > 0 ? torch::dropout(h, dropout_, is_training()) : h;
}

ResnetBlockImpl::ResnetBlockImpl(int64_t dim, int64_t dim_out, int64_t time_emb_dim, double dropout) {
  mlp = register_module("mlp", torch::nn::Sequential(torch::nn::SiLU(), torch::nn::Linear(time_emb_dim, dim_out * 2)));
  block1 = register_module("block1", Block(dim, dim_out, dropout));
  block2 = register_module("block2", Block(dim_out, dim_out, 0.0));
  if (dim != dim_out) res_conv = register_module("res_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim_out, 1)));
}

torch::Tensor ResnetBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& time_emb) {
  auto emb = mlp->forward(time_emb).unsqueeze(-1).unsqueeze(-1);
  auto scale_shift = emb.chunk(2, 1);
  auto h = block1(x, scale_shift[0], scale_shift[1]);
  h = block2(h);
  return h + (res_conv ? res_conv(x) : x);
}

LinearAttentionImpl::LinearAttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t num_mem_kv)
    : heads_(heads), dim_head_(dim_head) {
  const int64_t hidden = heads * dim_head;
  norm = register_module("norm", RMSNorm(dim));
  mem_kv = register_parameter("mem_kv", torch::randn({2, heads, dim_head, num_mem_kv}));
  to_qkv = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, hidden * 3, 1).bias(false)));
  to_out = register_module("to_out", torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(hidden, dim, 1)),
                                                           RMSNorm(dim)));
}

torch::Tensor LinearAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3), n = height * width;
  auto qkv = to_qkv(norm(x)).chunk(3, 1);
  // 'b (h c) x y -> b h c (x y)'
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, heads_, dim_head_, n}); };
  auto q = split(qkv[0]), k = split(qkv[1]), v = split(qkv[2]);
  auto mem_k = mem_kv[0].unsqueeze(0).expand({b, -1, -1, -1});
  auto mem_v = mem_kv[1].unsqueeze(0).expand({b, -1, -1, -1});
  k = torch::cat({mem_k, k}, -1);
  v = torch::cat({mem_v, v}, -1);
  q = q.softmax(-2);
  k = k.softmax(-1);
  q = q * std::pow(static_cast<double>(dim_head_), -0.5);
  auto context = torch::einsum("bhdn,bhen->bhde", {k, v});
  auto out = torch::einsum("bhde,bhdn->bhen", {context, q});
  return to_out->forward(out.reshape({b, heads_ * dim_head_, height, width}));
}

AttentionImpl::AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t num_mem_kv)
    : heads_(heads), dim_head_(dim_head) {
  const int64_t hidden = heads * dim_head;
  norm = register_module("norm", RMSNorm(dim));
  mem_kv = register_parameter("mem_kv", torch::randn({2, heads, num_mem_kv, dim_head}));
  to_qkv = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, hidden * 3, 1).bias(false)));
  to_out = register_module("to_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(hidden, dim, 1)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3), n = height * width;
  auto qkv = to_qkv(norm(x)).chunk(3, 1);
  // 'b (h c) x y -> b h (x y) c'
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, heads_, dim_head_, n}).transpose(-1, -2); };
  auto q = split(qkv[0]), k = split(qkv[1]), v = split(qkv[2]);
  auto mem_k = mem_kv[0].unsqueeze(0).expand({b, -1, -1, -1});
  auto mem_v = mem_kv[1].unsqueeze(0).expand({b, -1, -1, -1});
  k = torch::cat({mem_k, k}, -2);
  v = torch::cat({mem_v, v}, -2);
  // Default scale dim_head^-0.5, no mask, no dropout: the reference's math, fused where possible.
  auto out = at::scaled_dot_product_attention(q, k, v);
  // 'b h (x y) d -> b (h d) x y'
  return to_out(out.transpose(-1, -2).reshape({b, heads_ * dim_head_, height, width}));
}

StageImpl::StageImpl(ResnetBlock res0_, ResnetBlock res1_, LinearAttention linear_attn_, Attention full_attn_,
                     torch::nn::Sequential resample_seq_, torch::nn::Conv2d resample_conv_) {
  res0 = register_module("0", std::move(res0_));
  res1 = register_module("1", std::move(res1_));
  if (linear_attn_) {
    linear_attn = register_module("2", std::move(linear_attn_));
  } else {
    full_attn = register_module("2", std::move(full_attn_));
  }
  if (resample_seq_) {
    resample_seq = register_module("3", std::move(resample_seq_));
  } else {
    resample_conv = register_module("3", std::move(resample_conv_));
  }
}

torch::Tensor StageImpl::attend(const torch::Tensor& x) { return linear_attn ? linear_attn(x) : full_attn(x); }

torch::Tensor StageImpl::resample(const torch::Tensor& x) {
  return resample_seq ? resample_seq->forward(x) : resample_conv(x);
}

}  // namespace blocks

}  // namespace diffuse::model
