// trainer/step_timer.cpp: see step_timer.h.
#include "trainer/step_timer.h"

#include "diffuse/build_config.h"

#if DIFFUSE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace diffuse::trainer {

double ProfilingStepTimer::lap() {
#if DIFFUSE_WITH_CUDA
  if (device_.is_cuda()) c10::cuda::device_synchronize();
#endif
  auto now = Clock::now();
  double seconds = std::chrono::duration<double>(now - mark_).count();
  mark_ = now;
  return seconds;
}

void ProfilingStepTimer::begin_step() {
  lap();
  step_start_ = mark_;
  current_ = StepProfile{};
}

void ProfilingStepTimer::end_phase(StepPhase phase) {
  double seconds = lap();
  switch (phase) {
    case StepPhase::kDataWait: current_.data_wait += seconds; break;
    case StepPhase::kForward: current_.forward += seconds; break;
    case StepPhase::kBackward: current_.backward += seconds; break;
    case StepPhase::kBookkeeping: break;
    case StepPhase::kExposedComm: current_.exposed_comm += seconds; break;
    case StepPhase::kOptimizer: current_.optimizer += seconds; break;
    case StepPhase::kEma: current_.ema += seconds; break;
  }
}

void ProfilingStepTimer::end_step(int64_t images) {
  lap();
  current_.total = std::chrono::duration<double>(mark_ - step_start_).count();
  current_.images = images;
  profiles_.push_back(current_);
}

}  // namespace diffuse::trainer
