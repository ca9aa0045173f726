// model/state_dict.cpp: PyTorch-ordered state dicts of LibTorch modules (parameters, then
// buffers, module by module, as torch.nn.Module.state_dict() orders them).
#include "model/state_dict.h"

#include <set>
#include <stdexcept>
#include <unordered_map>

#include "util/format.h"

namespace diffuse::model {

// ---------------------------------------------------------------------------------------------
// state dicts

namespace {

void collect(const torch::nn::Module& module, const std::string& prefix,
             std::vector<std::pair<std::string, torch::Tensor>>& out) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) out.emplace_back(prefix + p.key(), p.value().detach());
  for (const auto& b : module.named_buffers(/*recurse=*/false)) out.emplace_back(prefix + b.key(), b.value().detach());
  for (const auto& child : module.named_children()) collect(*child.value(), prefix + child.key() + ".", out);
}

std::string sizes_text(const torch::Tensor& t) { return util::format_shape(t.sizes().vec()); }

}  // namespace

std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  collect(module, "", out);
  return out;
}

void load_state_dict(torch::nn::Module& module, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     bool strict) {
  auto targets = state_dict(module);
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < targets.size(); ++i) index.emplace(targets[i].first, i);

  std::vector<std::string> missing, unexpected, other;
  std::vector<bool> given(targets.size(), false);
  std::vector<std::pair<size_t, const torch::Tensor*>> copies;
  for (const auto& [name, tensor] : tensors) {
    auto it = index.find(name);
    if (it == index.end()) {
      if (strict) unexpected.push_back(name + " " + (tensor.defined() ? sizes_text(tensor) : "(undefined)"));
      continue;
    }
    if (given[it->second]) {
      other.push_back("key '" + name + "' given twice");
      continue;
    }
    given[it->second] = true;
    const auto& target = targets[it->second].second;
    if (!tensor.defined() || tensor.sizes() != target.sizes()) {
      other.push_back("shape mismatch for '" + name + "': the module expects " + sizes_text(target) + ", got " +
                      (tensor.defined() ? sizes_text(tensor) : "an undefined tensor"));
      continue;
    }
    copies.emplace_back(it->second, &tensor);
  }
  if (strict) {
    for (size_t i = 0; i < targets.size(); ++i) {
      if (!given[i]) missing.push_back(targets[i].first + " " + sizes_text(targets[i].second));
    }
  }
  if (!missing.empty() || !unexpected.empty() || !other.empty()) {
    std::ostringstream msg;
    msg << "load_state_dict: " << missing.size() << " missing, " << unexpected.size() << " unexpected, "
        << other.size() << " other problem(s)";
    auto list = [&](const char* title, const std::vector<std::string>& items) {
      constexpr size_t kShown = 20;
      for (size_t i = 0; i < items.size() && i < kShown; ++i) msg << "\n  " << title << items[i];
      if (items.size() > kShown) msg << "\n  ... and " << items.size() - kShown << " more " << title;
    };
    list("missing key: ", missing);
    list("unexpected key: ", unexpected);
    list("", other);
    throw std::runtime_error(msg.str());
  }
  torch::NoGradGuard no_grad;
  for (const auto& [i, tensor] : copies) targets[i].second.copy_(*tensor);
}

int64_t parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

}  // namespace diffuse::model
