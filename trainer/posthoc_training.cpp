// trainer/posthoc_training.cpp: see posthoc_training.h.
#include "trainer/posthoc_training.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include "util/files.h"

namespace diffuse::trainer {
namespace {

constexpr const char* kAverages = "posthoc.";
constexpr const char* kProgress = "posthoc_state.";

std::filesystem::path profile_directory(const std::filesystem::path& posthoc_dir, double sigma_rel) {
  return posthoc_dir / ("sigma_rel-" + sigma_rel_text(sigma_rel));
}

/// The step of a directory named step-NNNNNN, or -1.
int64_t step_of(const std::filesystem::path& dir) {
  const std::string name = dir.filename().string();
  if (name.rfind("step-", 0) != 0 || name.size() <= 5) return -1;
  const std::string digits = name.substr(5);
  if (!std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c) != 0; })) return -1;
  return std::stoll(digits);
}

int64_t bytes_under(const std::filesystem::path& dir) {
  std::error_code error;
  int64_t total = 0;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, error);
       !error && it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    if (it->is_regular_file(error)) total += static_cast<int64_t>(it->file_size(error));
  }
  return total;
}

double parse_number(const std::vector<std::pair<std::string, std::string>>& metadata, const std::string& key,
                    const std::filesystem::path& dir) {
  auto it = std::find_if(metadata.begin(), metadata.end(), [&key](const auto& entry) { return entry.first == key; });
  char* end = nullptr;
  double value = it == metadata.end() ? 0.0 : std::strtod(it->second.c_str(), &end);
  if (it == metadata.end() || end == it->second.c_str() || *end != '\0') {
    throw std::runtime_error("post-hoc EMA snapshot " + dir.string() + ": its manifest lacks a numeric metadata." +
                             key + " (not a snapshot written by diffuse's ema.posthoc?)");
  }
  return value;
}

}  // namespace

std::filesystem::path posthoc_directory(const std::filesystem::path& run_dir) { return run_dir / "posthoc"; }

std::filesystem::path run_of_checkpoint(const std::filesystem::path& checkpoint_dir) {
  return std::filesystem::absolute(checkpoint_dir).lexically_normal().parent_path().parent_path();
}

std::string sigma_rel_text(double sigma_rel) {
  std::ostringstream text;
  text << sigma_rel;
  return text.str();
}

PosthocTraining::PosthocTraining(const EmaConfig& config, std::vector<torch::Tensor> params,
                                 std::vector<std::string> names, std::filesystem::path run_dir,
                                 const dist::HostCollective& host)
    : sigma_rels_(config.posthoc_sigma_rels),
      snapshot_every_(config.posthoc_snapshot_every),
      bf16_(config.posthoc_dtype == SnapshotDtype::kBf16),
      names_(std::move(names)),
      dir_(posthoc_directory(run_dir)),
      host_(host) {
  if (sigma_rels_.empty() || snapshot_every_ < 1) {
    throw std::invalid_argument("PosthocTraining needs ema.posthoc.sigma_rels and ema.posthoc.snapshot_every > 0");
  }
  for (double sigma_rel : sigma_rels_) {
    emas_.push_back(std::make_unique<PowerEma>(params, sigma_rel_to_gamma(sigma_rel)));
  }
}

PosthocTraining::~PosthocTraining() = default;

void PosthocTraining::update() {
  for (auto& ema : emas_) ema->update();
}

SnapshotReport PosthocTraining::snapshot(int64_t step, const std::string& config_yaml) {
  const auto start = std::chrono::steady_clock::now();
  SnapshotReport report{.step = step};
  for (size_t p = 0; p < emas_.size(); ++p) {
    const auto& ema = *emas_[p];
    CheckpointContents contents;
    contents.step = step;
    contents.config_yaml = config_yaml;
    const auto& average = ema.average();
    for (size_t i = 0; i < average.size(); ++i) {
      contents.replicated.emplace_back(names_[i], bf16_ ? average[i].to(torch::kBFloat16) : average[i]);
    }
    std::ostringstream gamma;
    gamma.precision(17);
    gamma << ema.gamma();
    contents.metadata = {{"posthoc_sigma_rel", sigma_rel_text(sigma_rels_[p])},
                         {"posthoc_gamma", gamma.str()},
                         {"posthoc_ema_step", std::to_string(ema.step())},
                         {"posthoc_dtype", bf16_ ? "bf16" : "fp32"}};
    // Retention keeps every snapshot: the synthesis needs them all.
    CheckpointStore store(profile_directory(dir_, sigma_rels_[p]), host_, RetentionPolicy{.keep_last = 0});
    report.bytes += store.save(contents).bytes;
  }
  if (host_.is_root()) report.total_bytes = bytes_under(dir_);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

NamedTensors PosthocTraining::state() const {
  NamedTensors out;
  for (size_t p = 0; p < emas_.size(); ++p) {
    const std::string sigma = sigma_rel_text(sigma_rels_[p]);
    const auto& average = emas_[p]->average();
    for (size_t i = 0; i < average.size(); ++i) {
      out.emplace_back(kAverages + sigma + "." + names_[i], average[i]);
    }
    out.emplace_back(kProgress + sigma + ".step", torch::tensor(emas_[p]->step(), torch::kInt64));
    out.emplace_back(kProgress + sigma + ".initialized",
                     torch::tensor(static_cast<int64_t>(emas_[p]->initialized()), torch::kInt64));
  }
  return out;
}

void PosthocTraining::load_state(const NamedTensors& replicated) {
  std::map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, tensor] : replicated) by_name[name] = &tensor;
  auto get = [&](const std::string& name) -> const torch::Tensor& {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      throw std::runtime_error("the checkpoint has no post-hoc EMA tensor '" + name +
                               "': it was written without this ema.posthoc.sigma_rels profile, so the profile cannot "
                               "continue; resume with the checkpoint's ema.posthoc settings or start a new run");
    }
    return *it->second;
  };
  for (size_t p = 0; p < emas_.size(); ++p) {
    const std::string sigma = sigma_rel_text(sigma_rels_[p]);
    std::vector<torch::Tensor> average;
    for (const auto& name : names_) average.push_back(get(kAverages + sigma + "." + name));
    emas_[p]->load_state(get(kProgress + sigma + ".step").item<int64_t>(),
                         get(kProgress + sigma + ".initialized").item<int64_t>() != 0, average);
  }
}

int PosthocTraining::discard_snapshots_after(int64_t step) const {
  int removed = 0;
  for (double sigma_rel : sigma_rels_) {
    const auto profile = profile_directory(dir_, sigma_rel);
    std::error_code error;
    if (!std::filesystem::is_directory(profile, error)) continue;
    std::vector<std::filesystem::path> stale;
    for (const auto& entry : std::filesystem::directory_iterator(profile)) {
      std::string name = entry.path().filename().string();
      // step-N and an interrupted save's step-N.tmp alike.
      if (name.size() > 4 && name.substr(name.size() - 4) == ".tmp") name.resize(name.size() - 4);
      if (step_of(name) > step) stale.push_back(entry.path());
    }
    for (const auto& dir : stale) {
      std::filesystem::remove_all(dir);
      ++removed;
    }
    // `latest` would name a removed snapshot; the next save points it again.
    if (removed > 0) std::filesystem::remove(profile / "latest", error);
  }
  return removed;
}

std::vector<SnapshotFile> list_snapshots(const std::filesystem::path& run_dir, int64_t max_step) {
  const auto dir = posthoc_directory(run_dir);
  std::error_code error;
  if (!std::filesystem::is_directory(dir, error)) {
    throw std::invalid_argument("no post-hoc EMA snapshots: " + dir.string() +
                                " does not exist (train with ema.posthoc: {sigma_rels: [0.05, 0.28], "
                                "snapshot_every: K} to keep them)");
  }
  std::vector<std::filesystem::path> profiles;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.is_directory() && entry.path().filename().string().rfind("sigma_rel-", 0) == 0) {
      profiles.push_back(entry.path());
    }
  }
  std::sort(profiles.begin(), profiles.end());
  std::vector<SnapshotFile> found;
  for (const auto& profile : profiles) {
    std::vector<std::filesystem::path> steps;
    for (const auto& entry : std::filesystem::directory_iterator(profile)) {
      const int64_t step = step_of(entry.path());
      if (step >= 0 && step <= max_step && entry.is_directory() && !entry.is_symlink() &&
          std::filesystem::exists(entry.path() / "manifest.json")) {
        steps.push_back(entry.path());
      }
    }
    std::sort(steps.begin(), steps.end(), [](const auto& a, const auto& b) { return step_of(a) < step_of(b); });
    for (const auto& snapshot_dir : steps) {
      auto manifest_path = snapshot_dir / "manifest.json";
      auto manifest = parse_manifest(util::read_file(manifest_path), manifest_path.string());
      SnapshotFile file{.directory = snapshot_dir,
                        .sigma_rel = parse_number(manifest.metadata, "posthoc_sigma_rel", snapshot_dir),
                        .snapshot = {.step = static_cast<int64_t>(
                                         parse_number(manifest.metadata, "posthoc_ema_step", snapshot_dir)),
                                     .gamma = parse_number(manifest.metadata, "posthoc_gamma", snapshot_dir)}};
      found.push_back(file);
    }
  }
  if (found.empty()) {
    throw std::invalid_argument("no post-hoc EMA snapshots at or before step " + std::to_string(max_step) + " in " +
                                dir.string());
  }
  return found;
}

NamedTensors synthesize_posthoc_weights(const std::filesystem::path& run_dir, int64_t max_step, double sigma_rel) {
  auto files = list_snapshots(run_dir, max_step);
  std::vector<PosthocSnapshot> snapshots;
  for (const auto& file : files) snapshots.push_back(file.snapshot);
  return synthesize_posthoc_ema(
      snapshots, [&files](size_t i) { return read_checkpoint_single_process(files[i].directory).replicated; },
      sigma_rel);
}

}  // namespace diffuse::trainer
