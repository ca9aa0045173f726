// trainer/run_directory.h: what a run leaves on disk, and the metrics log.
//
//   RUN/config.yaml          the resolved configuration
//   RUN/env.txt              git hash, build flags, devices, library versions, world size
//   RUN/metrics.jsonl        one JSON object per logged step (kept consistent across resumes)
//   RUN/logs/rank-N.log      every rank's log
//   RUN/samples/real.png     training images, for comparison
//   RUN/samples/step-NNNNNN.png
//   RUN/checkpoints/step-NNNNNN/, RUN/checkpoints/latest
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::trainer {

struct RunDirectory {
  std::filesystem::path root;
  std::filesystem::path config() const { return root / "config.yaml"; }
  std::filesystem::path env() const { return root / "env.txt"; }
  std::filesystem::path metrics() const { return root / "metrics.jsonl"; }
  std::filesystem::path logs() const { return root / "logs"; }
  std::filesystem::path samples() const { return root / "samples"; }
  std::filesystem::path checkpoints() const { return root / "checkpoints"; }
  /// samples/step-000123.png
  std::filesystem::path sample_grid(int64_t step) const;
  /// Creates the folders (rank 0 only calls this).
  void create() const;
};

/// "step-000123"
std::string step_name(int64_t step);

/// Appends one JSON object per line. Values are numbers or strings, written in insertion order.
class MetricsLogger {
 public:
  explicit MetricsLogger(std::filesystem::path path);
  /// Drops entries logged after `step` (they belong to a timeline a resume has discarded), so
  /// the history stays one consistent curve across preemptions.
  void truncate_after(int64_t step);
  void write(const std::vector<std::pair<std::string, double>>& numbers,
             const std::vector<std::pair<std::string, std::string>>& strings = {});

 private:
  std::filesystem::path path_;
};

}  // namespace diffuse::trainer
