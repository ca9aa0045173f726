// trainer/feature_network.h: a feature network for sample-quality metrics, loaded from a
// TorchScript file (torch::jit::load). Input: float [b, 3, H, W] in [0, 1] (grey images are
// repeated to 3 channels); output: [b, D]. The file carries its own metadata as the TorchScript
// extra file `diffuse_features.json`:
//
//   {"name": "inception-v3-pool3", "input_size": [299, 299], "resizes_internally": false,
//    "resize_mode": "bilinear"}
//
// When the network does not resize internally, images are resized to input_size with
// resize_mode ("bilinear", "bicubic", "nearest" or "area"; align_corners false) first.
//
//   FeatureNetwork net("inception.pt", torch::kCPU);
//   torch::Tensor f = net.features(images);   // [b, D] float64 on the CPU
//   net.info().sha256;                        // recorded with every result
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <string>

namespace diffuse::trainer {

/// What a feature network file declares, and its identity.
struct FeatureNetworkInfo {
  std::filesystem::path path;
  std::string name;
  int64_t input_height = 0, input_width = 0;
  bool resizes_internally = false;
  std::string resize_mode = "bilinear";
  std::string sha256;  ///< of the .pt file
  int64_t dimension = 0;  ///< D, found by running one batch at load time
};

/// The TorchScript extra file that holds the metadata.
inline constexpr const char* kFeatureMetadataFile = "diffuse_features.json";

class FeatureNetwork {
 public:
  /// Loads `path` onto `device` in eval mode and checks its metadata and its output ([b, D] for a
  /// [2, 3, H, W] probe). Throws naming the file and what is wrong (missing or malformed
  /// metadata, unknown resize mode, wrong output shape).
  FeatureNetwork(const std::filesystem::path& path, torch::Device device);

  /// Features of images [b, C, H, W] (C = 1 or 3, values in [0, 1], any float dtype and device):
  /// [b, D] float64 on the CPU.
  torch::Tensor features(const torch::Tensor& images);

  const FeatureNetworkInfo& info() const { return info_; }

 private:
  torch::jit::Module module_;
  torch::Device device_;
  FeatureNetworkInfo info_;
};

}  // namespace diffuse::trainer
