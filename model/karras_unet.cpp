// model/karras_unet.cpp: the magnitude-preserving U-Net. Every forward reproduces the reference's
// operation order (not just its math) so float32 results agree to rounding; every constructor draws its
// initial weights in the reference's order so a seeded construction matches Python's.
#include "model/karras_unet.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <numbers>
#include <stdexcept>

#include "util/json.h"

namespace diffuse::model {
namespace json = util::json;

// ---------------------------------------------------------------------------------------------
// Options

namespace {

[[noreturn]] void invalid(const std::string& field, const std::string& value, const std::string& allowed) {
  throw std::invalid_argument("KarrasUnetOptions." + field + " = " + value + " is invalid: " + allowed);
}

}  // namespace

void KarrasUnetOptions::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v < 1) invalid(name, std::to_string(v), "must be positive");
  };
  positive("image_size", image_size);
  positive("dim", dim);
  positive("dim_max", dim_max);
  positive("channels", channels);
  positive("num_blocks_per_stage", num_blocks_per_stage);
  positive("attn_dim_head", attn_dim_head);
  if (num_classes) positive("num_classes", *num_classes);
  if (num_downsamples < 0) invalid("num_downsamples", std::to_string(num_downsamples), "must be >= 0");
  if (image_size % (int64_t{1} << std::min<int64_t>(num_downsamples, 62)) != 0) {
    invalid("image_size", std::to_string(image_size),
            "must be divisible by 2^num_downsamples = " + std::to_string(int64_t{1} << num_downsamples));
  }
  if (fourier_dim < 2 || fourier_dim % 2 != 0) invalid("fourier_dim", std::to_string(fourier_dim), "must be even and >= 2");
  for (auto [name, t] : {std::pair{"mp_cat_t", mp_cat_t}, {"mp_add_emb_t", mp_add_emb_t},
                         {"attn_res_mp_add_t", attn_res_mp_add_t}}) {
    if (!(t >= 0 && t <= 1)) invalid(name, json::number(t), "must be in [0, 1]");
  }
  if (!(dropout >= 0 && dropout < 1)) invalid("dropout", json::number(dropout), "must be in [0, 1)");
}

std::string KarrasUnetOptions::to_json() const {
  auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  std::string res = "[";
  for (size_t i = 0; i < attn_res.size(); ++i) {
    if (i) res += ',';
    res += std::to_string(attn_res[i]);
  }
  res += "]";
  return "{\"image_size\":" + std::to_string(image_size) + ",\"dim\":" + std::to_string(dim) +
         ",\"dim_max\":" + std::to_string(dim_max) +
         ",\"num_classes\":" + (num_classes ? std::to_string(*num_classes) : std::string("null")) +
         ",\"channels\":" + std::to_string(channels) + ",\"num_downsamples\":" + std::to_string(num_downsamples) +
         ",\"num_blocks_per_stage\":" + std::to_string(num_blocks_per_stage) + ",\"attn_res\":" + res +
         ",\"fourier_dim\":" + std::to_string(fourier_dim) + ",\"attn_dim_head\":" + std::to_string(attn_dim_head) +
         ",\"attn_flash\":" + boolean(attn_flash) + ",\"mp_cat_t\":" + json::number(mp_cat_t) +
         ",\"mp_add_emb_t\":" + json::number(mp_add_emb_t) +
         ",\"attn_res_mp_add_t\":" + json::number(attn_res_mp_add_t) + ",\"dropout\":" + json::number(dropout) +
         ",\"self_condition\":" + boolean(self_condition) + "}";
}

KarrasUnetOptions KarrasUnetOptions::from_json(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("KarrasUnetOptions JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) {
    throw std::invalid_argument(std::string("KarrasUnetOptions JSON must be an object, got ") + root.type_name());
  }
  KarrasUnetOptions o;
  for (const auto& [key, value] : root.as_object()) {
    try {
      if (key == "image_size") o.image_size = value.as_int64();
      else if (key == "dim") o.dim = value.as_int64();
      else if (key == "dim_max") o.dim_max = value.as_int64();
      else if (key == "num_classes") o.num_classes = value.is_null() ? std::optional<int64_t>() : value.as_int64();
      else if (key == "channels") o.channels = value.as_int64();
      else if (key == "num_downsamples") o.num_downsamples = value.as_int64();
      else if (key == "num_blocks_per_stage") o.num_blocks_per_stage = value.as_int64();
      else if (key == "attn_res") {
        // Python accepts one int where it takes a tuple; so do we.
        o.attn_res.clear();
        if (value.type() == json::Value::Type::Number) o.attn_res.push_back(value.as_int64());
        else for (const auto& v : value.as_array()) o.attn_res.push_back(v.as_int64());
      } else if (key == "fourier_dim") o.fourier_dim = value.as_int64();
      else if (key == "attn_dim_head") o.attn_dim_head = value.as_int64();
      else if (key == "attn_flash") o.attn_flash = value.as_bool();
      else if (key == "mp_cat_t") o.mp_cat_t = value.as_double();
      else if (key == "mp_add_emb_t") o.mp_add_emb_t = value.as_double();
      else if (key == "attn_res_mp_add_t") o.attn_res_mp_add_t = value.as_double();
      else if (key == "dropout") o.dropout = value.as_double();
      else if (key == "self_condition") o.self_condition = value.as_bool();
      else throw std::invalid_argument("unknown key");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("KarrasUnetOptions JSON key \"" + key + "\": " + e.what());
    }
  }
  o.validate();
  return o;
}

// ---------------------------------------------------------------------------------------------
// Magnitude-preserving operations and blocks

namespace karras {
namespace F = torch::nn::functional;

torch::Tensor normalize_weight(const torch::Tensor& weight, double eps) {
  auto rows = weight.reshape({weight.size(0), -1});
  const double fan = static_cast<double>(rows.numel()) / static_cast<double>(rows.size(0));
  auto normed = F::normalize(rows, F::NormalizeFuncOptions().dim(-1).eps(eps)) * std::sqrt(fan);
  return normed.reshape(weight.sizes());
}

torch::Tensor pixel_norm(const torch::Tensor& x, int64_t dim, double eps) {
  return F::normalize(x, F::NormalizeFuncOptions().dim(dim).eps(eps)) * std::sqrt(static_cast<double>(x.size(dim)));
}

torch::Tensor mp_silu(const torch::Tensor& x) { return torch::silu(x) / 0.596; }

torch::Tensor mp_add(const torch::Tensor& x, const torch::Tensor& res, double t) {
  auto num = x * (1. - t) + res * t;
  return num / std::sqrt(std::pow(1. - t, 2) + std::pow(t, 2));
}

torch::Tensor mp_cat(const torch::Tensor& a, const torch::Tensor& b, double t, int64_t dim) {
  const double na = static_cast<double>(a.size(dim)), nb = static_cast<double>(b.size(dim));
  const double c = std::sqrt((na + nb) / (std::pow(1. - t, 2) + std::pow(t, 2)));
  return c * torch::cat({a * (1. - t) / std::sqrt(na), b * t / std::sqrt(nb)}, dim);
}

namespace {
constexpr double kWeightEps = 1e-4;

// In training mode the reference overwrites the stored weight with its normalised copy before use.
torch::Tensor forced_normalised(torch::nn::Module& module, torch::Tensor& weight, double fan_in) {
  if (module.is_training()) {
    torch::NoGradGuard no_grad;
    weight.copy_(normalize_weight(weight, kWeightEps));
  }
  return normalize_weight(weight, kWeightEps) / std::sqrt(fan_in);
}
}  // namespace

ConvImpl::ConvImpl(int64_t dim_in, int64_t dim_out, int64_t kernel_size, bool concat_ones_to_input)
    : fan_in_(static_cast<double>(dim_in * kernel_size * kernel_size)), concat_ones_(concat_ones_to_input) {
  weight = register_parameter("weight",
                              torch::randn({dim_out, dim_in + (concat_ones_to_input ? 1 : 0), kernel_size, kernel_size}));
}

torch::Tensor ConvImpl::forward(const torch::Tensor& x) {
  auto w = forced_normalised(*this, weight, fan_in_);
  auto input = concat_ones_ ? torch::constant_pad_nd(x, {0, 0, 0, 0, 1, 0}, 1.) : x;
  return at::conv2d(input, w, /*bias=*/{}, /*stride=*/1, /*padding=*/"same");
}

LinearImpl::LinearImpl(int64_t dim_in, int64_t dim_out) : fan_in_(static_cast<double>(dim_in)) {
  weight = register_parameter("weight", torch::randn({dim_out, dim_in}));
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) { return torch::linear(x, forced_normalised(*this, weight, fan_in_)); }

GainImpl::GainImpl() { gain = register_parameter("gain", torch::tensor(0.f)); }

torch::Tensor GainImpl::forward(const torch::Tensor& x) { return x * gain; }

FourierEmbeddingImpl::FourierEmbeddingImpl(int64_t dim) {
  TORCH_CHECK(dim % 2 == 0, "KarrasUnet fourier_dim must be even, got ", dim);
  weights = register_parameter("weights", torch::randn({dim / 2}), /*requires_grad=*/false);
}

torch::Tensor FourierEmbeddingImpl::forward(const torch::Tensor& time) {
  auto freqs = time.unsqueeze(1) * weights.unsqueeze(0) * 2 * std::numbers::pi;
  return torch::cat({freqs.sin(), freqs.cos()}, -1) * std::sqrt(2.);
}

AttentionImpl::AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head, double mp_add_t, int64_t num_mem_kv)
    : heads_(heads), mp_add_t_(mp_add_t) {
  mem_kv = register_parameter("mem_kv", torch::randn({2, heads, num_mem_kv, dim_head}));
  to_qkv = register_module("to_qkv", Conv(dim, dim_head * heads * 3, 1));
  to_out = register_module("to_out", Conv(dim_head * heads, dim, 1));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), h = x.size(2), w = x.size(3);
  auto qkv = to_qkv->forward(x).chunk(3, 1);
  // 'b (h c) x y -> b h (x y) c', as einops does it: a view, then a permutation.
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, heads_, -1, h * w}).permute({0, 1, 3, 2}); };
  auto q = split(qkv[0]);
  auto k = torch::cat({mem_kv[0].unsqueeze(0).expand({b, -1, -1, -1}), split(qkv[1])}, -2);
  auto v = torch::cat({mem_kv[1].unsqueeze(0).expand({b, -1, -1, -1}), split(qkv[2])}, -2);
  q = pixel_norm(q, -1);
  k = pixel_norm(k, -1);
  v = pixel_norm(v, -1);
  const double scale = std::pow(static_cast<double>(q.size(-1)), -0.5);
  auto sim = torch::einsum("bhid,bhjd->bhij", {q, k}) * scale;
  auto attn = sim.softmax(-1);
  auto out = torch::einsum("bhij,bhjd->bhid", {attn, v});
  out = out.permute({0, 1, 3, 2}).reshape({b, -1, h, w});
  return mp_add(to_out->forward(out), x, mp_add_t_);
}

namespace {

torch::nn::Sequential embedding_scale(int64_t emb_dim, int64_t dim_out) {
  Linear linear(emb_dim, dim_out);
  return torch::nn::Sequential(linear, Gain());
}

Attention block_attention(int64_t dim_out, const BlockOptions& o) {
  const auto heads = std::max<int64_t>(
      static_cast<int64_t>(std::ceil(static_cast<double>(dim_out) / static_cast<double>(o.attn_dim_head))), 2);
  return Attention(dim_out, heads, o.attn_dim_head, o.attn_res_mp_add_t);
}

// The reference's residual blend in every encoder and decoder (its resnet_mp_add_t never arrives).
constexpr double kResidualT = 0.3;

torch::Tensor scale_by_embedding(const torch::Tensor& x, torch::nn::Sequential& to_emb, const torch::Tensor& emb) {
  if (!emb.defined()) return x;
  auto scale = to_emb->forward(emb) + 1;
  return x * scale.unsqueeze(-1).unsqueeze(-1);
}

// F.interpolate(x, (h * factor, w * factor), mode='bilinear'): sizes given, align_corners false.
torch::Tensor bilinear_resize(const torch::Tensor& x, double factor) {
  auto side = [&](int64_t n) { return static_cast<int64_t>(static_cast<double>(n) * factor); };
  return F::interpolate(x, F::InterpolateFuncOptions()
                               .size(std::vector<int64_t>{side(x.size(-2)), side(x.size(-1))})
                               .mode(torch::kBilinear)
                               .align_corners(false));
}

}  // namespace

EncoderImpl::EncoderImpl(int64_t dim, int64_t dim_out, const BlockOptions& o, bool downsample) {
  int64_t current = dim;
  if (downsample) {
    downsample_conv = register_module("downsample_conv", Conv(current, dim_out, 1));
    current = dim_out;
  }
  to_emb = register_module("to_emb", embedding_scale(o.emb_dim, dim_out));
  Conv conv1(current, dim_out, 3);
  block1 = register_module("block1", torch::nn::Sequential(MPSiLU(), conv1));
  Conv conv2(dim_out, dim_out, 3);
  block2 = register_module("block2", torch::nn::Sequential(MPSiLU(), torch::nn::Dropout(o.dropout), conv2));
  if (o.has_attn) attn = register_module("attn", block_attention(dim_out, o));
}

torch::Tensor EncoderImpl::forward(const torch::Tensor& input, const torch::Tensor& emb) {
  auto x = input;
  if (downsample_conv) x = downsample_conv->forward(bilinear_resize(x, 0.5));
  x = pixel_norm(x, 1);
  auto res = x.clone();
  x = block1->forward(x);
  x = scale_by_embedding(x, to_emb, emb);
  x = block2->forward(x);
  x = mp_add(x, res, kResidualT);
  if (attn) x = attn->forward(x);
  return x;
}

DecoderImpl::DecoderImpl(int64_t dim, int64_t dim_out, const BlockOptions& o, bool upsample) : upsample_(upsample) {
  to_emb = register_module("to_emb", embedding_scale(o.emb_dim, dim_out));
  Conv conv1(dim, dim_out, 3);
  block1 = register_module("block1", torch::nn::Sequential(MPSiLU(), conv1));
  Conv conv2(dim_out, dim_out, 3);
  block2 = register_module("block2", torch::nn::Sequential(MPSiLU(), torch::nn::Dropout(o.dropout), conv2));
  if (dim != dim_out) res_conv = register_module("res_conv", Conv(dim, dim_out, 1));
  if (o.has_attn) attn = register_module("attn", block_attention(dim_out, o));
}

torch::Tensor DecoderImpl::forward(const torch::Tensor& input, const torch::Tensor& emb) {
  auto x = input;
  if (upsample_) x = bilinear_resize(x, 2);
  auto res = res_conv ? res_conv->forward(x) : x;
  x = block1->forward(x);
  x = scale_by_embedding(x, to_emb, emb);
  x = block2->forward(x);
  x = mp_add(x, res, kResidualT);
  if (attn) x = attn->forward(x);
  return x;
}

}  // namespace karras

// ---------------------------------------------------------------------------------------------
// The U-Net

KarrasUnetImpl::KarrasUnetImpl(KarrasUnetOptions options) : options_(std::move(options)) {
  using namespace karras;
  options_.validate();
  const auto& o = options_;
  const int64_t input_channels = o.channels * (o.self_condition ? 2 : 1);
  const int64_t emb_dim = o.dim * 4;

  input_block = register_module("input_block", Conv(input_channels, o.dim, 3, /*concat_ones_to_input=*/true));
  Conv output_conv(o.dim, o.channels, 3);
  output_block = register_module("output_block", torch::nn::Sequential(output_conv, Gain()));
  FourierEmbedding fourier(o.fourier_dim);
  Linear time_linear(o.fourier_dim, emb_dim);
  to_time_emb = register_module("to_time_emb", torch::nn::Sequential(fourier, time_linear));
  if (o.num_classes) to_class_emb = register_module("to_class_emb", Linear(*o.num_classes, 4 * o.dim));

  // Blocks are constructed (and draw their weights) in the reference's order; the decoders are
  // prepended as they are made, so the decoder list is the reverse of construction order.
  BlockOptions block{.emb_dim = emb_dim, .dropout = o.dropout, .has_attn = false, .attn_dim_head = o.attn_dim_head,
                     .attn_res_mp_add_t = o.attn_res_mp_add_t};
  auto with_attn = [&](bool has_attn) {
    auto b = block;
    b.has_attn = has_attn;
    return b;
  };
  auto attn_at = [&](int64_t res) { return std::find(o.attn_res.begin(), o.attn_res.end(), res) != o.attn_res.end(); };
  std::deque<Decoder> decoders;
  int64_t current_dim = o.dim, current_res = o.image_size;
  decoders.push_front(Decoder(o.dim * 2, o.dim, block, false));
  for (int64_t i = 0; i < o.num_blocks_per_stage; ++i) {
    encoders_.push_back(Encoder(current_dim, current_dim, block, false));
    decoders.push_front(Decoder(current_dim * 2, current_dim, block, false));
  }
  for (int64_t s = 0; s < o.num_downsamples; ++s) {
    const int64_t dim_out = std::min(o.dim_max, current_dim * 2);
    Decoder upsample(dim_out, current_dim, with_attn(attn_at(current_res)), /*upsample=*/true);
    current_res /= 2;
    const bool has_attn = attn_at(current_res);
    encoders_.push_back(Encoder(current_dim, dim_out, with_attn(has_attn), /*downsample=*/true));
    decoders.push_front(upsample);
    decoders.push_front(Decoder(dim_out * 2, dim_out, with_attn(has_attn), false));
    for (int64_t i = 0; i < o.num_blocks_per_stage; ++i) {
      encoders_.push_back(Encoder(dim_out, dim_out, with_attn(has_attn), false));
      decoders.push_front(Decoder(dim_out * 2, dim_out, with_attn(has_attn), false));
    }
    current_dim = dim_out;
  }
  const bool mid_has_attn = attn_at(current_res);
  for (int i = 0; i < 2; ++i) middle_.push_back(Decoder(current_dim, current_dim, with_attn(mid_has_attn), false));
  decoders_.assign(decoders.begin(), decoders.end());

  downs = register_module("downs", torch::nn::ModuleList());
  for (auto& e : encoders_) downs->push_back(e);
  ups = register_module("ups", torch::nn::ModuleList());
  for (auto& d : decoders_) ups->push_back(d);
  mids = register_module("mids", torch::nn::ModuleList());
  for (auto& d : middle_) mids->push_back(d);
}

torch::Tensor KarrasUnetImpl::forward(const torch::Tensor& x, const torch::Tensor& time,
                                      const std::optional<torch::Tensor>& self_cond, const torch::Tensor& class_labels) {
  const auto& o = options_;
  TORCH_CHECK(x.dim() == 4 && x.size(1) == o.channels && x.size(2) == o.image_size && x.size(3) == o.image_size,
              "KarrasUnet expects x of shape [batch, ", o.channels, ", ", o.image_size, ", ", o.image_size, "], got ",
              x.sizes());
  const int64_t b = x.size(0);
  TORCH_CHECK(time.dim() == 1 && time.size(0) == b, "KarrasUnet expects time of shape [", b, "], got ", time.sizes());
  auto h = x;
  if (o.self_condition) {
    auto cond = self_cond ? *self_cond : torch::zeros_like(x);
    TORCH_CHECK(cond.sizes() == x.sizes(), "KarrasUnet self_cond must have x's shape ", x.sizes(), ", got ",
                cond.sizes());
    h = torch::cat({cond, x}, 1);
  } else {
    TORCH_CHECK(!self_cond, "KarrasUnet was built without self_condition but was given self_cond");
  }

  auto time_emb = to_time_emb->forward(time);
  TORCH_CHECK(class_labels.defined() == o.num_classes.has_value(),
              o.num_classes ? "KarrasUnet with num_classes = " + std::to_string(*o.num_classes) + " needs class_labels"
                            : std::string("KarrasUnet was built without num_classes but was given class_labels"));
  if (o.num_classes) {
    const int64_t n = *o.num_classes;
    auto labels = class_labels;
    if (labels.scalar_type() == torch::kInt || labels.scalar_type() == torch::kLong) {
      TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b, "KarrasUnet class_labels (indices) must have shape [",
                  b, "], got ", labels.sizes());
      TORCH_CHECK(b == 0 || (labels.min().item<int64_t>() >= 0 && labels.max().item<int64_t>() < n),
                  "KarrasUnet class_labels must lie in [0, ", n, ")");
      labels = torch::one_hot(labels.to(torch::kLong), n);
    }
    TORCH_CHECK(labels.dim() == 2 && labels.size(0) == b && labels.size(1) == n,
                "KarrasUnet class_labels must be [", b, "] indices or [", b, ", ", n, "] floats, got ",
                class_labels.sizes());
    auto class_emb = to_class_emb->forward(labels.to(torch::kFloat) * std::sqrt(static_cast<double>(n)));
    time_emb = karras::mp_add(time_emb, class_emb, o.mp_add_emb_t);
  }
  auto emb = karras::mp_silu(time_emb);

  std::vector<torch::Tensor> skips;
  h = input_block->forward(h);
  skips.push_back(h);
  for (auto& encoder : encoders_) {
    h = encoder->forward(h, emb);
    skips.push_back(h);
  }
  for (auto& decoder : middle_) h = decoder->forward(h, emb);
  for (auto& decoder : decoders_) {
    if (decoder->needs_skip()) {
      h = karras::mp_cat(h, skips.back(), o.mp_cat_t, 1);
      skips.pop_back();
    }
    h = decoder->forward(h, emb);
  }
  return output_block->forward(h);
}

}  // namespace diffuse::model

namespace diffuse::model {

int64_t karras_unet_activation_elements(const KarrasUnetOptions& o) {
  o.validate();
  // Per block: its input, the pixel norm, two convolutions with their MP-SiLU outputs, the embedding
  // product, dropout and the MP-add (about ten tensors of the block's width), plus attention where
  // the resolution is in attn_res (q, k, v, the output and the tokens x tokens score matrix per head).
  auto block = [&](int64_t channels, int64_t side) {
    int64_t elements = 10 * channels * side * side;
    if (std::find(o.attn_res.begin(), o.attn_res.end(), side) != o.attn_res.end()) {
      const int64_t tokens = side * side;
      const int64_t heads = std::max<int64_t>((channels + o.attn_dim_head - 1) / o.attn_dim_head, 2);
      elements += 5 * channels * tokens + 2 * heads * tokens * tokens;
    }
    return elements;
  };
  int64_t elements = (o.channels * (o.self_condition ? 2 : 1) + 2 * o.dim) * o.image_size * o.image_size;
  int64_t channels = o.dim, side = o.image_size;
  // Encoder blocks, then the decoder's (one more per stage, at twice the input width for the skip).
  elements += o.num_blocks_per_stage * block(channels, side) + (o.num_blocks_per_stage + 1) * block(2 * channels, side);
  for (int64_t s = 0; s < o.num_downsamples; ++s) {
    channels = std::min(o.dim_max, channels * 2);
    side /= 2;
    elements += (o.num_blocks_per_stage + 1) * block(channels, side) +
                (o.num_blocks_per_stage + 2) * block(2 * channels, side);
  }
  return elements + 2 * block(channels, side);
}

}  // namespace diffuse::model
