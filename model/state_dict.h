// model/state_dict.h: a module's tensors by name, in the order PyTorch's `state_dict()` lists them.
//
// PyTorch's order is recursive, module by module: a module's own parameters (registration order),
// then its own buffers, then each child in registration order. LibTorch's `named_parameters()`
// instead lists every parameter before any buffer, which would put GaussianDiffusion's 13 schedule
// buffers last; these functions walk the tree the PyTorch way, so `state_dict(diffusion)` starts
// with `betas` and continues with `model.init_conv.weight`, exactly like the reference.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace diffuse::model {

/// Named tensors of `module` in the reference's state_dict order. The tensors are detached views
/// sharing storage with the module (like PyTorch's `state_dict()`): copy them before mutating.
std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& module);

/// Copies `tensors` into `module` by name (converting dtype and device as needed). Throws
/// std::runtime_error listing every problem at once: keys the module lacks ("unexpected"), keys the
/// module has but `tensors` does not ("missing"; both only when `strict`), repeated keys, and shape
/// mismatches with the expected and the given shape (always). Nothing is copied unless all checks pass.
void load_state_dict(torch::nn::Module& module,
                     const std::vector<std::pair<std::string, torch::Tensor>>& tensors, bool strict = true);

/// Total number of parameter elements (what the reference reports as the parameter count).
int64_t parameter_count(const torch::nn::Module& module);

}  // namespace diffuse::model
