// model/karras_unet.h: the magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and
// Improving the Training Dynamics of Diffusion Models", config G) as denoising-diffusion-pytorch 2.3.1
// implements it in karras_unet.py: no biases, no group norms, forced weight normalisation, MP-SiLU,
// MP-add and MP-cat, pixel norm, attention with memory key/values, optional class conditioning.
//
// Same options and defaults as the reference `KarrasUnet`, same parameter names, shapes and
// state_dict order, same outputs for the same weights (bit for bit on one CPU thread). Constructing it
// after `torch::manual_seed(s)` draws the weights in the reference's construction order, so it starts
// from the same weights as `torch.manual_seed(s); KarrasUnet(...)` in Python.
//
// Training mode matters: like the reference, every MP convolution and linear layer overwrites its
// stored weight with the normalised weight (under no-grad) at the start of each forward in training
// mode, so the parameters change by a forward pass alone (and an optimizer step's update is
// re-projected onto the sphere at the next forward). In eval mode the stored weights are left alone.
//
//   diffuse::model::KarrasUnetOptions options;   // EDM2 config G: dim 192, dim_max 768, 4 channels
//   options.image_size = 64;
//   diffuse::model::KarrasUnet unet(options);
//   auto out = unet->forward(x /*[b,4,64,64]*/, sigma_embedding /*[b] float*/);   // [b, 4, 64, 64]
//
// Two quirks of the reference are kept: its `resnet_mp_add_t` argument reaches no block (every
// encoder/decoder residual mixes with t = 0.3), so it is not an option here; and `attn_flash` is
// recorded for interoperability only (attention always runs the reference's non-flash math).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace diffuse::model {

/// Constructor options of the reference `KarrasUnet`, same names and defaults (image_size has none
/// in Python; 64 here).
struct KarrasUnetOptions {
  int64_t image_size = 64;
  int64_t dim = 192;
  int64_t dim_max = 768;               ///< channels double at each downsample, capped here
  std::optional<int64_t> num_classes;  ///< class conditioning (one-hot -> MP linear -> MP-add to time)
  int64_t channels = 4;
  int64_t num_downsamples = 3;
  int64_t num_blocks_per_stage = 4;
  std::vector<int64_t> attn_res{16, 8};  ///< resolutions whose blocks have attention
  int64_t fourier_dim = 16;
  int64_t attn_dim_head = 64;  ///< heads per block: max(ceil(block channels / attn_dim_head), 2)
  bool attn_flash = false;     ///< recorded only (see the file comment)
  double mp_cat_t = 0.5;       ///< skip concatenation blend
  double mp_add_emb_t = 0.5;   ///< time + class embedding blend
  double attn_res_mp_add_t = 0.3;
  double dropout = 0.1;  ///< in each block's second half; masks use torch's default generator
  bool self_condition = false;

  /// Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;
  /// Every field as one JSON object (num_classes null when unset); from_json(to_json()) == *this.
  std::string to_json() const;
  /// Parses to_json()'s format; missing keys keep defaults; unknown keys and bad values throw
  /// std::invalid_argument naming the key.
  static KarrasUnetOptions from_json(const std::string& text);

  bool operator==(const KarrasUnetOptions&) const = default;
};

namespace karras {

/// The reference's normalize_weight: each output row (all but dim 0 flattened) scaled to norm
/// sqrt(fan), fan = numel / rows, with L2 normalisation's eps.
torch::Tensor normalize_weight(const torch::Tensor& weight, double eps = 1e-4);
/// F.normalize(x, dim, eps) * sqrt(x.size(dim)).
torch::Tensor pixel_norm(const torch::Tensor& x, int64_t dim, double eps = 1e-4);
/// silu(x) / 0.596.
torch::Tensor mp_silu(const torch::Tensor& x);
/// (x (1 - t) + res t) / sqrt((1 - t)^2 + t^2).
torch::Tensor mp_add(const torch::Tensor& x, const torch::Tensor& res, double t);
/// Concatenation along `dim` with a and b weighted (1 - t) and t and the result's magnitude preserved.
torch::Tensor mp_cat(const torch::Tensor& a, const torch::Tensor& b, double t, int64_t dim);

/// Bias-free convolution ('same' padding) with a forced-normalised weight [out, in (+1), k, k];
/// concat_ones_to_input prepends a channel of ones to the input (the input block).
class ConvImpl : public torch::nn::Module {
 public:
  ConvImpl(int64_t dim_in, int64_t dim_out, int64_t kernel_size, bool concat_ones_to_input = false);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double fan_in_;
  bool concat_ones_;
};
TORCH_MODULE(Conv);

/// Bias-free linear layer with a forced-normalised weight [out, in].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t dim_in, int64_t dim_out);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;

 private:
  double fan_in_;
};
TORCH_MODULE(Linear);

/// x * gain, gain a scalar parameter starting at 0.
class GainImpl : public torch::nn::Module {
 public:
  GainImpl();
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor gain;
};
TORCH_MODULE(Gain);

/// Module form of mp_silu, for the Sequential containers the reference uses.
class MPSiLUImpl : public torch::nn::Module {
 public:
  torch::Tensor forward(const torch::Tensor& x) { return mp_silu(x); }
};
TORCH_MODULE(MPSiLU);

/// [sin | cos](2 pi t w) * sqrt(2) with frozen random frequencies `weights` [dim / 2].
class FourierEmbeddingImpl : public torch::nn::Module {
 public:
  explicit FourierEmbeddingImpl(int64_t dim);
  torch::Tensor forward(const torch::Tensor& time);
  torch::Tensor weights;
};
TORCH_MODULE(FourierEmbedding);

/// Multi-head attention over pixels: pixel-normed q, k, v, 4 learned memory key/values, MP-add residual.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, double mp_add_t, int64_t num_mem_kv = 4);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor mem_kv;
  Conv to_qkv{nullptr}, to_out{nullptr};

 private:
  int64_t heads_;
  double mp_add_t_;
};
TORCH_MODULE(Attention);

/// What an encoder or decoder block needs besides its widths.
struct BlockOptions {
  int64_t emb_dim = 0;
  double dropout = 0.1;
  bool has_attn = false;
  int64_t attn_dim_head = 64;
  double attn_res_mp_add_t = 0.3;
};

/// Encoder block: [bilinear downsample, 1x1 conv] -> pixel norm -> MP-SiLU, conv3x3 -> * (emb scale + 1)
/// -> MP-SiLU, dropout, conv3x3 -> MP-add with the normed input -> [attention].
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(int64_t dim, int64_t dim_out, const BlockOptions& options, bool downsample);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& emb);
  Conv downsample_conv{nullptr};
  torch::nn::Sequential to_emb{nullptr}, block1{nullptr}, block2{nullptr};
  Attention attn{nullptr};
};
TORCH_MODULE(Encoder);

/// Decoder block: [bilinear upsample] -> residual (1x1 conv if widths differ) -> the encoder's two
/// convolutions with the embedding scale -> MP-add -> [attention]. Upsampling blocks take no skip.
class DecoderImpl : public torch::nn::Module {
 public:
  DecoderImpl(int64_t dim, int64_t dim_out, const BlockOptions& options, bool upsample);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& emb);
  bool needs_skip() const { return !upsample_; }
  torch::nn::Sequential to_emb{nullptr}, block1{nullptr}, block2{nullptr};
  Conv res_conv{nullptr};
  Attention attn{nullptr};

 private:
  bool upsample_;
};
TORCH_MODULE(Decoder);

}  // namespace karras

/// The magnitude-preserving U-Net. forward(x, time, self_cond, class_labels) -> [b, channels, S, S].
class KarrasUnetImpl : public torch::nn::Module {
 public:
  explicit KarrasUnetImpl(KarrasUnetOptions options);

  /// x: [b, channels, image_size, image_size]; time: [b] (the noise level embedding, e.g. EDM's
  /// c_noise). self_cond: like x, only with options().self_condition (zeros when not given, as the
  /// reference). class_labels: required exactly when num_classes is set; int64 [b] class indices, or
  /// float [b, num_classes] (e.g. one-hot). Violations throw c10::Error with expected and given shapes.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& time,
                        const std::optional<torch::Tensor>& self_cond = std::nullopt,
                        const torch::Tensor& class_labels = {});

  const KarrasUnetOptions& options() const { return options_; }
  int64_t channels() const { return options_.channels; }
  int64_t out_dim() const { return options_.channels; }
  bool self_condition() const { return options_.self_condition; }
  int64_t downsample_factor() const { return int64_t{1} << options_.num_downsamples; }

  // Submodules, registered in the reference's order (which is its state_dict order).
  karras::Conv input_block{nullptr};
  torch::nn::Sequential output_block{nullptr}, to_time_emb{nullptr};
  karras::Linear to_class_emb{nullptr};
  torch::nn::ModuleList downs{nullptr}, ups{nullptr}, mids{nullptr};

 private:
  KarrasUnetOptions options_;
  std::vector<karras::Encoder> encoders_;
  std::vector<karras::Decoder> decoders_, middle_;
};
TORCH_MODULE(KarrasUnet);

/// Activation elements a training forward keeps for the backward pass, per image (an estimate for
/// the trainer's memory check, like unet_activation_elements).
int64_t karras_unet_activation_elements(const KarrasUnetOptions& options);

}  // namespace diffuse::model
