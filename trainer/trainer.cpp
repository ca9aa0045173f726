// The training loop. Read Trainer::run() first, then train_step(): everything else is set-up,
// bookkeeping and checkpoint plumbing.
#include "trainer/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <iostream>
#include <new>
#include <string_view>

#include "data/dataset.h"
#include "data/image_io.h"
#include "data/loader.h"
#include "diffuse/build_config.h"
#include "dist/communicator.h"
#include "dist/reducer.h"
#include "model/state_dict.h"
#include "trainer/checkpoint.h"
#include "trainer/doctor.h"
#include "trainer/ema.h"
#include "trainer/logging.h"
#include "trainer/optimization.h"
#include "trainer/run_directory.h"
#include "trainer/timestep_sampler.h"

#if DIFFUSE_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace diffuse::trainer {

std::atomic<int>& stop_signal() {
  static std::atomic<int> signal{0};
  return signal;
}

namespace {

extern "C" void on_stop_signal(int signal) { stop_signal().store(signal); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// splitmix64: decorrelates (seed, stream) pairs so rank r's stream never overlaps rank r+1's.
uint64_t mix_seed(uint64_t seed, uint64_t stream) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

torch::Generator make_generator(torch::Device device, uint64_t seed) {
#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) {
    auto generator = at::cuda::detail::createCUDAGenerator(device.index());
    generator.set_current_seed(seed);
    return generator;
  }
#endif
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

/// Autocast for one forward pass; restores the previous state and clears the cast cache.
class AutocastScope {
 public:
  AutocastScope(torch::Device device, const std::string& precision)
      : type_(device.type()), enabled_(precision != "fp32") {
    if (!enabled_) return;
    previous_enabled_ = at::autocast::is_autocast_enabled(type_);
    previous_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, precision == "bf16" ? torch::kBFloat16 : torch::kFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type_, previous_enabled_);
    at::autocast::set_autocast_dtype(type_, previous_dtype_);
  }

 private:
  c10::DeviceType type_;
  bool enabled_;
  bool previous_enabled_ = false;
  at::ScalarType previous_dtype_ = at::kFloat;
};

std::vector<std::pair<std::string, torch::Tensor>> prefixed(const std::string& prefix,
                                                            const std::vector<std::string>& names,
                                                            const std::vector<torch::Tensor>& tensors) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < names.size(); ++i) out.emplace_back(prefix + names[i], tensors[i]);
  return out;
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  return fmt::format("{:.1f} {}", bytes, units[unit]);
}

/// An allocation failure on any device: CUDA's OutOfMemoryError, the CPU allocator's failure
/// (a plain c10::Error, "DefaultCPUAllocator: can't allocate memory"), or std::bad_alloc.
bool is_out_of_memory(const std::exception& error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&error) != nullptr) return true;
  if (dynamic_cast<const std::bad_alloc*>(&error) != nullptr) return true;
  std::string_view what = error.what();
  return what.find("can't allocate memory") != std::string_view::npos ||
         what.find("not enough memory") != std::string_view::npos;
}

/// The allocator's own words, without the C++ backtrace a c10::Error carries.
std::string error_text(const std::exception& error) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&error)) return c10_error->what_without_backtrace();
  return error.what();
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  int64_t s = static_cast<int64_t>(seconds);
  return fmt::format("{}:{:02d}:{:02d}", s / 3600, (s / 60) % 60, s % 60);
}

}  // namespace

void install_stop_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
}

model::UnetOptions unet_options(const ModelConfig& m) {
  model::UnetOptions options;
  options.dim = m.dim;
  options.dim_mults = m.dim_mults;
  options.channels = m.channels;
  options.self_condition = m.self_condition;
  options.learned_variance = m.learned_variance;
  options.dropout = m.dropout;
  options.attn_heads = {m.attn_heads};
  options.attn_dim_head = {m.attn_dim_head};
  options.full_attn = m.full_attn;
  options.flash_attn = m.flash_attn;
  return options;
}

model::DiffusionOptions diffusion_options(const Config& config) {
  model::DiffusionOptions options;
  options.image_size = config.data.image_size;
  options.timesteps = config.diffusion.timesteps;
  options.sampling_timesteps = config.log.sample_steps;
  options.objective = config.diffusion.objective;
  options.beta_schedule = config.diffusion.beta_schedule;
  options.min_snr_loss_weight = config.diffusion.min_snr_loss_weight;
  options.min_snr_gamma = config.diffusion.min_snr_gamma;
  options.offset_noise_strength = config.diffusion.offset_noise_strength;
  options.vlb_weight = config.diffusion.vlb_weight;
  return options;
}

model::GaussianDiffusion build_diffusion(const Config& config) {
  return model::GaussianDiffusion(model::Unet(unet_options(config.model)), diffusion_options(config));
}

struct Trainer::State {
  State(const dist::Context& context, Config cfg, RunOptions opts)
      : ctx(context),
        config(std::move(cfg)),
        options(std::move(opts)),
        diffusion(build_diffusion(config)),
        ema_diffusion(build_diffusion(config)),
        scaler(GradScalerOptions{.enabled = config.train.precision == "fp16",
                                 .init_scale = config.train.loss_scale_init,
                                 .growth_interval = config.train.loss_scale_growth_interval,
                                 .max_consecutive_skipped = config.train.max_consecutive_skipped,
                                 .min_scale = config.train.min_loss_scale}),
        sampler(config.diffusion.timestep_sampler, config.diffusion.timesteps),
        metrics(std::filesystem::path()) {}

  const dist::Context& ctx;
  Config config;
  RunOptions options;
  RunDirectory run;
  torch::Device device = torch::kCPU;
  std::unique_ptr<dist::Communicator> comm;  ///< gradients and device tensors (NCCL on CUDA, MPI on CPU)
  model::GaussianDiffusion diffusion;        ///< the online model
  model::GaussianDiffusion ema_diffusion;    ///< receives EMA weights for sample grids
  std::vector<std::string> names;            ///< U-Net parameter names (reference state-dict keys)
  std::vector<torch::Tensor> params;
  std::unique_ptr<dist::GradReducer> reducer;
  std::vector<torch::Tensor> exp_avg, exp_avg_sq, adam_steps;  ///< AdamW state, one per parameter
  std::unique_ptr<Ema> ema;
  GradScaler scaler;
  TimestepSampler sampler;
  std::unique_ptr<data::Loader> loader;
  torch::Generator generator;
  LrSchedule lr;
  MetricsLogger metrics;
  std::unique_ptr<CheckpointStore> checkpoints;

  int64_t step = 0;
  double elapsed_before = 0;  ///< training seconds of earlier runs of this job (resumes)
  // Logging accumulators, kept on the device so that steps that do not log never sync.
  torch::Tensor loss_sum, quartile_sum, quartile_count, last_grad_norm;
  double data_wait = 0, exposed_comm = 0;
  int64_t images_since_log = 0;
  Clock::time_point log_clock = Clock::now();
  double last_logged_loss = NAN;
  StepProfile* profile = nullptr;  ///< set by profile_steps(): train_step syncs and times its phases

  void setup();
  void restore(const LoadedCheckpoint& checkpoint);
  CheckpointContents checkpoint_contents() const;
  void save_checkpoint();
  void train_step();  ///< one optimizer step; an allocation failure becomes a message naming rank and batch
  void forward_backward_update();
  /// Profiling only: waits for the device, then returns the seconds since `mark` and resets it.
  double lap(Clock::time_point& mark);
  void adamw_step(double learning_rate);
  void log_step(double elapsed);
  void sample_grid();
  void print_progress(double elapsed);
  int64_t global_batch() const { return config.train.batch_size * config.train.accumulate * ctx.world_size(); }
};

void Trainer::State::setup() {
  const auto& t = config.train;
  bool want_cuda = t.device == "cuda" || (t.device == "auto" && torch::cuda::is_available());
  device = dist::select_device(ctx, want_cuda);
  run.root = std::filesystem::absolute(options.run_dir.empty() ? std::filesystem::path("runs") / config.name
                                                                : options.run_dir);
  dist::CommunicatorOptions comm_options{
      .timeout = std::chrono::milliseconds(static_cast<int64_t>(t.collective_timeout_s * 1000))};
  comm = device.is_cuda() ? dist::make_nccl_communicator(ctx, device, comm_options)
                          : dist::make_mpi_communicator(ctx, comm_options);

  // Data first: its errors (missing file, wrong size) are the most common and the cheapest.
  data::LoaderOptions loader_options;
  loader_options.path = config.data.path;
  loader_options.batch_size = t.batch_size;
  loader_options.rank = ctx.rank();
  loader_options.world_size = ctx.world_size();
  loader_options.seed = static_cast<uint64_t>(t.seed);
  loader_options.random_flip = config.data.random_flip;
  loader_options.worker_threads = static_cast<int>(config.data.workers);
  loader_options.prefetch_batches = static_cast<int>(config.data.prefetch);
  loader_options.expected_size = config.data.image_size;
  loader_options.expected_channels = config.model.channels;
  loader_options.device = device;
  if (const char* stall = std::getenv("DIFFUSE_TEST_STALL_RANK")) {
    // Test hook (docs: README, "Testing hooks"): this rank sleeps in the loader, as a rank stuck
    // on a dead filesystem would, so the collective timeout can be tested.
    if (std::atoi(stall) == ctx.rank()) {
      loader_options.before_batch_hook = [](int64_t batch) {
        if (batch >= 3) std::this_thread::sleep_for(std::chrono::hours(1));
      };
    }
  }
  loader = std::make_unique<data::Loader>(loader_options);

  diffusion->to(device);
  ema_diffusion->to(device);
  ema_diffusion->eval();
  for (const auto& item : diffusion->model->named_parameters()) {
    names.push_back(item.key());
    params.push_back(item.value());
  }
  dist::broadcast_tensors(params, *comm, 0);  // every rank starts from rank 0's weights
  generator = make_generator(device, mix_seed(static_cast<uint64_t>(t.seed), 1 + static_cast<uint64_t>(ctx.rank())));

  dist::ReducerOptions reducer_options;
  reducer_options.bucket_cap_mb = t.bucket_cap_mb;
  if (t.grad_compression == "bf16") reducer_options.compress_dtype = torch::kBFloat16;
  if (t.grad_compression == "fp16") reducer_options.compress_dtype = torch::kFloat16;
  reducer = std::make_unique<dist::GradReducer>(params, *comm, reducer_options);

  for (const auto& p : params) {
    exp_avg.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    exp_avg_sq.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    adam_steps.push_back(torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(device)));
  }
  ema = std::make_unique<Ema>(params, EmaOptions{.decays = config.ema.decay,
                                                 .update_every = config.ema.update_every,
                                                 .update_after_step = config.ema.update_after_step,
                                                 .inv_gamma = config.ema.inv_gamma,
                                                 .power = config.ema.power,
                                                 .min_value = config.ema.min_value});
  lr = LrSchedule{.base_lr = t.lr, .warmup_steps = t.warmup_steps, .kind = t.lr_schedule,
                  .total_steps = t.steps, .min_lr_ratio = t.min_lr_ratio};
  checkpoints = std::make_unique<CheckpointStore>(
      run.checkpoints(), ctx, RetentionPolicy{.keep_last = config.checkpoint.keep_last,
                                              .keep_every = config.checkpoint.keep_every});
  metrics = MetricsLogger(run.metrics());
  auto zeros = [&](int64_t n) { return torch::zeros({n}, torch::TensorOptions().dtype(torch::kFloat32).device(device)); };
  loss_sum = zeros(1);
  quartile_sum = zeros(4);
  quartile_count = zeros(4);
  last_grad_norm = zeros(1);
}

void Trainer::State::adamw_step(double learning_rate) {
  std::vector<torch::Tensor> grads;
  grads.reserve(params.size());
  for (auto& p : params) grads.push_back(p.grad());
  torch::NoGradGuard no_grad;
  torch::_foreach_add_(adam_steps, 1);
  // One fused kernel for all parameters (CPU and CUDA), not a per-parameter loop.
  at::_fused_adamw_(params, grads, exp_avg, exp_avg_sq, /*max_exp_avg_sqs=*/{}, adam_steps, learning_rate,
                    config.train.adam_beta1, config.train.adam_beta2, config.train.weight_decay,
                    config.train.adam_eps, /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/c10::nullopt,
                    /*found_inf=*/c10::nullopt);
}

double Trainer::State::lap(Clock::time_point& mark) {
#if DIFFUSE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#endif
  auto now = Clock::now();
  double seconds = std::chrono::duration<double>(now - mark).count();
  mark = now;
  return seconds;
}

void Trainer::State::train_step() {
  // Out of memory surfaces deep inside forward or backward with only the allocator's message;
  // the user needs to know which rank and which setting to change.
  try {
    forward_backward_update();
  } catch (const std::exception& error) {
    if (!is_out_of_memory(error)) throw;
    const auto& t = config.train;
    throw std::runtime_error(fmt::format(
        "out of memory on rank {} of {} ({}) in step {} with train.batch_size={} images per rank "
        "(train.accumulate={}, {}x{} images, precision {}): lower train.batch_size and raise train.accumulate to "
        "keep the global batch of {}{}. The allocator said: {}",
        ctx.rank(), ctx.world_size(), device.str(), step + 1, t.batch_size, t.accumulate, config.data.image_size,
        config.data.image_size, t.precision, global_batch(),
        t.precision == "fp32" ? ", or train with train.precision=bf16" : "", error_text(error)));
  }
}

void Trainer::State::forward_backward_update() {
  const auto& t = config.train;
  diffusion->train();
  auto step_start = Clock::now();
  auto mark = step_start;
  auto quartile_width = static_cast<double>(config.diffusion.timesteps) / 4.0;
  for (int64_t micro = 0; micro < t.accumulate; ++micro) {
    auto wait_start = Clock::now();
    data::Batch batch = loader->next();
    data_wait += seconds_since(wait_start);
    if (profile) profile->data_wait += lap(mark);
    auto x = batch.images;
    if (device.is_cuda() && t.channels_last) x = x.contiguous(torch::MemoryFormat::ChannelsLast);
    int64_t b = x.size(0);

    reducer->prepare_for_backward(/*sync=*/micro == t.accumulate - 1);
    auto draw = sampler.sample(b, generator, device);
    auto noise = torch::randn(x.sizes(), generator, x.options());
    torch::Tensor losses;
    {
      AutocastScope autocast(device, t.precision);
      losses = diffusion->training_losses(x, draw.t, noise, generator);
    }
    auto loss = (losses.to(torch::kFloat32) * draw.weights).mean() / static_cast<double>(t.accumulate);
    if (profile) profile->forward += lap(mark);
    scaler.scale(loss).backward();
    if (profile) profile->backward += lap(mark);

    auto detached = losses.detach().to(torch::kFloat32);
    loss_sum += detached.sum();
    auto quartile = (draw.t.to(torch::kFloat64) / quartile_width).floor().clamp(0, 3).to(torch::kInt64);
    quartile_sum.index_add_(0, quartile, detached);
    quartile_count.index_add_(0, quartile, torch::ones_like(detached));
    if (sampler.needs_losses()) {
      sampler.update(comm->all_gather(draw.t).reshape(-1), comm->all_gather(detached).reshape(-1));
    }
    images_since_log += b * ctx.world_size();
    if (profile) profile->images += b;
  }
  if (profile) lap(mark);  // loss bookkeeping: counted in total only
  reducer->finish();
  exposed_comm += reducer->last_stats().exposed_comm_seconds;
  if (profile) {
    lap(mark);
    profile->exposed_comm = reducer->last_stats().exposed_comm_seconds;
  }

  std::vector<torch::Tensor> grads;
  for (auto& p : params) grads.push_back(p.grad());
  bool skip = scaler.unscale_(grads, [&](torch::Tensor& flag) { comm->all_reduce(flag, dist::ReduceOp::kMax); });
  if (!skip) {
    // Gradients are already the world average, so every rank clips by the same norm.
    last_grad_norm.copy_(clip_grad_norm(grads, t.max_grad_norm).reshape({1}));
    adamw_step(lr.at(step));
  }
  scaler.update(skip);
  torch::_foreach_zero_(grads);
  if (profile) profile->optimizer = lap(mark);
  ema->update();
  if (profile) {
    profile->ema = lap(mark);
    profile->total = lap(step_start);
  }
  ++step;
}

void Trainer::State::log_step(double elapsed) {
  // The one host sync of a logging step: every rank's sums at once.
  auto packed = torch::cat({loss_sum, quartile_sum, quartile_count, last_grad_norm});
  comm->all_reduce(packed, dist::ReduceOp::kSum);
  auto host = packed.cpu();
  auto* v = host.data_ptr<float>();
  double count = v[5] + v[6] + v[7] + v[8];
  double loss = count > 0 ? v[0] / count : NAN;
  double interval = seconds_since(log_clock);
  double images_per_second = interval > 0 ? images_since_log / interval : 0;
  std::vector<std::pair<std::string, double>> row{
      {"step", static_cast<double>(step)},
      {"loss", loss},
      {"loss_q0", v[5] > 0 ? v[1] / v[5] : NAN},
      {"loss_q1", v[6] > 0 ? v[2] / v[6] : NAN},
      {"loss_q2", v[7] > 0 ? v[3] / v[7] : NAN},
      {"loss_q3", v[8] > 0 ? v[4] / v[8] : NAN},
      {"lr", lr.at(step - 1)},
      {"grad_norm", v[9] / ctx.world_size()},
      {"loss_scale", scaler.enabled() ? scaler.scale_value() : 1.0},
      {"images_per_sec", images_per_second},
      {"data_wait_s", data_wait},
      {"allreduce_exposed_s", exposed_comm},
      {"elapsed_s", elapsed},
      {"samples_seen", static_cast<double>(loader->state().samples_seen)},
  };
  if (ctx.is_root()) {
    metrics.write(row);
    log::info("step {}/{}  loss {:.5f}  lr {:.3g}  grad_norm {:.3f}  {:.1f} img/s  data wait {:.2f}s  "
              "exposed all-reduce {:.2f}s",
              step, config.train.steps, loss, lr.at(step - 1), v[9] / ctx.world_size(), images_per_second, data_wait,
              exposed_comm);
  }
  last_logged_loss = loss;
  loss_sum.zero_();
  quartile_sum.zero_();
  quartile_count.zero_();
  data_wait = exposed_comm = 0;
  images_since_log = 0;
  log_clock = Clock::now();
}

void Trainer::State::print_progress(double elapsed) {
  if (!ctx.is_root() || !isatty(STDERR_FILENO)) return;
  double rate = step > 0 ? elapsed / static_cast<double>(step) : NAN;
  double eta = rate * static_cast<double>(config.train.steps - step);
  std::cerr << fmt::format("\r  step {}/{}  loss {:.4f}  ETA {}   ", step, config.train.steps, last_logged_loss,
                           format_duration(eta))
            << std::flush;
}

void Trainer::State::sample_grid() {
  // Every rank samples its share of the grid from the same fixed noise (the grids of successive
  // steps are comparable), then rank 0 gathers and saves them.
  int64_t n = config.log.num_samples;
  int64_t per_rank = (n + ctx.world_size() - 1) / ctx.world_size();
  int64_t c = config.model.channels, s = config.data.image_size;
  auto noise_generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(config.log.sample_seed));
  auto all_noise = torch::randn({per_rank * ctx.world_size(), c, s, s}, noise_generator);
  auto mine = all_noise.narrow(0, per_rank * ctx.rank(), per_rank).to(device);
  {
    torch::NoGradGuard no_grad;
    auto targets = ema_diffusion->model->parameters();
    ema->copy_to(targets, 0);
  }
  auto sampling_generator =
      make_generator(device, mix_seed(static_cast<uint64_t>(config.log.sample_seed), 1 + ctx.rank()));
  model::SampleOptions sample_options{.sampler = "ddim", .steps = config.log.sample_steps, .eta = 0.0};
  torch::Tensor images;
  {
    torch::NoGradGuard no_grad;
    images = ema_diffusion->sample_from(mine, sample_options, sampling_generator).contiguous();
  }
  auto gathered = comm->all_gather(images).reshape({-1, c, s, s}).narrow(0, 0, n).cpu();
  if (ctx.is_root()) {
    // A resumed run redraws the grids of the steps it repeats: its own files, replaced.
    data::save_image_grid(run.sample_grid(step), gathered, static_cast<int64_t>(std::ceil(std::sqrt(n))),
                          /*padding=*/2, /*overwrite=*/true);
    log::info("sample grid: {}", run.sample_grid(step).string());
  }
}

CheckpointContents Trainer::State::checkpoint_contents() const {
  CheckpointContents contents;
  contents.step = step;
  contents.replicated = prefixed("model.", names, params);
  auto add = [&](std::vector<std::pair<std::string, torch::Tensor>> more) {
    for (auto& item : more) contents.replicated.push_back(std::move(item));
  };
  add(prefixed("optim.exp_avg.", names, exp_avg));
  add(prefixed("optim.exp_avg_sq.", names, exp_avg_sq));
  contents.replicated.emplace_back("optim.step", adam_steps.front());
  add(ema->state(names));
  add(scaler.state());
  add(sampler.state());
  auto state = loader->state();
  contents.per_rank.emplace_back("rng", generator.get_state());
  contents.per_rank.emplace_back(
      "loader", torch::tensor({state.epoch, state.position, static_cast<int64_t>(state.seed), state.samples_seen},
                              torch::kInt64));
  contents.config_yaml = config.to_yaml();
  contents.metadata["elapsed_seconds"] = fmt::format("{:.3f}", elapsed_before);
  contents.metadata["samples_seen"] = std::to_string(state.samples_seen);
  contents.metadata["unet_options"] = unet_options(config.model).to_json();
  contents.metadata["diffusion_options"] = diffusion_options(config).to_json();
  contents.metadata["diffuse_version"] = std::string(DIFFUSE_VERSION) + "+" + git_hash();
  return contents;
}

void Trainer::State::restore(const LoadedCheckpoint& checkpoint) {
  for (const auto& warning : checkpoint.warnings) log::warn("{}", warning);
  auto saved = Config::from_yaml(checkpoint.config_yaml, config.name);
  if (unet_options(saved.model).to_json() != unet_options(config.model).to_json() ||
      diffusion_options(saved).to_json() != diffusion_options(config).to_json()) {
    throw std::runtime_error("cannot resume from " + checkpoint.directory.string() +
                             ": its model/diffusion configuration differs from this run's. Resume with the "
                             "checkpoint's config (saved in its manifest) or start a new run directory.");
  }
  std::map<std::string, torch::Tensor> by_name(checkpoint.replicated.begin(), checkpoint.replicated.end());
  auto take = [&](const std::string& key, torch::Tensor& target) {
    auto it = by_name.find(key);
    if (it == by_name.end()) throw std::runtime_error(checkpoint.directory.string() + " has no tensor '" + key + "'");
    if (it->second.sizes() != target.sizes()) {
      throw std::runtime_error(checkpoint.directory.string() + ": tensor '" + key + "' has shape " +
                               c10::str(it->second.sizes()) + ", expected " + c10::str(target.sizes()));
    }
    torch::NoGradGuard no_grad;
    target.copy_(it->second);
  };
  for (size_t i = 0; i < names.size(); ++i) {
    take("model." + names[i], params[i]);
    take("optim.exp_avg." + names[i], exp_avg[i]);
    take("optim.exp_avg_sq." + names[i], exp_avg_sq[i]);
  }
  for (auto& s : adam_steps) take("optim.step", s);
  ema->load_state(checkpoint.replicated, names);
  scaler.load_state(checkpoint.replicated);
  sampler.load_state(checkpoint.replicated);
  step = checkpoint.step;
  elapsed_before = std::stod(checkpoint.metadata.at("elapsed_seconds"));

  std::map<std::string, torch::Tensor> mine(checkpoint.per_rank.begin(), checkpoint.per_rank.end());
  auto loader_state = mine.at("loader");
  data::LoaderState state{.epoch = loader_state[0].item<int64_t>(), .position = loader_state[1].item<int64_t>(),
                          .seed = static_cast<uint64_t>(loader_state[2].item<int64_t>()),
                          .samples_seen = loader_state[3].item<int64_t>()};
  loader->restore(state);
  if (checkpoint.per_rank_inherited) {
    // A rank that did not exist in the saved world gets a fresh stream, still a pure function of
    // (seed, rank, step), so a resharded resume is reproducible too.
    generator = make_generator(device, mix_seed(mix_seed(config.train.seed, ctx.rank() + 1), step));
  } else {
    generator.set_state(mine.at("rng"));
  }
  // Only rank 0 writes metrics: every rank rewriting the same file through the same temporary
  // name races (one rank's rename finds the temporary already moved by another).
  if (ctx.is_root()) metrics.truncate_after(step);
}

void Trainer::State::save_checkpoint() {
  auto start = Clock::now();
  try {
    auto saved = checkpoints->save(checkpoint_contents());
    if (ctx.is_root()) {
      log::info("checkpoint {} ({:.1f} MB in {:.1f}s)", saved.directory.string(), saved.bytes / 1e6,
                seconds_since(start));
      for (const auto& warning : saved.warnings) log::warn("{}", warning);
    }
  } catch (const std::exception& error) {
    if (config.checkpoint.stop_on_error) throw;
    log::error("checkpoint at step {} failed, training continues (checkpoint.stop_on_error=false): {}", step,
               error.what());
  }
}

Trainer::Trainer(const dist::Context& ctx, Config config, RunOptions options) {
  // The model's initial weights come from the global generator; seed it so a run is a pure
  // function of its config (rank 0's weights are then broadcast to everyone).
  torch::manual_seed(mix_seed(static_cast<uint64_t>(config.train.seed), 0));
  state_ = std::make_unique<State>(ctx, std::move(config), std::move(options));
}

Trainer::~Trainer() = default;

std::vector<StepProfile> Trainer::profile_steps(int64_t steps) {
  auto& s = *state_;
  s.config.validate();
  s.setup();
  std::vector<StepProfile> profiles(static_cast<size_t>(std::max<int64_t>(steps, 0)));
  for (auto& profile : profiles) {
    s.profile = &profile;
    s.train_step();
  }
  s.profile = nullptr;
  return profiles;
}

int Trainer::run() {
  auto& s = *state_;
  const auto& ctx = s.ctx;
  s.config.validate();
  s.setup();
  int64_t parameters = 0;
  for (const auto& p : s.params) parameters += p.numel();
  double state_bytes = parameters * 4.0 * (1 /*weights*/ + 1 /*grads*/ + 2 /*AdamW*/ + s.config.ema.decay.size() + 1);

  if (ctx.is_root()) {
    log::info("run directory: {}", s.run.root.string());
    log::info("resolved configuration:\n{}", s.config.to_yaml());
    log::info("U-Net parameters: {} ({:.2f} M); weights+grads+AdamW+EMA: {}", parameters, parameters / 1e6,
              human_bytes(state_bytes));
    log::info("global batch = {} per rank x {} accumulation steps x {} ranks = {}", s.config.train.batch_size,
              s.config.train.accumulate, ctx.world_size(), s.global_batch());
    log::info("device: {}, precision {}, data: {} ({} images, {} batches per epoch per rank)", s.device.str(),
              s.config.train.precision, s.config.data.path, s.loader->info().count, s.loader->batches_per_epoch());
  }
  if (s.options.dry_run) {
    if (ctx.is_root()) std::cout << "dry run: configuration and data are valid\n";
    return 0;
  }

  if (ctx.is_root()) s.run.create();
  ctx.barrier();
  log::add_rank_file(ctx.rank(), s.run.logs());
  if (s.options.resume.empty()) {
    if (!s.checkpoints->list().empty()) {
      throw std::runtime_error("run directory " + s.run.root.string() +
                               " already has checkpoints: pass --resume latest to continue it, or choose another "
                               "--run-dir");
    }
    if (ctx.is_root()) std::filesystem::remove(s.run.metrics());
  } else {
    auto loaded = s.checkpoints->load(s.options.resume);
    if (loaded) {
      s.restore(*loaded);
      if (ctx.is_root()) log::info("resumed from {} at step {}", loaded->directory.string(), s.step);
    } else if (ctx.is_root()) {
      log::warn("--resume {}: no checkpoint in {}, starting from step 0", s.options.resume, s.run.checkpoints().string());
    }
  }
  if (ctx.is_root()) {
    std::ofstream(s.run.config()) << s.config.to_yaml();
    std::ofstream(s.run.env()) << collect_doctor_report(ctx, s.device.is_cuda() ? DeviceRequest::kCuda
                                                                                 : DeviceRequest::kCpu)
                                      .to_text()
                               << "  world size: " << ctx.world_size() << "\n";
    if (s.step == 0) {
      auto count = std::min<int64_t>(s.config.log.num_samples, s.loader->info().count);
      data::save_image_grid(s.run.samples() / "real.png", data::read_images(s.config.data.path, 0, count),
                            static_cast<int64_t>(std::ceil(std::sqrt(count))), /*padding=*/2, /*overwrite=*/true);
    }
  }

  install_stop_signal_handlers();
  auto start = Clock::now();
  s.log_clock = start;
  auto elapsed = [&] { return s.elapsed_before + seconds_since(start); };
  while (s.step < s.config.train.steps) {
    s.train_step();
    bool last = s.step == s.config.train.steps;
    if (s.step % s.config.log.every == 0 || last) s.log_step(elapsed());
    s.print_progress(elapsed());
    if (s.config.log.sample_every > 0 && (s.step % s.config.log.sample_every == 0 || last)) s.sample_grid();
    // Every rank must agree before anyone checkpoints: a signal may reach only some ranks.
    bool stop = ctx.max_over_ranks(stop_signal().load()) > 0;
    if (s.step % s.config.checkpoint.every == 0 || last || stop) {
      s.elapsed_before = elapsed();  // the checkpoint carries the total training time so far
      start = Clock::now();
      s.save_checkpoint();
    }
    if (stop) {
      if (ctx.is_root()) log::info("stop signal received: checkpointed step {} and exiting", s.step);
      return 0;
    }
  }
  if (ctx.is_root()) {
    if (isatty(STDERR_FILENO)) std::cerr << "\n";
    log::info("done: {} steps in {}; checkpoints in {}", s.step, format_duration(elapsed()),
              s.run.checkpoints().string());
  }
  return 0;
}

}  // namespace diffuse::trainer
