// model/unet.cpp: the U-Net blocks and the U-Net. Every forward reproduces the reference's
// operation order (not just its math) so float32 results agree to rounding; every constructor
// draws its initial weights in the reference's order so a seeded construction matches Python's.
#include "model/unet.h"

#include <cmath>
#include <numbers>
#include <sstream>
#include <stdexcept>

#include "model/json.h"

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

// ---------------------------------------------------------------------------------------------
// Options

namespace {

[[noreturn]] void invalid(const std::string& field, const std::string& value, const std::string& allowed) {
  throw std::invalid_argument("UnetOptions." + field + " = " + value + " is invalid: " + allowed);
}

template <typename T>
std::string list_text(const std::vector<T>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

template <typename T>
std::vector<T> per_stage(const std::vector<T>& values, size_t stages) {
  return values.size() == 1 ? std::vector<T>(stages, values[0]) : values;
}

std::string json_int_list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(values[i]);
  }
  return out + "]";
}

}  // namespace

std::vector<bool> UnetOptions::stage_full_attn() const {
  if (full_attn.empty()) {
    std::vector<bool> out(dim_mults.size(), false);
    if (!out.empty()) out.back() = true;
    return out;
  }
  return per_stage(full_attn, dim_mults.size());
}

std::vector<int64_t> UnetOptions::stage_attn_heads() const { return per_stage(attn_heads, dim_mults.size()); }

std::vector<int64_t> UnetOptions::stage_attn_dim_head() const { return per_stage(attn_dim_head, dim_mults.size()); }

void UnetOptions::validate() const {
  // The sinusoidal embedding divides by dim/2 - 1 and must be exactly dim wide.
  if (dim < 4 || dim % 2 != 0) invalid("dim", std::to_string(dim), "must be even and >= 4");
  if (init_dim && *init_dim < 1) invalid("init_dim", std::to_string(*init_dim), "must be positive");
  if (out_dim && *out_dim < 1) invalid("out_dim", std::to_string(*out_dim), "must be positive");
  if (dim_mults.empty()) invalid("dim_mults", "[]", "needs at least one stage");
  for (auto m : dim_mults) {
    if (m < 1) invalid("dim_mults", list_text(dim_mults), "every multiplier must be positive");
  }
  if (channels < 1) invalid("channels", std::to_string(channels), "must be positive");
  if ((learned_sinusoidal_cond || random_fourier_features) &&
      (learned_sinusoidal_dim < 2 || learned_sinusoidal_dim % 2 != 0)) {
    invalid("learned_sinusoidal_dim", std::to_string(learned_sinusoidal_dim), "must be even and >= 2");
  }
  if (!(sinusoidal_pos_emb_theta > 1)) {
    invalid("sinusoidal_pos_emb_theta", std::to_string(sinusoidal_pos_emb_theta), "must be > 1");
  }
  if (!(dropout >= 0 && dropout < 1)) invalid("dropout", std::to_string(dropout), "must be in [0, 1)");
  const size_t stages = dim_mults.size();
  auto check_list = [&](const char* name, const std::vector<int64_t>& values) {
    if (values.size() != 1 && values.size() != stages) {
      invalid(name, list_text(values), "needs one entry, or one per stage (" + std::to_string(stages) + ")");
    }
    for (auto v : values) {
      if (v < 1) invalid(name, list_text(values), "every entry must be positive");
    }
  };
  check_list("attn_dim_head", attn_dim_head);
  check_list("attn_heads", attn_heads);
  if (full_attn.size() > 1 && full_attn.size() != stages) {
    std::vector<int> as_int(full_attn.begin(), full_attn.end());
    invalid("full_attn", list_text(as_int),
            "needs no entry (default), one entry, or one per stage (" + std::to_string(stages) + ")");
  }
}

std::string UnetOptions::to_json() const {
  auto opt = [](const std::optional<int64_t>& v) { return v ? std::to_string(*v) : std::string("null"); };
  auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  std::string full = "[";
  for (size_t i = 0; i < full_attn.size(); ++i) full += std::string(i ? "," : "") + boolean(full_attn[i]);
  full += "]";
  return "{\"dim\":" + std::to_string(dim) + ",\"init_dim\":" + opt(init_dim) + ",\"out_dim\":" + opt(out_dim) +
         ",\"dim_mults\":" + json_int_list(dim_mults) + ",\"channels\":" + std::to_string(channels) +
         ",\"self_condition\":" + boolean(self_condition) + ",\"learned_variance\":" + boolean(learned_variance) +
         ",\"learned_sinusoidal_cond\":" + boolean(learned_sinusoidal_cond) +
         ",\"random_fourier_features\":" + boolean(random_fourier_features) +
         ",\"learned_sinusoidal_dim\":" + std::to_string(learned_sinusoidal_dim) +
         ",\"sinusoidal_pos_emb_theta\":" + json::number(sinusoidal_pos_emb_theta) +
         ",\"dropout\":" + json::number(dropout) + ",\"attn_dim_head\":" + json_int_list(attn_dim_head) +
         ",\"attn_heads\":" + json_int_list(attn_heads) + ",\"full_attn\":" + full +
         ",\"flash_attn\":" + boolean(flash_attn) + "}";
}

UnetOptions UnetOptions::from_json(const std::string& text) {
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("UnetOptions JSON: ") + e.what());
  }
  if (root.type() != json::Value::Type::Object) {
    throw std::invalid_argument(std::string("UnetOptions JSON must be an object, got ") + root.type_name());
  }
  UnetOptions o;
  for (const auto& [key, value] : root.as_object()) {
    try {
      // Python accepts a single int/bool where it takes a per-stage tuple; so do we.
      auto int_list = [&]() {
        std::vector<int64_t> out;
        if (value.type() == json::Value::Type::Number) return std::vector<int64_t>{value.as_int64()};
        for (const auto& v : value.as_array()) out.push_back(v.as_int64());
        return out;
      };
      auto opt_int = [&]() { return value.is_null() ? std::optional<int64_t>() : value.as_int64(); };
      if (key == "dim") o.dim = value.as_int64();
      else if (key == "init_dim") o.init_dim = opt_int();
      else if (key == "out_dim") o.out_dim = opt_int();
      else if (key == "dim_mults") o.dim_mults = int_list();
      else if (key == "channels") o.channels = value.as_int64();
      else if (key == "self_condition") o.self_condition = value.as_bool();
      else if (key == "learned_variance") o.learned_variance = value.as_bool();
      else if (key == "learned_sinusoidal_cond") o.learned_sinusoidal_cond = value.as_bool();
      else if (key == "random_fourier_features") o.random_fourier_features = value.as_bool();
      else if (key == "learned_sinusoidal_dim") o.learned_sinusoidal_dim = value.as_int64();
      else if (key == "sinusoidal_pos_emb_theta") o.sinusoidal_pos_emb_theta = value.as_double();
      else if (key == "dropout") o.dropout = value.as_double();
      else if (key == "attn_dim_head") o.attn_dim_head = int_list();
      else if (key == "attn_heads") o.attn_heads = int_list();
      else if (key == "full_attn") {
        o.full_attn.clear();
        if (value.type() == json::Value::Type::Bool) {
          // Python semantics: False means the default, True means every stage.
          if (value.as_bool()) o.full_attn = {true};
        } else if (!value.is_null()) {
          for (const auto& v : value.as_array()) o.full_attn.push_back(v.as_bool());
        }
      } else if (key == "flash_attn") o.flash_attn = value.as_bool();
      else throw std::invalid_argument("unknown key");
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("UnetOptions JSON key \"" + key + "\": " + e.what());
    }
  }
  o.validate();
  return o;
}

// ---------------------------------------------------------------------------------------------
// U-Net

UnetImpl::UnetImpl(UnetOptions options) : options_(std::move(options)) {
  using namespace blocks;
  namespace nn = torch::nn;
  options_.validate();
  const auto& o = options_;
  const int64_t input_channels = o.channels * (o.self_condition ? 2 : 1);
  const int64_t init = o.resolved_init_dim();
  const int64_t time_dim = o.dim * 4;
  std::vector<int64_t> dims{init};
  for (auto m : o.dim_mults) dims.push_back(o.dim * m);
  const int64_t n = o.num_stages();
  const auto full = o.stage_full_attn();
  const auto heads = o.stage_attn_heads();
  const auto dim_head = o.stage_attn_dim_head();

  // Modules are constructed in the reference's order (which fixes the random initial weights) and
  // registered in its order of attribute assignment (which fixes the state_dict order); the two
  // differ because `downs` and `ups` are registered empty before the middle blocks are built.
  init_conv = register_module("init_conv", nn::Conv2d(nn::Conv2dOptions(input_channels, init, 7).padding(3)));
  time_mlp = register_module("time_mlp", blocks::time_mlp(o.dim, o.learned_sinusoidal_cond, o.random_fourier_features,
                                                          o.learned_sinusoidal_dim, o.sinusoidal_pos_emb_theta));
  downs = register_module("downs", nn::ModuleList());
  ups = register_module("ups", nn::ModuleList());

  auto resnet = [&](int64_t in, int64_t out) { return ResnetBlock(in, out, time_dim, o.dropout); };
  auto attention = [&](bool is_full, int64_t d, int64_t h, int64_t dh, LinearAttention& lin, Attention& att) {
    if (is_full) {
      att = Attention(d, h, dh);
    } else {
      lin = LinearAttention(d, h, dh);
    }
  };

  for (int64_t k = 0; k < n; ++k) {
    const int64_t din = dims[k], dout = dims[k + 1];
    auto r0 = resnet(din, din);
    auto r1 = resnet(din, din);
    LinearAttention lin{nullptr};
    Attention att{nullptr};
    attention(full[k], din, heads[k], dim_head[k], lin, att);
    nn::Sequential seq{nullptr};
    nn::Conv2d conv{nullptr};
    if (k < n - 1) {
      seq = nn::Sequential(nn::PixelUnshuffle(nn::PixelUnshuffleOptions(2)),
                           nn::Conv2d(nn::Conv2dOptions(din * 4, dout, 1)));
    } else {
      conv = nn::Conv2d(nn::Conv2dOptions(din, dout, 3).padding(1));
    }
    Stage stage(r0, r1, lin, att, seq, conv);
    downs->push_back(stage);
    down_stages_.push_back(stage);
  }

  const int64_t mid = dims.back();
  mid_block1 = resnet(mid, mid);
  mid_attn = Attention(mid, heads.back(), dim_head.back());
  mid_block2 = resnet(mid, mid);

  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = n - 1 - k;  // the down stage this up stage mirrors
    const int64_t din = dims[s], dout = dims[s + 1];
    auto r0 = resnet(dout + din, dout);
    auto r1 = resnet(dout + din, dout);
    LinearAttention lin{nullptr};
    Attention att{nullptr};
    attention(full[s], dout, heads[s], dim_head[s], lin, att);
    nn::Sequential seq{nullptr};
    nn::Conv2d conv{nullptr};
    if (k < n - 1) {
      seq = nn::Sequential(
          nn::Upsample(nn::UpsampleOptions().scale_factor(std::vector<double>{2.0, 2.0}).mode(torch::kNearest)),
          nn::Conv2d(nn::Conv2dOptions(dout, din, 3).padding(1)));
    } else {
      conv = nn::Conv2d(nn::Conv2dOptions(dout, din, 3).padding(1));
    }
    Stage stage(r0, r1, lin, att, seq, conv);
    ups->push_back(stage);
    up_stages_.push_back(stage);
  }

  register_module("mid_block1", mid_block1);
  register_module("mid_attn", mid_attn);
  register_module("mid_block2", mid_block2);
  final_res_block = register_module("final_res_block", resnet(init * 2, init));
  final_conv = register_module("final_conv", nn::Conv2d(nn::Conv2dOptions(init, o.resolved_out_dim(), 1)));
}

int64_t UnetImpl::downsample_factor() const { return int64_t{1} << (options_.num_stages() - 1); }

torch::Tensor UnetImpl::forward(const torch::Tensor& x, const torch::Tensor& time,
                                const std::optional<torch::Tensor>& x_self_cond) {
  const int64_t factor = downsample_factor();
  TORCH_CHECK(x.dim() == 4 && x.size(1) == options_.channels, "Unet expects x of shape [batch, ", options_.channels,
              ", height, width] (channels = ", options_.channels, "), got ", x.sizes());
  TORCH_CHECK(x.size(2) % factor == 0 && x.size(3) % factor == 0, "Unet with ", options_.num_stages(),
              " stages needs height and width divisible by ", factor, " (2^(stages-1)), got ", x.size(2), "x",
              x.size(3));
  TORCH_CHECK(time.dim() == 1 && time.size(0) == x.size(0), "Unet expects one timestep per image: time of shape [",
              x.size(0), "], got ", time.sizes());
  torch::Tensor h = x;
  if (options_.self_condition) {
    TORCH_CHECK(x_self_cond.has_value() && x_self_cond->defined(),
                "this Unet has self_condition = true: pass x_self_cond (zeros for no self-conditioning)");
    TORCH_CHECK(x_self_cond->sizes() == x.sizes(), "x_self_cond must have the shape of x ", x.sizes(), ", got ",
                x_self_cond->sizes());
    h = torch::cat({*x_self_cond, x}, 1);  // self-conditioning channels first, as in the reference
  } else {
    TORCH_CHECK(!x_self_cond.has_value() || !x_self_cond->defined(),
                "x_self_cond given to a Unet built with self_condition = false");
  }

  h = init_conv(h);
  const auto r = h;
  const auto t = time_mlp->forward(time);
  std::vector<torch::Tensor> skips;
  skips.reserve(2 * down_stages_.size());
  for (auto& stage : down_stages_) {
    h = stage->res0(h, t);
    skips.push_back(h);
    h = stage->res1(h, t);
    h = stage->attend(h) + h;
    skips.push_back(h);
    h = stage->resample(h);
  }
  h = mid_block1(h, t);
  h = mid_attn(h) + h;
  h = mid_block2(h, t);
  for (auto& stage : up_stages_) {
    h = torch::cat({h, skips.back()}, 1);
    skips.pop_back();
    h = stage->res0(h, t);
    h = torch::cat({h, skips.back()}, 1);
    skips.pop_back();
    h = stage->res1(h, t);
    h = stage->attend(h) + h;
    h = stage->resample(h);
  }
  h = torch::cat({h, r}, 1);
  h = final_res_block(h, t);
  return final_conv(h);
}

// ---------------------------------------------------------------------------------------------
// FLOP count

int64_t unet_forward_flops(const UnetOptions& o, int64_t image_size, int64_t batch) {
  o.validate();
  const int64_t n = o.num_stages();
  const int64_t factor = int64_t{1} << (n - 1);
  if (image_size < 1 || image_size % factor != 0) {
    throw std::invalid_argument("unet_forward_flops: image_size " + std::to_string(image_size) +
                                " must be a positive multiple of " + std::to_string(factor));
  }
  const int64_t time_dim = 4 * o.dim;
  const int64_t init = o.resolved_init_dim();
  const auto full = o.stage_full_attn();
  const auto heads = o.stage_attn_heads();
  const auto dim_head = o.stage_attn_dim_head();
  std::vector<int64_t> dims{init};
  for (auto m : o.dim_mults) dims.push_back(o.dim * m);

  auto conv = [](int64_t cin, int64_t cout, int64_t k, int64_t side) { return 2 * cin * cout * k * k * side * side; };
  auto resnet = [&](int64_t in, int64_t out, int64_t side) {
    return 2 * time_dim * 2 * out + conv(in, out, 3, side) + conv(out, out, 3, side) +
           (in != out ? conv(in, out, 1, side) : 0);
  };
  auto attention = [&](bool is_full, int64_t d, int64_t h, int64_t dh, int64_t side) {
    const int64_t hidden = h * dh, tokens = side * side, keys = tokens + 4;  // 4 memory key/values
    const int64_t core = is_full ? 2 * (2 * h * tokens * keys * dh)             // q k^T, attn v
                                 : 2 * h * dh * dh * keys + 2 * h * dh * dh * tokens;  // k v^T, ctx^T q
    return conv(d, 3 * hidden, 1, side) + core + conv(hidden, d, 1, side);
  };

  const int64_t fourier = (o.learned_sinusoidal_cond || o.random_fourier_features) ? o.learned_sinusoidal_dim + 1 : o.dim;
  int64_t flops = 2 * fourier * time_dim + 2 * time_dim * time_dim;
  flops += conv(o.channels * (o.self_condition ? 2 : 1), init, 7, image_size);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t side = image_size >> k, din = dims[k], dout = dims[k + 1];
    flops += 2 * resnet(din, din, side) + attention(full[k], din, heads[k], dim_head[k], side);
    flops += k < n - 1 ? conv(4 * din, dout, 1, side / 2) : conv(din, dout, 3, side);
  }
  const int64_t inner = image_size >> (n - 1);
  flops += 2 * resnet(dims.back(), dims.back(), inner) +
           attention(true, dims.back(), heads.back(), dim_head.back(), inner);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = n - 1 - k, side = image_size >> s, din = dims[s], dout = dims[s + 1];
    flops += 2 * resnet(dout + din, dout, side) + attention(full[s], dout, heads[s], dim_head[s], side);
    flops += k < n - 1 ? conv(dout, din, 3, side * 2) : conv(dout, din, 3, side);
  }
  flops += resnet(2 * init, init, image_size) + conv(init, o.resolved_out_dim(), 1, image_size);
  return flops * batch;
}

}  // namespace diffuse::model
