// model/conditional_unet.h: the class-conditional U-Net of denoising-diffusion-pytorch 2.3.1's
// `classifier_free_guidance` module (its own `Unet(dim, num_classes, cond_drop_prob, ...)`), block
// for block, for classifier-free guidance (Ho & Salimans, arXiv:2207.12598).
//
// It is not the plain U-Net plus a class embedding: the reference module has its own, older blocks,
// and its state_dict follows them, so they are reproduced here exactly:
//   - a class embedding `classes_emb` (nn.Embedding) and a learned null embedding
//     `null_classes_emb` [dim] used for dropped conditions, both fed through `classes_mlp`
//     (Linear(dim, 4 dim), GELU, Linear(4 dim, 4 dim)); every ResnetBlock's `mlp` sees
//     cat(time embedding, class embedding), so its Linear takes 8 dim inputs;
//   - attention without memory key/values, normalised outside: `Residual(PreNorm(dim, fn))`, hence
//     names like `downs.0.2.fn.fn.to_qkv.weight` and `downs.0.2.fn.norm.g`; linear attention always
//     has 4 heads of 32 (attn_heads / attn_dim_head only shape the middle block's full attention);
//   - downsampling by a 4x4 stride-2 convolution (not pixel-unshuffle), no dropout, theta 10000.
// state_dict order: `null_classes_emb` first (a parameter of the U-Net itself), then init_conv,
// time_mlp, classes_emb, classes_mlp, downs, ups, mid_block1, mid_attn, mid_block2,
// final_res_block, final_conv. Seeded construction draws the reference's initial weights.
//
//   ConditionalUnetOptions options;                 // dim 64, mults {1, 2, 4, 8}, 3 channels
//   options.num_classes = 10;
//   ConditionalUnet unet(options);
//   auto out = unet->forward(x, t, classes);                          // conditioned on every class
//   auto keep = unet->draw_keep_mask(x.size(0), x.device(), gen);     // training: drop 50% of the labels
//   auto trained = unet->forward(x, t, classes, keep);
//   auto guided = unet->forward_with_cond_scale(x, t, classes, /*cond_scale=*/6., /*rescaled_phi=*/0.7);
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/unet_blocks.h"

namespace diffuse::model {

/// Constructor options of the reference `classifier_free_guidance.Unet`, same names and defaults
/// (num_classes has no default there; 10 here is only a placeholder to overwrite).
struct ConditionalUnetOptions {
  int64_t dim = 64;
  int64_t num_classes = 10;
  double cond_drop_prob = 0.5;      ///< probability that training replaces an image's class by the null embedding
  std::optional<int64_t> init_dim;  ///< default: dim
  std::optional<int64_t> out_dim;   ///< default: channels, or 2 * channels with learned_variance
  std::vector<int64_t> dim_mults{1, 2, 4, 8};
  int64_t channels = 3;
  bool learned_variance = false;
  bool learned_sinusoidal_cond = false;
  bool random_fourier_features = false;
  int64_t learned_sinusoidal_dim = 16;
  int64_t attn_dim_head = 32;  ///< the middle block's full attention only
  int64_t attn_heads = 4;      ///< the middle block's full attention only

  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;
  /// Every field as one JSON object (unset optionals as null); from_json(to_json()) == *this.
  std::string to_json() const;
  /// Parses to_json()'s format. Missing keys keep their defaults; unknown keys, wrong types and
  /// invalid values throw std::invalid_argument naming the key.
  static ConditionalUnetOptions from_json(const std::string& text);

  int64_t resolved_init_dim() const { return init_dim.value_or(dim); }
  int64_t resolved_out_dim() const { return out_dim.value_or(channels * (learned_variance ? 2 : 1)); }
  int64_t num_stages() const { return static_cast<int64_t>(dim_mults.size()); }

  bool operator==(const ConditionalUnetOptions&) const = default;
};

/// forward_with_cond_scale's result: the guided prediction and the unconditional one it was pushed
/// away from (undefined when cond_scale == 1, where no unconditional pass runs).
struct GuidedOutput {
  torch::Tensor guided;
  torch::Tensor null;
};

namespace blocks::cfg {

/// The classifier-free-guidance module's linear attention: like blocks::LinearAttention but without
/// memory key/values and without its own input norm (PreNorm supplies it). Children to_qkv, to_out.
class LinearAttentionImpl : public torch::nn::Module {
 public:
  LinearAttentionImpl(int64_t dim, int64_t heads = 4, int64_t dim_head = 32);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d to_qkv{nullptr};
  torch::nn::Sequential to_out{nullptr};

 private:
  int64_t heads_, dim_head_;
};
TORCH_MODULE(LinearAttention);

/// The module's full attention: softmax(q k^T / sqrt(d)) v over all positions, no memory
/// key/values, no input norm. Children to_qkv, to_out.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d to_qkv{nullptr}, to_out{nullptr};

 private:
  int64_t heads_, dim_head_;
};
TORCH_MODULE(Attention);

/// Residual(PreNorm(dim, attention)): x + attention(RMSNorm(x)). Child "fn" holds children "fn"
/// (the attention) and "norm", which gives the reference's names `<at>.fn.fn.*` and `<at>.fn.norm.g`.
class ResidualPreNormImpl : public torch::nn::Module {
 public:
  ResidualPreNormImpl(int64_t dim, LinearAttention linear, Attention full);
  torch::Tensor forward(const torch::Tensor& x);
  LinearAttention linear{nullptr};  ///< exactly one of linear / full is set
  Attention full{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(ResidualPreNorm);

/// One resolution: children "0".."3" = ResnetBlock, ResnetBlock, ResidualPreNorm(linear attention),
/// resample (a Conv2d, or Sequential(Upsample, Conv2d) for the inner up stages).
class StageImpl : public torch::nn::Module {
 public:
  StageImpl(ResnetBlock res0, ResnetBlock res1, ResidualPreNorm attn, torch::nn::Sequential resample_seq,
            torch::nn::Conv2d resample_conv);
  torch::Tensor resample(const torch::Tensor& x);
  ResnetBlock res0{nullptr}, res1{nullptr};
  ResidualPreNorm attn{nullptr};
  torch::nn::Sequential resample_seq{nullptr};
  torch::nn::Conv2d resample_conv{nullptr};
};
TORCH_MODULE(Stage);

}  // namespace blocks::cfg

/// The class-conditional U-Net. forward(x, time, classes, keep_mask) -> prediction with out_dim channels.
class ConditionalUnetImpl : public torch::nn::Module {
 public:
  explicit ConditionalUnetImpl(ConditionalUnetOptions options);

  /// x: [b, channels, H, W], H and W divisible by downsample_factor(); time: [b] timesteps;
  /// classes: int64 [b] in [0, num_classes). keep_mask: bool [b], false where the class is replaced
  /// by the null embedding (the reference's condition dropout); undefined keeps every class, which is
  /// the reference's forward with cond_drop_prob = 0. Violations throw c10::Error naming the shapes.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& time, const torch::Tensor& classes,
                        const torch::Tensor& keep_mask = {});

  /// The reference's training-time mask `prob_mask_like((b,), 1 - cond_drop_prob)`: bool [b] on
  /// `device`, true with probability 1 - drop_prob (default: options().cond_drop_prob). Draws b
  /// uniform floats from `generator` (on the generator's device, then moved) and keeps where
  /// u < 1 - drop_prob; drop_prob 0 (all kept) and 1 (all dropped) draw nothing, like the
  /// reference. The reference draws from torch's default generator (`torch.zeros(b).uniform_(0, 1)`
  /// without a generator argument); with that generator seeded like `generator`, the masks agree.
  torch::Tensor draw_keep_mask(int64_t batch, const torch::Device& device, torch::Generator generator,
                               std::optional<double> drop_prob = std::nullopt) const;

  /// Classifier-free guidance, the reference's forward_with_cond_scale: logits = forward(classes),
  /// null = forward(all classes dropped); update = logits - null, with its component parallel to
  /// logits (per sample, in float64) scaled by keep_parallel_frac when remove_parallel_component;
  /// guided = logits + (cond_scale - 1) update; if rescaled_phi != 0 the result is blended with its
  /// rescaling to logits' per-sample standard deviation (unbiased):
  /// phi * guided * std(logits) / std(guided) + (1 - phi) * guided. cond_scale == 1 returns logits
  /// alone (one pass), as the reference.
  GuidedOutput forward_with_cond_scale(const torch::Tensor& x, const torch::Tensor& time, const torch::Tensor& classes,
                                       double cond_scale, double rescaled_phi = 0.0,
                                       bool remove_parallel_component = true, double keep_parallel_frac = 0.0);

  const ConditionalUnetOptions& options() const { return options_; }
  /// 2^(stages - 1): image sides must be multiples of it.
  int64_t downsample_factor() const { return int64_t{1} << (options_.num_stages() - 1); }
  int64_t channels() const { return options_.channels; }
  int64_t out_dim() const { return options_.resolved_out_dim(); }
  int64_t num_classes() const { return options_.num_classes; }
  bool random_or_learned_sinusoidal_cond() const {
    return options_.learned_sinusoidal_cond || options_.random_fourier_features;
  }

  torch::Tensor null_classes_emb;  ///< [dim], the embedding of a dropped class
  // Submodules in the reference's state_dict order.
  torch::nn::Conv2d init_conv{nullptr};
  torch::nn::Sequential time_mlp{nullptr};
  torch::nn::Embedding classes_emb{nullptr};
  torch::nn::Sequential classes_mlp{nullptr};
  torch::nn::ModuleList downs{nullptr}, ups{nullptr};
  blocks::ResnetBlock mid_block1{nullptr};
  blocks::cfg::ResidualPreNorm mid_attn{nullptr};
  blocks::ResnetBlock mid_block2{nullptr};
  blocks::ResnetBlock final_res_block{nullptr};
  torch::nn::Conv2d final_conv{nullptr};

 private:
  ConditionalUnetOptions options_;
  std::vector<blocks::cfg::Stage> down_stages_, up_stages_;
};
TORCH_MODULE(ConditionalUnet);

}  // namespace diffuse::model
