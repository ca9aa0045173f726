// model/conditional_unet.cpp: the classifier-free-guidance U-Net. Forward passes follow the
// reference's operation order and constructors its order of random draws (which differs from the
// state_dict order), so seeded construction and outputs match denoising-diffusion-pytorch 2.3.1.
#include "model/conditional_unet.h"

#include <cmath>
#include <stdexcept>

#include "util/json.h"

namespace diffuse::model {
namespace json = util::json;
namespace blocks::cfg {

LinearAttentionImpl::LinearAttentionImpl(int64_t dim, int64_t heads, int64_t dim_head)
    : heads_(heads), dim_head_(dim_head) {
  const int64_t hidden = heads * dim_head;
  to_qkv = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, hidden * 3, 1).bias(false)));
  to_out = register_module("to_out", torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(hidden, dim, 1)),
                                                           RMSNorm(dim)));
}

torch::Tensor LinearAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3);
  auto qkv = to_qkv(x).chunk(3, 1);
  // 'b (h c) x y -> b h c (x y)'
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, heads_, dim_head_, height * width}); };
  auto q = split(qkv[0]).softmax(-2) * std::pow(static_cast<double>(dim_head_), -0.5);
  auto k = split(qkv[1]).softmax(-1);
  auto context = torch::einsum("bhdn,bhen->bhde", {k, split(qkv[2])});
  auto out = torch::einsum("bhde,bhdn->bhen", {context, q});
  return to_out->forward(out.reshape({b, heads_ * dim_head_, height, width}));
}

AttentionImpl::AttentionImpl(int64_t dim, int64_t heads, int64_t dim_head) : heads_(heads), dim_head_(dim_head) {
  const int64_t hidden = heads * dim_head;
  to_qkv = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, hidden * 3, 1).bias(false)));
  to_out = register_module("to_out", torch::nn::Conv2d(torch::nn::Conv2dOptions(hidden, dim, 1)));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3);
  auto qkv = to_qkv(x).chunk(3, 1);
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, heads_, dim_head_, height * width}); };
  // The reference's explicit einsums (scale on q first), not a fused kernel: b h d i, b h d j -> b h i j.
  auto q = split(qkv[0]) * std::pow(static_cast<double>(dim_head_), -0.5);
  auto sim = torch::einsum("bhdi,bhdj->bhij", {q, split(qkv[1])});
  auto out = torch::einsum("bhij,bhdj->bhid", {sim.softmax(-1), split(qkv[2])});
  // 'b h (x y) d -> b (h d) x y'
  return to_out(out.transpose(-1, -2).reshape({b, heads_ * dim_head_, height, width}));
}

ResidualPreNormImpl::ResidualPreNormImpl(int64_t dim, LinearAttention linear_, Attention full_) {
  // The reference nests Residual -> PreNorm -> attention; an intermediate module gives the names.
  auto pre_norm = register_module("fn", std::make_shared<torch::nn::Module>());
  if (linear_) {
    linear = pre_norm->register_module("fn", std::move(linear_));
  } else {
    full = pre_norm->register_module("fn", std::move(full_));
  }
  norm = pre_norm->register_module("norm", RMSNorm(dim));
}

torch::Tensor ResidualPreNormImpl::forward(const torch::Tensor& x) {
  auto h = norm(x);
  return (linear ? linear(h) : full(h)) + x;
}

StageImpl::StageImpl(ResnetBlock res0_, ResnetBlock res1_, ResidualPreNorm attn_, torch::nn::Sequential resample_seq_,
                     torch::nn::Conv2d resample_conv_) {
  res0 = register_module("0", std::move(res0_));
  res1 = register_module("1", std::move(res1_));
  attn = register_module("2", std::move(attn_));
  if (resample_seq_) {
    resample_seq = register_module("3", std::move(resample_seq_));
  } else {
    resample_conv = register_module("3", std::move(resample_conv_));
  }
}

torch::Tensor StageImpl::resample(const torch::Tensor& x) {
  return resample_seq ? resample_seq->forward(x) : resample_conv(x);
}

}  // namespace blocks::cfg

// ---------------------------------------------------------------------------------------------
// Options

namespace {

[[noreturn]] void invalid(const std::string& field, const std::string& value, const std::string& allowed) {
  throw std::invalid_argument("ConditionalUnetOptions." + field + " = " + value + " is invalid: " + allowed);
}

}  // namespace

void ConditionalUnetOptions::validate() const {
  if (dim < 4 || dim % 2 != 0) invalid("dim", std::to_string(dim), "must be even and >= 4");
  if (num_classes < 1) invalid("num_classes", std::to_string(num_classes), "must be positive (at least one class)");
  if (!(cond_drop_prob >= 0 && cond_drop_prob <= 1)) {
    invalid("cond_drop_prob", std::to_string(cond_drop_prob), "must be in [0, 1]");
  }
  if (init_dim && *init_dim < 1) invalid("init_dim", std::to_string(*init_dim), "must be positive");
  if (out_dim && *out_dim < 1) invalid("out_dim", std::to_string(*out_dim), "must be positive");
  if (dim_mults.empty()) invalid("dim_mults", "[]", "needs at least one stage");
  for (auto m : dim_mults) {
    if (m < 1) invalid("dim_mults", std::to_string(m), "every multiplier must be positive");
  }
  if (channels < 1) invalid("channels", std::to_string(channels), "must be positive");
  if ((learned_sinusoidal_cond || random_fourier_features) &&
      (learned_sinusoidal_dim < 2 || learned_sinusoidal_dim % 2 != 0)) {
    invalid("learned_sinusoidal_dim", std::to_string(learned_sinusoidal_dim), "must be even and >= 2");
  }
  if (attn_dim_head < 1) invalid("attn_dim_head", std::to_string(attn_dim_head), "must be positive");
  if (attn_heads < 1) invalid("attn_heads", std::to_string(attn_heads), "must be positive");
}

std::string ConditionalUnetOptions::to_json() const {
  auto opt = [](const std::optional<int64_t>& v) { return v ? std::to_string(*v) : std::string("null"); };
  auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  std::string mults = "[";
  for (size_t i = 0; i < dim_mults.size(); ++i) {
    if (i) mults += ',';
    mults += std::to_string(dim_mults[i]);
  }
  mults += "]";
  return "{\"dim\":" + std::to_string(dim) + ",\"num_classes\":" + std::to_string(num_classes) +
         ",\"cond_drop_prob\":" + json::number(cond_drop_prob) + ",\"init_dim\":" + opt(init_dim) +
         ",\"out_dim\":" + opt(out_dim) + ",\"dim_mults\":" + mults + ",\"channels\":" + std::to_string(channels) +
         ",\"learned_variance\":" + boolean(learned_variance) +
         ",\"learned_sinusoidal_cond\":" + boolean(learned_sinusoidal_cond) +
         ",\"random_fourier_features\":" + boolean(random_fourier_features) +
         ",\"learned_sinusoidal_dim\":" + std::to_string(learned_sinusoidal_dim) +
         ",\"attn_dim_head\":" + std::to_string(attn_dim_head) + ",\"attn_heads\":" + std::to_string(attn_heads) + "}";
}

ConditionalUnetOptions ConditionalUnetOptions::from_json(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("ConditionalUnetOptions JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) {
    throw std::invalid_argument(std::string("ConditionalUnetOptions JSON must be an object, got ") + root.type_name());
  }
  ConditionalUnetOptions o;
  for (const auto& [key, value] : root.as_object()) {
    try {
      auto opt_int = [&]() { return value.is_null() ? std::optional<int64_t>() : value.as_int64(); };
      if (key == "dim") o.dim = value.as_int64();
      else if (key == "num_classes") o.num_classes = value.as_int64();
      else if (key == "cond_drop_prob") o.cond_drop_prob = value.as_double();
      else if (key == "init_dim") o.init_dim = opt_int();
      else if (key == "out_dim") o.out_dim = opt_int();
      else if (key == "dim_mults") {
        o.dim_mults.clear();
        for (const auto& v : value.as_array()) o.dim_mults.push_back(v.as_int64());
      } else if (key == "channels") o.channels = value.as_int64();
      else if (key == "learned_variance") o.learned_variance = value.as_bool();
      else if (key == "learned_sinusoidal_cond") o.learned_sinusoidal_cond = value.as_bool();
      else if (key == "random_fourier_features") o.random_fourier_features = value.as_bool();
      else if (key == "learned_sinusoidal_dim") o.learned_sinusoidal_dim = value.as_int64();
      else if (key == "attn_dim_head") o.attn_dim_head = value.as_int64();
      else if (key == "attn_heads") o.attn_heads = value.as_int64();
      else throw std::invalid_argument("unknown key");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("ConditionalUnetOptions JSON key \"" + key + "\": " + e.what());
    }
  }
  o.validate();
  return o;
}

// ---------------------------------------------------------------------------------------------
// U-Net

ConditionalUnetImpl::ConditionalUnetImpl(ConditionalUnetOptions options) : options_(std::move(options)) {
  using namespace blocks;
  namespace nn = torch::nn;
  options_.validate();
  const auto& o = options_;
  const int64_t init = o.resolved_init_dim();
  const int64_t time_dim = o.dim * 4, classes_dim = o.dim * 4;
  std::vector<int64_t> dims{init};
  for (auto m : o.dim_mults) dims.push_back(o.dim * m);
  const int64_t n = o.num_stages();

  // Constructed in the reference's order (fixing the random initial weights), registered in its
  // order of attribute assignment (fixing the state_dict order); see unet.cpp for the same dance.
  init_conv = register_module("init_conv", nn::Conv2d(nn::Conv2dOptions(o.channels, init, 7).padding(3)));
  // This module's SinusoidalPosEmb has no theta option: always 10000.
  time_mlp = register_module("time_mlp", blocks::time_mlp(o.dim, o.learned_sinusoidal_cond, o.random_fourier_features,
                                                          o.learned_sinusoidal_dim, 10000.0));
  classes_emb = register_module("classes_emb", nn::Embedding(o.num_classes, o.dim));
  null_classes_emb = register_parameter("null_classes_emb", torch::randn({o.dim}));
  {
    nn::Linear l1(o.dim, classes_dim);
    nn::Linear l2(classes_dim, classes_dim);
    classes_mlp = register_module("classes_mlp", nn::Sequential(l1, nn::GELU(), l2));
  }
  downs = register_module("downs", nn::ModuleList());
  ups = register_module("ups", nn::ModuleList());

  // Every ResnetBlock's mlp reads cat(time embedding, class embedding).
  auto resnet = [&](int64_t in, int64_t out) { return ResnetBlock(in, out, time_dim + classes_dim, 0.0); };
  auto linear_attention = [&](int64_t d) { return cfg::ResidualPreNorm(d, cfg::LinearAttention(d), nullptr); };

  for (int64_t k = 0; k < n; ++k) {
    const int64_t din = dims[k], dout = dims[k + 1];
    auto r0 = resnet(din, din);
    auto r1 = resnet(din, din);
    auto attn = linear_attention(din);
    // The reference's Downsample here is a 4x4 stride-2 convolution; the last stage keeps its size.
    auto conv = k < n - 1 ? nn::Conv2d(nn::Conv2dOptions(din, dout, 4).stride(2).padding(1))
                          : nn::Conv2d(nn::Conv2dOptions(din, dout, 3).padding(1));
    cfg::Stage stage(r0, r1, attn, nullptr, conv);
    downs->push_back(stage);
    down_stages_.push_back(stage);
  }

  const int64_t mid = dims.back();
  mid_block1 = resnet(mid, mid);
  mid_attn = cfg::ResidualPreNorm(mid, nullptr, cfg::Attention(mid, o.attn_heads, o.attn_dim_head));
  mid_block2 = resnet(mid, mid);

  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = n - 1 - k;
    const int64_t din = dims[s], dout = dims[s + 1];
    auto r0 = resnet(dout + din, dout);
    auto r1 = resnet(dout + din, dout);
    auto attn = linear_attention(dout);
    nn::Sequential seq{nullptr};
    nn::Conv2d conv{nullptr};
    if (k < n - 1) {
      seq = nn::Sequential(
          nn::Upsample(nn::UpsampleOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(torch::kNearest)),
          nn::Conv2d(nn::Conv2dOptions(dout, din, 3).padding(1)));
    } else {
      conv = nn::Conv2d(nn::Conv2dOptions(dout, din, 3).padding(1));
    }
    cfg::Stage stage(r0, r1, attn, seq, conv);
    ups->push_back(stage);
    up_stages_.push_back(stage);
  }

  register_module("mid_block1", mid_block1);
  register_module("mid_attn", mid_attn);
  register_module("mid_block2", mid_block2);
  final_res_block = register_module("final_res_block", resnet(init * 2, init));
  final_conv = register_module("final_conv", nn::Conv2d(nn::Conv2dOptions(init, o.resolved_out_dim(), 1)));
}

torch::Tensor ConditionalUnetImpl::forward(const torch::Tensor& x, const torch::Tensor& time,
                                           const torch::Tensor& classes, const torch::Tensor& keep_mask) {
  const int64_t factor = downsample_factor();
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options_.channels, "ConditionalUnet expects x of shape [batch, ",
              options_.channels, ", height, width], got ", x.sizes());
  TORCH_CHECK(x.size(2) % factor == 0 && x.size(3) % factor == 0, "ConditionalUnet with ", options_.num_stages(),
              " stages needs height and width divisible by ", factor, ", got ", x.size(2), "x", x.size(3));
  const int64_t b = x.size(0);
  TORCH_CHECK(time.dim() == 1 && time.size(0) == b, "ConditionalUnet expects one timestep per image: time of shape [",
              b, "], got ", time.sizes());
  TORCH_CHECK(classes.defined() && classes.dim() == 1 && classes.size(0) == b && classes.scalar_type() == torch::kLong,
              "ConditionalUnet expects one class per image: int64 classes of shape [", b, "], got ",
              classes.defined() ? classes.sizes() : at::IntArrayRef{});
  // nn.Embedding fails on an index out of range anyway, but with a message naming no class (and on a
  // GPU with a device-side assert). Checked on CPU tensors only, to keep GPU steps free of host syncs.
  if (classes.is_cpu() && classes.numel() > 0) {
    const auto lo = classes.min().item<int64_t>(), hi = classes.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < options_.num_classes, "ConditionalUnet: classes must lie in [0, ",
                options_.num_classes, "), got values from ", lo, " to ", hi);
  }

  auto class_emb = classes_emb(classes.to(x.device()));
  if (keep_mask.defined()) {
    TORCH_CHECK(keep_mask.dim() == 1 && keep_mask.size(0) == b && keep_mask.scalar_type() == torch::kBool,
                "ConditionalUnet: keep_mask must be bool of shape [", b, "], got ", keep_mask.scalar_type(), " ",
                keep_mask.sizes());
    class_emb = torch::where(keep_mask.to(x.device()).unsqueeze(1), class_emb, null_classes_emb.unsqueeze(0).expand({b, -1}));
  }
  const auto c = classes_mlp->forward(class_emb);

  auto h = init_conv(x);
  const auto r = h.clone();
  const auto cond = torch::cat({time_mlp->forward(time), c}, -1);
  std::vector<torch::Tensor> skips;
  skips.reserve(2 * down_stages_.size());
  for (auto& stage : down_stages_) {
    h = stage->res0(h, cond);
    skips.push_back(h);
    h = stage->attn(stage->res1(h, cond));
    skips.push_back(h);
    h = stage->resample(h);
  }
  h = mid_block2(mid_attn(mid_block1(h, cond)), cond);
  for (auto& stage : up_stages_) {
    h = stage->res0(torch::cat({h, skips.back()}, 1), cond);
    skips.pop_back();
    h = stage->res1(torch::cat({h, skips.back()}, 1), cond);
    skips.pop_back();
    h = stage->resample(stage->attn(h));
  }
  h = final_res_block(torch::cat({h, r}, 1), cond);
  return final_conv(h);
}

torch::Tensor ConditionalUnetImpl::draw_keep_mask(int64_t batch, const torch::Device& device, torch::Generator generator,
                                                  std::optional<double> drop_prob) const {
  const double p = drop_prob.value_or(options_.cond_drop_prob);
  TORCH_CHECK(p >= 0 && p <= 1, "draw_keep_mask: drop probability must be in [0, 1], got ", p);
  const auto bools = torch::TensorOptions(torch::kBool).device(device);
  if (p == 0) return torch::ones({batch}, bools);
  if (p == 1) return torch::zeros({batch}, bools);
  const auto draw_on = generator.defined() ? generator.device() : device;
  auto u = torch::empty({batch}, torch::TensorOptions(torch::kFloat32).device(draw_on));
  u.uniform_(0, 1, generator.defined() ? std::optional<at::Generator>(generator) : std::nullopt);
  return (u < 1 - p).to(device);
}

namespace {

// The reference's project(x, y): x split into its parts parallel and orthogonal to y, per sample,
// computed in float64 and returned in x's dtype.
std::pair<torch::Tensor, torch::Tensor> project(const torch::Tensor& x, const torch::Tensor& y) {
  namespace F = torch::nn::functional;
  auto x64 = x.flatten(1).to(torch::kFloat64), y64 = y.flatten(1).to(torch::kFloat64);
  auto unit = F::normalize(y64, F::NormalizeFuncOptions().dim(-1));
  auto parallel = (x64 * unit).sum(-1, /*keepdim=*/true) * unit;
  auto orthogonal = x64 - parallel;
  return {parallel.reshape(x.sizes()).to(x.scalar_type()), orthogonal.reshape(x.sizes()).to(x.scalar_type())};
}

}  // namespace

GuidedOutput ConditionalUnetImpl::forward_with_cond_scale(const torch::Tensor& x, const torch::Tensor& time,
                                                          const torch::Tensor& classes, double cond_scale,
                                                          double rescaled_phi, bool remove_parallel_component,
                                                          double keep_parallel_frac) {
  TORCH_CHECK(std::isfinite(cond_scale) && std::isfinite(rescaled_phi) && std::isfinite(keep_parallel_frac),
              "forward_with_cond_scale: cond_scale, rescaled_phi and keep_parallel_frac must be finite, got ",
              cond_scale, ", ", rescaled_phi, ", ", keep_parallel_frac);
  GuidedOutput out;
  auto logits = forward(x, time, classes);
  if (cond_scale == 1) {
    out.guided = logits;
    return out;
  }
  out.null = forward(x, time, classes, torch::zeros({x.size(0)}, torch::TensorOptions(torch::kBool).device(x.device())));
  auto update = logits - out.null;
  if (remove_parallel_component) {
    auto [parallel, orthogonal] = project(update, logits);
    update = orthogonal + parallel * keep_parallel_frac;
  }
  auto scaled = logits + update * (cond_scale - 1.);
  if (rescaled_phi == 0.) {
    out.guided = scaled;
    return out;
  }
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < scaled.dim(); ++d) dims.push_back(d);
  auto std_of = [&](const torch::Tensor& t) { return t.std(dims, /*unbiased=*/true, /*keepdim=*/true); };
  auto rescaled = scaled * (std_of(logits) / std_of(scaled));
  out.guided = rescaled * rescaled_phi + scaled * (1. - rescaled_phi);
  return out;
}

}  // namespace diffuse::model
