// Trainer::Parts, every part of a training run, shared by trainer.cpp (construction, the loop,
// checkpoints) and trainer_reports.cpp (logs, divergence, sample grids, evaluations, post-hoc
// snapshots); not part of the trainer's interface.
#pragma once

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/loader.h"
#include "dist/communicator.h"
#include "dist/reducer.h"
#include "dist/timed_host_collective.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/diffusion_model.h"
#include "trainer/ema.h"
#include "trainer/logging.h"
#include "trainer/loss_tracker.h"
#include "trainer/nonfinite_guard.h"
#include "trainer/optimization.h"
#include "trainer/posthoc_training.h"
#include "trainer/run_directory.h"
#include "trainer/run_lock.h"
#include "trainer/tensorboard.h"
#include "trainer/timestep_sampler.h"
#include "trainer/trainer.h"
#include "trainer/training_quality.h"
#include "trainer/training_state.h"

namespace diffuse::trainer {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Every part of a training run, built in dependency order by the constructor.
struct Trainer::Parts {
  Parts(const dist::Context& context, Config cfg, RunOptions opts);

  std::vector<std::string> parameter_names() const {
    std::vector<std::string> out;
    for (const auto& item : diffusion.denoiser()->named_parameters()) out.push_back(item.key());
    return out;
  }
  std::vector<torch::Tensor> on_device_parameters() {
    diffusion.module().to(device);
    ema_diffusion.module().to(device);
    ema_diffusion.module().eval();
    auto tensors = diffusion.denoiser()->parameters();
    dist::broadcast_tensors(tensors, *comm, 0);  // every rank starts from rank 0's weights
    return tensors;
  }
  std::vector<torch::Tensor> trainable_parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& param : params) {
      if (param.requires_grad()) out.push_back(param);
    }
    return out;
  }
  std::vector<std::string> trainable_parameter_names() const {
    std::vector<std::string> out;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].requires_grad()) out.push_back(names[i]);
    }
    return out;
  }
  TrainingParts training_parts() {
    return {names, params, optimizer, ema, scaler, sampler, generator, loader};
  }
  int64_t global_batch() const { return config.train.batch_size * config.train.accumulate * ctx.world_size(); }

  const dist::Context& ctx;
  Config config;
  RunOptions options;
  RunDirectory run;
  torch::Device device;
  std::unique_ptr<dist::Communicator> comm;  ///< gradients and device tensors (NCCL on CUDA, MPI on CPU)
  /// The ranks' host messages during training (stop agreement, checkpoint protocol), bounded by
  /// train.collective_timeout_s like comm: a rank cut off mid-save must not hang the others.
  dist::TimedHostCollective host;
  data::Loader loader;
  std::unique_ptr<TrainingQuality> quality;  ///< the eval: section's evaluator (null without one)
  DiffusionModel diffusion;      ///< the online model
  DiffusionModel ema_diffusion;  ///< receives EMA weights for sample grids and evaluations
  std::vector<std::string> names;          ///< U-Net parameter names (reference state-dict keys)
  std::vector<torch::Tensor> params;
  // The parameters that learn: a fixed one (the random Fourier frequencies of KarrasUnet's time
  // embedding, or of a Unet with random_fourier_features) gets no gradient, is not reduced and is
  // left alone by the optimizer (also by its weight decay), as in torch; it is still averaged and saved.
  std::vector<torch::Tensor> trainable;
  std::vector<std::string> trainable_names;
  dist::GradReducer reducer;
  AdamW optimizer;
  Ema ema;
  std::unique_ptr<PosthocTraining> posthoc;  ///< ema.posthoc's profiles and snapshots (null without)
  GradScaler scaler;
  TimestepSampler sampler;
  torch::Generator generator;
  LrSchedule lr;
  LossTracker losses;
  NonfiniteGuard guard;
  int64_t nonfinite_reported = 0;  ///< bad steps already logged (skip policy)
  CheckpointStore checkpoints;
  MetricsLogger metrics;
  std::shared_ptr<StepTimer> timer;
  std::optional<RunLock> lock;  ///< rank 0's, for the job's life
  std::unique_ptr<TensorBoardWriter> tensorboard;  ///< rank 0's, when log.tensorboard

  int64_t step = 0;
  double elapsed_before = 0;  ///< training seconds of earlier runs of this job (resumes)
  double data_wait = 0, exposed_comm = 0;
  int64_t images_since_log = 0;
  Clock::time_point log_clock = Clock::now();
  double last_logged_loss = NAN;
  double evaluation_since_log = 0;  ///< seconds of evaluations since the last log row, not training
  double grids_since_log = 0;       ///< seconds of sample grids since the last log row, not training
  bool quality_warned = false;      ///< the evaluations' warnings (small N) are logged once
  std::optional<BestEvaluation> best;          ///< checkpoint.keep_best: saved, `best` names it
  std::optional<BestEvaluation> pending_best;  ///< beat `best` this step; becomes it once checkpointed
};

}  // namespace diffuse::trainer
