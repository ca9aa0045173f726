// trainer/step_timer.h: phase timing of a training step, injected into the Trainer. The default
// timer does nothing (no device syncs in real training); bench/trainer/step_bench passes a
// ProfilingStepTimer, which waits for the device at each phase boundary and records the phases.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace diffuse::trainer {

/// The phases of one training step, in the order they run.
enum class StepPhase {
  kDataWait,     ///< loader->next(), per micro-batch
  kForward,      ///< timestep draw, noise, autocast forward and loss
  kBackward,     ///< backward, including the bucket all-reduces it overlaps
  kBookkeeping,  ///< loss sums by timestep quartile (counted in the total only)
  kExposedComm,  ///< GradReducer::finish(): all-reduce not hidden behind backward
  kOptimizer,    ///< unscale, clip, fused AdamW, loss-scale update, zero grads
  kEma,          ///< Ema::update
};

class StepTimer {
 public:
  virtual ~StepTimer() = default;
  virtual void begin_step() {}
  /// `phase` just ended (a phase may end several times per step, once per micro-batch).
  virtual void end_phase(StepPhase phase) {}
  /// The step ended after training on `images` images on this rank.
  virtual void end_step(int64_t images) {}
};

/// Wall seconds of the phases of one training step.
struct StepProfile {
  double data_wait = 0, forward = 0, backward = 0, exposed_comm = 0, optimizer = 0, ema = 0;
  double total = 0;    ///< the whole step (the rest is loss bookkeeping)
  int64_t images = 0;  ///< images this rank trained on
};

/// Records one StepProfile per step; synchronises `device` at every phase boundary.
class ProfilingStepTimer final : public StepTimer {
 public:
  explicit ProfilingStepTimer(torch::Device device) : device_(device) {}
  void begin_step() override;
  void end_phase(StepPhase phase) override;
  void end_step(int64_t images) override;
  const std::vector<StepProfile>& profiles() const { return profiles_; }

 private:
  using Clock = std::chrono::steady_clock;
  double lap();
  torch::Device device_;
  Clock::time_point step_start_, mark_;
  StepProfile current_;
  std::vector<StepProfile> profiles_;
};

}  // namespace diffuse::trainer
