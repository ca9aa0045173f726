// model/unet.h: the denoising U-Net of denoising-diffusion-pytorch 2.3.1, block for block.
//
// Same options and defaults as the reference `Unet`, same parameter names, shapes and state_dict
// order (see model/state_dict.h), same outputs for the same weights. Constructing it after
// `torch::manual_seed(s)` draws the initial weights in the reference's construction order, so it
// also starts from the same weights as `torch.manual_seed(s); Unet(...)` in Python.
//
//   diffuse::model::UnetOptions options;            // dim 64, dim_mults {1, 2, 4, 8}, 3 channels
//   diffuse::model::Unet unet(options);             // 35,711,491 parameters
//   auto out = unet->forward(x /*[b,3,H,W]*/, t /*[b] int64*/);   // [b, 3, H, W]
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/unet_blocks.h"

namespace diffuse::model {

/// Constructor options of the reference `Unet`, same names and defaults.
struct UnetOptions {
  int64_t dim = 64;
  std::optional<int64_t> init_dim;  ///< default: dim
  std::optional<int64_t> out_dim;   ///< default: channels, or 2 * channels with learned_variance
  std::vector<int64_t> dim_mults{1, 2, 4, 8};
  int64_t channels = 3;
  bool self_condition = false;
  bool learned_variance = false;
  bool learned_sinusoidal_cond = false;
  bool random_fourier_features = false;
  int64_t learned_sinusoidal_dim = 16;
  double sinusoidal_pos_emb_theta = 10000;
  double dropout = 0.0;  ///< in each ResnetBlock's first Block; masks use torch's default generator
  std::vector<int64_t> attn_dim_head{32};  ///< one entry for all stages, or one per stage
  std::vector<int64_t> attn_heads{4};      ///< one entry for all stages, or one per stage
  /// Full (softmax) attention per stage; other stages use linear attention. Empty = the reference
  /// default (only the innermost stage full, i.e. Python's full_attn=None/False); one entry = all
  /// stages (Python's full_attn=True is {true}); or one entry per stage. The middle block's
  /// attention is always full.
  std::vector<bool> full_attn{};
  /// Recorded for interoperability only: full attention always runs through
  /// at::scaled_dot_product_attention, which is what the reference's flash path calls too.
  bool flash_attn = false;

  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;
  /// Every field as one JSON object (unset optionals as null); from_json(to_json()) == *this.
  std::string to_json() const;
  /// Parses to_json()'s format. Missing keys keep their defaults; unknown keys, wrong types and
  /// invalid values throw std::invalid_argument naming the key.
  static UnetOptions from_json(const std::string& text);

  /// Resolved values, as the reference derives them.
  int64_t resolved_init_dim() const { return init_dim.value_or(dim); }
  int64_t resolved_out_dim() const { return out_dim.value_or(channels * (learned_variance ? 2 : 1)); }
  int64_t num_stages() const { return static_cast<int64_t>(dim_mults.size()); }
  /// Per-stage values after broadcasting one entry to every stage / applying the default.
  std::vector<bool> stage_full_attn() const;
  std::vector<int64_t> stage_attn_heads() const;
  std::vector<int64_t> stage_attn_dim_head() const;

  bool operator==(const UnetOptions&) const = default;
};

/// The U-Net denoiser. forward(x, time, x_self_cond) -> prediction with out_dim channels.
class UnetImpl : public torch::nn::Module {
 public:
  explicit UnetImpl(UnetOptions options);

  /// x: [b, channels, H, W] with H and W divisible by downsample_factor(); time: [b] timesteps
  /// (any numeric dtype; the reference passes int64). x_self_cond: [b, channels, H, W], required
  /// exactly when options().self_condition (pass zeros for "no self-conditioning", which is what
  /// the reference substitutes for None) and rejected otherwise. Every violated condition throws
  /// c10::Error with the expected and the given shapes.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& time,
                        const std::optional<torch::Tensor>& x_self_cond = std::nullopt);

  const UnetOptions& options() const { return options_; }
  /// 2^(stages - 1): image sides must be multiples of it.
  int64_t downsample_factor() const;
  int64_t channels() const { return options_.channels; }
  int64_t out_dim() const { return options_.resolved_out_dim(); }
  bool self_condition() const { return options_.self_condition; }
  /// The reference's `random_or_learned_sinusoidal_cond` (GaussianDiffusion refuses such a U-Net).
  bool random_or_learned_sinusoidal_cond() const {
    return options_.learned_sinusoidal_cond || options_.random_fourier_features;
  }

  // Submodules, registered in the reference's order (which is its state_dict order).
  torch::nn::Conv2d init_conv{nullptr};
  torch::nn::Sequential time_mlp{nullptr};
  torch::nn::ModuleList downs{nullptr}, ups{nullptr};
  blocks::ResnetBlock mid_block1{nullptr};
  blocks::Attention mid_attn{nullptr};
  blocks::ResnetBlock mid_block2{nullptr};
  blocks::ResnetBlock final_res_block{nullptr};
  torch::nn::Conv2d final_conv{nullptr};

 private:
  UnetOptions options_;
  std::vector<blocks::Stage> down_stages_, up_stages_;
};
TORCH_MODULE(Unet);

/// Floating-point operations of one forward pass at image_size x image_size for `batch` images,
/// counted as 2 x multiply-adds of every convolution, linear layer and attention matmul (the
/// convention of torch.utils.flop_counter and of MFU figures); elementwise work (norms,
/// activations, softmax, biases, resampling) is not counted. Forward + backward is about 3x this.
int64_t unet_forward_flops(const UnetOptions& options, int64_t image_size, int64_t batch = 1);

/// A lower bound on the activation values (elements) one image keeps alive for the backward pass
/// of a training step: the inputs and outputs of every convolution, norm and activation of the
/// resnet blocks, attention's projections (and, for full attention, its score matrix), and the
/// skip connections. For refusing impossible batch sizes up front; real use is higher.
int64_t unet_activation_elements(const UnetOptions& options, int64_t image_size);

}  // namespace diffuse::model
