// What a training run reports between its steps: the log rows (metrics.jsonl, TensorBoard, the
// console), the divergence check behind them, sample grids, the eval: section's evaluations and
// the post-hoc EMA snapshots. Trainer::Parts: trainer_parts.h; the loop itself: trainer.cpp.
#include <cmath>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "data/image_io.h"
#include "trainer/logging.h"
#include "trainer/sampling.h"
#include "trainer/trainer_parts.h"
#include "util/files.h"
#include "util/format.h"

namespace diffuse::trainer {

void Trainer::log_step(double elapsed) {
  auto& p = *parts_;
  auto summary = p.losses.summarize(*p.comm);  // the one host sync of a logging step
  double interval = seconds_since(p.log_clock);
  // Evaluations and sample grids are not training: their time would make images/s depend on eval.every,
  // eval.n and log.sample_every.
  double training_seconds = interval - p.evaluation_since_log - p.grids_since_log;
  double images_per_second = training_seconds > 0 ? p.images_since_log / training_seconds : 0;
  std::vector<std::pair<std::string, double>> row{
      {"step", static_cast<double>(p.step)},
      {"loss", summary.loss},
      {"loss_q0", summary.quartile[0]},
      {"loss_q1", summary.quartile[1]},
      {"loss_q2", summary.quartile[2]},
      {"loss_q3", summary.quartile[3]},
      {"lr", p.lr.at(p.step - 1)},
      {"grad_norm", summary.grad_norm},
      {"loss_scale", p.scaler.enabled() ? p.scaler.scale_value() : 1.0},
      {"images_per_sec", images_per_second},
      {"data_wait_s", p.data_wait},
      {"allreduce_exposed_s", p.exposed_comm},
      {"elapsed_s", elapsed},
      {"samples_seen", static_cast<double>(p.loader.state().samples_seen)},
  };
  if (p.quality) {
    // The interval and the time left out of images/s: images_per_sec = the interval's
    // images / (interval_s - eval_s - grid_s).
    row.emplace_back("interval_s", interval);
    row.emplace_back("eval_s", p.evaluation_since_log);
    row.emplace_back("grid_s", p.grids_since_log);
  }
  if (p.ctx.is_root()) {
    p.metrics.write(row);
    if (p.tensorboard) {
      std::vector<std::pair<std::string, double>> scalars;
      for (const auto& [key, value] : row) {
        if (key == "step") continue;
        scalars.emplace_back(key.rfind("loss_q", 0) == 0 ? "loss/" + key.substr(5) : key, value);
      }
      p.tensorboard->add_scalars(scalars, p.step);
    }
    log::info("step {}/{}  loss {:.5f}  lr {:.3g}  grad_norm {:.3f}  {:.1f} img/s  data wait {:.2f}s  "
              "exposed all-reduce {:.2f}s",
              p.step, p.config.train.steps, summary.loss, p.lr.at(p.step - 1), summary.grad_norm, images_per_second,
              p.data_wait, p.exposed_comm);
  }
  p.last_logged_loss = summary.loss;
  check_divergence();
  p.data_wait = p.exposed_comm = 0;
  p.evaluation_since_log = p.grids_since_log = 0;
  p.images_since_log = 0;
  p.log_clock = Clock::now();
}

void Trainer::check_divergence() {
  auto& p = *parts_;
  const auto report = p.guard.read();
  if (report.bad_steps == p.nonfinite_reported) return;
  const auto& t = p.config.train;
  const bool stop = t.on_nonfinite == NonfinitePolicy::kStop || report.consecutive >= t.max_nonfinite_skips;
  if (!stop) {
    if (p.ctx.is_root()) {
      log::warn("dropped {} update(s) with a non-finite loss or gradient so far ({} in a row; the run stops at "
                "train.max_nonfinite_skips={})",
                report.bad_steps, report.consecutive, t.max_nonfinite_skips);
    }
    p.nonfinite_reported = report.bad_steps;
    return;
  }
  std::string what = report.first_was_loss ? std::string("the training loss")
                     : report.first_parameter >= 0 &&
                               report.first_parameter < static_cast<int64_t>(p.trainable_names.size())
                         ? "the gradient of '" + p.trainable_names[static_cast<size_t>(report.first_parameter)] + "'"
                         : std::string("a gradient");
  auto kept = p.checkpoints.list();
  std::string last_good = kept.empty() ? std::string("none was written") : kept.front().string();
  std::string policy = t.on_nonfinite == NonfinitePolicy::kStop
                           ? "train.on_nonfinite=stop"
                           : fmt::format("{} non-finite steps in a row, train.max_nonfinite_skips={}",
                                         report.consecutive, t.max_nonfinite_skips);
  throw TrainingDiverged(fmt::format(
      "training diverged: at step {} {} became NaN or infinite ({} bad step(s) by step {}; {}). The weights were "
      "not updated with it and no checkpoint was written after it; the last finite checkpoint: {}. Resume from it "
      "with a lower train.lr, stronger clipping (train.max_grad_norm) or train.precision=fp32/bf16.",
      report.first_step, what, report.bad_steps, p.step, policy, last_good));
}

void Trainer::sample_grid() {
  auto& p = *parts_;
  const auto start = Clock::now();
  {
    torch::NoGradGuard no_grad;
    auto targets = p.ema_diffusion.denoiser()->parameters();
    p.ema.copy_to(targets, 0);
  }
  // Fixed noise, so the grids of successive steps are comparable.
  SampleRequest request{.n = p.config.log.num_samples, .seed = static_cast<uint64_t>(p.config.log.sample_seed),
                        .options = {.sampler = "auto", .steps = p.config.log.sample_steps, .eta = 0.0}};
  auto per_row = static_cast<int64_t>(std::ceil(std::sqrt(request.n)));
  if (const int64_t k = p.config.model.num_classes; k > 0) {
    // One row per class (guided with the sampler's default scale), log.num_samples / k per row.
    per_row = std::max<int64_t>(1, request.n / k);
    std::vector<int64_t> all(static_cast<size_t>(k));
    std::iota(all.begin(), all.end(), 0);
    request.classes = class_rows(all, per_row);
    request.n = per_row * k;
  }
  // One chunk per rank: the grid is spread over the world (its pixels may then depend on the world size).
  request.batch = (request.n + p.ctx.world_size() - 1) / p.ctx.world_size();
  auto images = sample_images(p.ema_diffusion, *p.comm, request);
  if (p.ctx.is_root()) {
    data::save_image_grid(p.run.sample_grid(p.step), images, per_row, /*padding=*/2, /*overwrite=*/true);
    if (p.tensorboard) p.tensorboard->add_image("samples", util::read_file(p.run.sample_grid(p.step)), p.step);
    log::info("sample grid: {}", p.run.sample_grid(p.step).string());
  }
  p.grids_since_log += seconds_since(start);
}

bool Trainer::evaluate_quality() {
  auto& p = *parts_;
  auto start = Clock::now();
  auto& quality = *p.quality;
  DiffusionModel* evaluated = &p.diffusion;
  if (auto index = quality.ema_index()) {
    torch::NoGradGuard no_grad;
    auto targets = p.ema_diffusion.denoiser()->parameters();
    p.ema.copy_to(targets, *index);
    evaluated = &p.ema_diffusion;
  }
  evaluated->module().eval();  // the online model goes back to train mode at the next step
  auto result = quality.evaluate(*evaluated, *p.comm);
  if (p.options.hooks.after_quality_evaluation) p.options.hooks.after_quality_evaluation(p.step, result);
  const double seconds = seconds_since(start);
  p.evaluation_since_log += seconds;

  bool new_best = false;
  const auto metric = p.config.checkpoint.keep_best;
  if (auto value = best_metric_value(metric, result); value && (!p.best || *value < p.best->value)) {
    p.pending_best = BestEvaluation{.metric = metric, .value = *value, .step = p.step};
    new_best = true;
  }
  if (!p.ctx.is_root()) return new_best;
  if (!p.quality_warned) {
    for (const auto& warning : result.warnings) log::warn("eval: {}", warning);
    if (metric == BestMetric::kKid && !result.kid) log::warn("eval: no KID, so checkpoint.keep_best=kid cannot rank");
    p.quality_warned = true;
  }
  const auto& options = quality.request().sampling.options;
  std::vector<std::pair<std::string, double>> row{{"step", static_cast<double>(p.step)}, {"fid", result.fid}};
  if (result.kid) {
    row.emplace_back("kid", result.kid->mean);
    row.emplace_back("kid_std", result.kid->std);
  }
  if (result.precision_recall) {
    row.emplace_back("precision", result.precision_recall->precision);
    row.emplace_back("recall", result.precision_recall->recall);
  }
  row.emplace_back("eval_seconds", seconds);
  row.emplace_back("eval_n", static_cast<double>(result.n));
  row.emplace_back("eval_steps", static_cast<double>(options.steps));
  row.emplace_back("eval_eta", options.eta);
  if (metric != BestMetric::kNone) {
    const auto& best = p.pending_best ? p.pending_best : p.best;
    if (best) row.emplace_back("best_" + to_string(metric), best->value);
  }
  p.metrics.write(row, {{"eval_sampler", options.sampler}, {"eval_weights", quality.weights_label()}});
  if (p.tensorboard) {
    std::vector<std::pair<std::string, double>> scalars;
    for (const auto& [key, value] : row) {
      if (key == "fid" || key == "kid" || key == "kid_std" || key == "precision" || key == "recall") {
        scalars.emplace_back("eval/" + key, value);
      }
    }
    scalars.emplace_back("eval/seconds", seconds);
    p.tensorboard->add_scalars(scalars, p.step);
  }
  std::string line = fmt::format("eval at step {}: FID {:.4f}", p.step, result.fid);
  if (result.kid) line += fmt::format("  KID {:.6f} ± {:.6f}", result.kid->mean, result.kid->std);
  if (result.precision_recall) {
    line += fmt::format("  precision {:.4f}  recall {:.4f}", result.precision_recall->precision,
                        result.precision_recall->recall);
  }
  line += fmt::format("  ({} samples, {} {} steps, {} weights, features {}) in {:.1f}s, not counted in img/s",
                      result.n, options.sampler, options.steps, quality.weights_label(), quality.network().name,
                      seconds);
  if (new_best) line += fmt::format("; new best {}, checkpointed now", to_string(metric));
  log::info("{}", line);
  return new_best;
}

void Trainer::snapshot_posthoc() {
  auto& p = *parts_;
  auto report = p.posthoc->snapshot(p.step, p.config.to_yaml());
  p.grids_since_log += report.seconds;  // like the grids: not training time, kept out of images/s
  if (p.ctx.is_root()) {
    log::info("post-hoc EMA snapshot at step {}: {} profile(s), {:.2f} MB ({}) in {:.1f}s; {} holds {:.1f} MB",
              p.step, p.posthoc->profiles(), report.bytes / 1e6, to_string(p.config.ema.posthoc_dtype),
              report.seconds, posthoc_directory(p.run.root).string(), report.total_bytes / 1e6);
  }
}

}  // namespace diffuse::trainer
