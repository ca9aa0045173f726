// tests/model/model_support.h: helpers shared by the model tests: seeded generators, tiny U-Nets,
// and access to the golden files written by golden/generate.py from the Python reference.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "support.h"
#include "model/conditional_unet.h"
#include "model/diffusion.h"
#include "util/json.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "model/unet.h"

namespace diffuse::testing {

/// A CPU generator in the state torch.manual_seed(seed) puts Python's default generator in.
inline torch::Generator cpu_generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

/// Folder holding the golden files (ctest sets DIFFUSE_SOURCE_DIR; __FILE__ is the fallback).
inline std::filesystem::path golden_dir() {
  if (const char* root = std::getenv("DIFFUSE_SOURCE_DIR")) return std::filesystem::path(root) / "tests/model/golden";
  return std::filesystem::absolute(std::filesystem::path(__FILE__)).parent_path() / "golden";
}

/// One golden safetensors file: its tensors by name and its "golden" metadata object.
struct GoldenFile {
  std::map<std::string, torch::Tensor> tensors;
  std::vector<std::pair<std::string, torch::Tensor>> ordered;
  util::json::Value meta;

  const torch::Tensor& at(const std::string& key) const {
    auto it = tensors.find(key);
    if (it == tensors.end()) throw std::runtime_error("golden tensor '" + key + "' missing: rerun generate.py");
    return it->second;
  }
  std::string str(const std::string& key) const {
    const auto* v = meta.find(key);
    if (!v) throw std::runtime_error("golden metadata '" + key + "' missing: rerun generate.py");
    return v->as_string();
  }
};

inline GoldenFile load_golden(const std::string& name) {
  auto file = model::load_safetensors(golden_dir() / name);
  GoldenFile g;
  g.ordered = file.tensors;
  for (auto& [k, v] : file.tensors) g.tensors.emplace(k, v);
  g.meta = util::json::parse(file.metadata.at("golden"));
  return g;
}

/// The cases file, loaded once per test binary.
inline const GoldenFile& cases() {
  static const GoldenFile g = load_golden("cases.safetensors");
  return g;
}

/// The reference Unet `name` ("a", "b", ...) with its golden weights, in eval mode.
inline model::Unet golden_unet(const std::string& name) {
  auto file = load_golden("unet_" + name + ".safetensors");
  model::Unet unet(model::UnetOptions::from_json(file.str("unet_options")));
  model::load_state_dict(*unet, file.ordered);
  unet->eval();
  return unet;
}

/// A diffusion for golden case `c`: its Unet and its options from the cases metadata.
inline model::GaussianDiffusion golden_diffusion(const std::string& c) {
  const auto& g = cases();
  auto options = model::DiffusionOptions::from_json(g.str(c + ".diffusion"));
  model::GaussianDiffusion diffusion(golden_unet(g.str(c + ".unet")), options);
  diffusion->eval();
  return diffusion;
}

/// The reference's classifier-free-guidance Unet ("unet_cfg.safetensors") with its golden weights, in eval mode.
inline model::ConditionalUnet golden_conditional_unet() {
  auto file = load_golden("unet_cfg.safetensors");
  model::ConditionalUnet unet(model::ConditionalUnetOptions::from_json(file.str("conditional_unet_options")));
  model::load_state_dict(*unet, file.ordered);
  unet->eval();
  return unet;
}

/// A conditional diffusion for golden case `c`: the golden ConditionalUnet and the case's options.
inline model::GaussianDiffusion golden_conditional_diffusion(const std::string& c) {
  auto options = model::DiffusionOptions::from_json(cases().str(c + ".diffusion"));
  model::GaussianDiffusion diffusion(golden_conditional_unet(), options);
  diffusion->eval();
  return diffusion;
}

/// Largest |a - b| divided by max(|b|) (what "1e-5 of the output scale" means).
inline double relative_max_error(const torch::Tensor& a, const torch::Tensor& b) {
  auto da = a.to(torch::kFloat64), db = b.to(torch::kFloat64);
  return (da - db).abs().max().item<double>() / std::max(db.abs().max().item<double>(), 1e-30);
}

/// A small U-Net for fast tests: dim 8, one or two stages, small attention.
inline model::UnetOptions tiny_unet_options(int64_t channels = 3, std::vector<int64_t> mults = {1, 2}) {
  model::UnetOptions o;
  o.dim = 8;
  o.dim_mults = std::move(mults);
  o.channels = channels;
  o.attn_heads = {2};
  o.attn_dim_head = {8};
  return o;
}

}  // namespace diffuse::testing
