// model/unet.cpp: the U-Net (its blocks: model/unet_blocks.cpp). Every forward reproduces the reference's
// operation order (not just its math) so float32 results agree to rounding; every constructor
// draws its initial weights in the reference's order so a seeded construction matches Python's.
#include "model/unet.h"

#include <cmath>
#include <numbers>
#include <sstream>
#include <stdexcept>

#include "util/json.h"

namespace diffuse::model {
namespace json = util::json;

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

namespace {

/// What the size counts below need: stage widths (init, then dim * mult) and per-stage attention.
struct StageShapes {
  int64_t n = 0;
  std::vector<int64_t> dims;
  std::vector<bool> full;
  std::vector<int64_t> heads, dim_head;
};

StageShapes stage_shapes(const UnetOptions& o, int64_t image_size, const char* caller) {
  o.validate();
  StageShapes shapes{o.num_stages(), {o.resolved_init_dim()}, o.stage_full_attn(), o.stage_attn_heads(),
                     o.stage_attn_dim_head()};
  const int64_t factor = int64_t{1} << (shapes.n - 1);
  if (image_size < 1 || image_size % factor != 0) {
    throw std::invalid_argument(std::string(caller) + ": image_size " + std::to_string(image_size) +
                                " must be a positive multiple of " + std::to_string(factor));
  }
  for (auto m : o.dim_mults) shapes.dims.push_back(o.dim * m);
  return shapes;
}

}  // namespace

int64_t unet_forward_flops(const UnetOptions& o, int64_t image_size, int64_t batch) {
  const auto [n, dims, full, heads, dim_head] = stage_shapes(o, image_size, "unet_forward_flops");
  const int64_t time_dim = 4 * o.dim;
  const int64_t init = dims.front();

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

int64_t unet_activation_elements(const UnetOptions& o, int64_t image_size) {
  const auto [n, dims, full, heads, dim_head] = stage_shapes(o, image_size, "unet_activation_elements");
  const int64_t init = dims.front();
  // Input, and per conv: its output, the norm's and the activation's (two convs), plus the residual.
  auto resnet = [](int64_t in, int64_t out, int64_t side) { return (in + 7 * out) * side * side; };
  auto attention = [&](bool is_full, int64_t d, int64_t h, int64_t dh, int64_t side) {
    const int64_t tokens = side * side;
    return (2 * d + 5 * h * dh) * tokens + (is_full ? h * tokens * (tokens + 4) : 0);
  };
  int64_t elements = (o.channels + init) * image_size * image_size;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t side = image_size >> k;
    elements += 2 * resnet(dims[k], dims[k], side) + attention(full[k], dims[k], heads[k], dim_head[k], side);
    elements += 2 * dims[k] * side * side;  // skip connections kept for the up path
  }
  const int64_t inner = image_size >> (n - 1);
  elements += 2 * resnet(dims.back(), dims.back(), inner) +
              attention(true, dims.back(), heads.back(), dim_head.back(), inner);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = n - 1 - k, side = image_size >> s;
    elements += 2 * resnet(dims[s + 1] + dims[s], dims[s + 1], side) +
                attention(full[s], dims[s + 1], heads[s], dim_head[s], side);
  }
  return elements;
}

}  // namespace diffuse::model
