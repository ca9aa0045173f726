// trainer/feature_network.cpp: TorchScript loading, metadata and input preparation.
#include "trainer/feature_network.h"

#include <stdexcept>

#include "util/json.h"
#include "util/sha256.h"

namespace diffuse::trainer {
namespace {

[[noreturn]] void refuse(const std::filesystem::path& path, const std::string& problem) {
  throw std::invalid_argument("feature network " + path.string() + ": " + problem);
}

void read_metadata(const std::string& text, FeatureNetworkInfo& info) {
  const auto& path = info.path;
  util::json::Value doc;
  try {
    doc = util::json::parse(text);
  } catch (const std::exception& error) {
    refuse(path, std::string(kFeatureMetadataFile) + " is not valid JSON: " + error.what());
  }
  auto member = [&](const char* key) -> const util::json::Value& {
    const auto* value = doc.find(key);
    if (value == nullptr) refuse(path, std::string(kFeatureMetadataFile) + " has no \"" + key + "\"");
    return *value;
  };
  try {
    info.name = member("name").as_string();
    const auto& size = member("input_size").as_array();
    if (size.size() != 2) refuse(path, "input_size must be [height, width]");
    info.input_height = size[0].as_int64();
    info.input_width = size[1].as_int64();
    info.resizes_internally = member("resizes_internally").as_bool();
    info.resize_mode = member("resize_mode").as_string();
  } catch (const std::invalid_argument& error) {
    if (std::string(error.what()).rfind("feature network", 0) == 0) throw;
    refuse(path, std::string(kFeatureMetadataFile) + ": " + error.what());
  }
  if (info.input_height < 1 || info.input_width < 1) refuse(path, "input_size must be positive");
  if (info.resize_mode != "bilinear" && info.resize_mode != "bicubic" && info.resize_mode != "nearest" &&
      info.resize_mode != "area") {
    refuse(path, "resize_mode '" + info.resize_mode + "' is not one of bilinear, bicubic, nearest, area");
  }
}

}  // namespace

FeatureNetwork::FeatureNetwork(const std::filesystem::path& path, torch::Device device) : device_(device) {
  info_.path = path;
  if (!std::filesystem::is_regular_file(path)) refuse(path, "no such file (give a TorchScript .pt file)");
  torch::jit::ExtraFilesMap extra{{kFeatureMetadataFile, ""}};
  try {
    module_ = torch::jit::load(path.string(), device, extra);
  } catch (const c10::Error& error) {
    refuse(path, std::string("not a loadable TorchScript file: ") + error.what_without_backtrace());
  }
  if (extra[kFeatureMetadataFile].empty()) {
    refuse(path, std::string("has no extra file ") + kFeatureMetadataFile +
                     " (save it with torch.jit.save(m, f, _extra_files={...}); see tests/trainer/fixtures/)");
  }
  read_metadata(extra[kFeatureMetadataFile], info_);
  info_.sha256 = util::sha256_file(path);
  module_.eval();
  auto probe = features(torch::full({2, 3, info_.input_height, info_.input_width}, 0.5));
  info_.dimension = probe.size(1);
}

torch::Tensor FeatureNetwork::features(const torch::Tensor& images) {
  if (images.dim() != 4 || (images.size(1) != 1 && images.size(1) != 3)) {
    throw std::invalid_argument("feature network " + info_.path.string() + ": images must be [b, 1|3, H, W], got " +
                                c10::str(images.sizes()));
  }
  torch::NoGradGuard no_grad;
  auto x = images.to(device_, torch::kFloat32);
  if (x.size(1) == 1) x = x.expand({-1, 3, -1, -1});
  if (!info_.resizes_internally && (x.size(2) != info_.input_height || x.size(3) != info_.input_width)) {
    namespace F = torch::nn::functional;
    auto options = F::InterpolateFuncOptions().size(std::vector<int64_t>{info_.input_height, info_.input_width});
    if (info_.resize_mode == "bilinear") options.mode(torch::kBilinear).align_corners(false);
    if (info_.resize_mode == "bicubic") options.mode(torch::kBicubic).align_corners(false);
    if (info_.resize_mode == "nearest") options.mode(torch::kNearest);
    if (info_.resize_mode == "area") options.mode(torch::kArea);
    x = F::interpolate(x, options);
  }
  auto output = module_.forward({x.contiguous()});
  if (!output.isTensor()) refuse(info_.path, "forward must return one tensor [b, D]");
  auto f = output.toTensor();
  if (f.dim() != 2 || f.size(0) != x.size(0)) {
    refuse(info_.path, "forward must return [b, D] for b images, got " + c10::str(f.sizes()) + " for b = " +
                           std::to_string(x.size(0)));
  }
  return f.to(torch::kCPU, torch::kFloat64);
}

}  // namespace diffuse::trainer
