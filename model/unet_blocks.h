// model/unet_blocks.h: the building blocks of the U-Net, one class per block of the reference
// (denoising-diffusion-pytorch 2.3.1), with the same submodule names so parameter names match its
// state_dict (`block1.proj.weight`, `to_out.0.weight`, `mlp.1.bias`, ...). Sequential containers
// are used exactly where the reference uses nn.Sequential, so their numeric child names match too.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace diffuse::model::blocks {

/// RMSNorm over channels: `normalize(x, dim=1) * g * sqrt(C)`; `g` has shape (1, C, 1, 1).
class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(int64_t dim);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor g;

 private:
  double scale_;
};
TORCH_MODULE(RMSNorm);

/// Fixed sinusoidal time embedding [sin | cos] of width 2*(dim/2), always float32 (no parameters).
class SinusoidalPosEmbImpl : public torch::nn::Module {
 public:
  SinusoidalPosEmbImpl(int64_t dim, double theta);
  torch::Tensor forward(const torch::Tensor& time);

 private:
  int64_t dim_;
  double theta_;
};
TORCH_MODULE(SinusoidalPosEmb);

/// Random (frozen) or learned Fourier features: [t | sin(2 pi t w) | cos(2 pi t w)], width dim+1.
class RandomOrLearnedSinusoidalPosEmbImpl : public torch::nn::Module {
 public:
  RandomOrLearnedSinusoidalPosEmbImpl(int64_t dim, bool is_random);
  torch::Tensor forward(const torch::Tensor& time);
  torch::Tensor weights;
};
TORCH_MODULE(RandomOrLearnedSinusoidalPosEmb);

/// The time embedding MLP, Sequential(pos-emb [0], Linear [1], GELU [2], Linear [3]) to 4 * dim:
/// RandomOrLearnedSinusoidalPosEmb(learned_dim) when learned or random, else SinusoidalPosEmb(dim,
/// theta). Constructed in the reference's order, so seeded weights match.
torch::nn::Sequential time_mlp(int64_t dim, bool learned_sinusoidal_cond, bool random_fourier_features,
                               int64_t learned_sinusoidal_dim, double theta);

/// conv3x3 -> RMSNorm -> optional `x * (scale + 1) + shift` -> SiLU -> dropout.
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(int64_t dim, int64_t dim_out, double dropout = 0.0);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& scale = {},
                        const torch::Tensor& shift = {});
  torch::nn::Conv2d proj{nullptr};
  RMSNorm norm{nullptr};

 private:
  double dropout_;
};
TORCH_MODULE(Block);

/// Two Blocks with a time-conditioned scale/shift on the first and a residual (1x1 conv when
/// the width changes). `mlp` = Sequential(SiLU, Linear(time_dim, 2 * dim_out)).
class ResnetBlockImpl : public torch::nn::Module {
 public:
  ResnetBlockImpl(int64_t dim, int64_t dim_out, int64_t time_emb_dim, double dropout);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& time_emb);
  torch::nn::Sequential mlp{nullptr};
  Block block1{nullptr}, block2{nullptr};
  torch::nn::Conv2d res_conv{nullptr};  ///< null when dim == dim_out (the reference's nn.Identity)
};
TORCH_MODULE(ResnetBlock);

/// Linear attention (softmax over features for q, over positions for k) with 4 learned memory
/// key/values prepended; output projection followed by RMSNorm.
class LinearAttentionImpl : public torch::nn::Module {
 public:
  LinearAttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t num_mem_kv = 4);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor mem_kv;  ///< (2, heads, dim_head, num_mem_kv)
  RMSNorm norm{nullptr};
  torch::nn::Conv2d to_qkv{nullptr};
  torch::nn::Sequential to_out{nullptr};

 private:
  int64_t heads_, dim_head_;
};
TORCH_MODULE(LinearAttention);

/// Full softmax attention over all positions (via at::scaled_dot_product_attention) with 4 learned
/// memory key/values prepended; plain 1x1 output projection (no norm, unlike LinearAttention).
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t num_mem_kv = 4);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor mem_kv;  ///< (2, heads, num_mem_kv, dim_head)
  RMSNorm norm{nullptr};
  torch::nn::Conv2d to_qkv{nullptr};
  torch::nn::Conv2d to_out{nullptr};

 private:
  int64_t heads_, dim_head_;
};
TORCH_MODULE(Attention);

/// One resolution of the U-Net, the reference's ModuleList([resnet, resnet, attention, resample]):
/// children "0".."3". Exactly one of `linear_attn`/`full_attn` and one of `resample_seq`/
/// `resample_conv` is set.
class StageImpl : public torch::nn::Module {
 public:
  StageImpl(ResnetBlock res0, ResnetBlock res1, LinearAttention linear_attn, Attention full_attn,
            torch::nn::Sequential resample_seq, torch::nn::Conv2d resample_conv);
  torch::Tensor attend(const torch::Tensor& x);
  torch::Tensor resample(const torch::Tensor& x);
  ResnetBlock res0{nullptr}, res1{nullptr};
  LinearAttention linear_attn{nullptr};
  Attention full_attn{nullptr};
  torch::nn::Sequential resample_seq{nullptr};
  torch::nn::Conv2d resample_conv{nullptr};
};
TORCH_MODULE(Stage);

}  // namespace diffuse::model::blocks
