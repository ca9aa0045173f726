// The loader: an I/O thread that owns every HDF5 read, worker threads that convert, and a
// reorder buffer that hands batches to next() in sequence. See loader.h for the semantics.
#include "data/loader.h"

#include <array>
#include <cstdlib>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <thread>

#include "data/impl/hdf5.h"
#include "data/impl/pixels.h"

namespace diffuse::data {
namespace {

constexpr uint64_t kPermutationStream = 0x7065726d75746174ULL;  // "permutat"
constexpr uint64_t kFlipStream = 0x666c6970666c6970ULL;         // "flipflip"

// One batch as read from the file, waiting for a worker.
struct RawBatch {
  int64_t sequence = 0;
  torch::Tensor pixels;              // [B, H * W * C] uint8, rows in ascending index order
  std::vector<int64_t> source_row;   // batch slot m -> row of `pixels`
  std::vector<uint8_t> flip;         // batch slot m is mirrored
  torch::Tensor indices, labels;     // [B] int64 in batch order
  LoaderState after;                 // the stream position once this batch is consumed
};

// A converted batch, or the error that replaced it.
struct ReadyBatch {
  Batch batch;
  LoaderState after;
  std::exception_ptr error;
};

// Batch buffers of one size, recycled through the tensors' deleters once they are dropped.
// A fresh allocation per batch costs as much as the conversion itself: glibc maps a block of
// this size anew each time (its mmap threshold never rises past a repeated request) and the
// first touch faults in every page. Pinned buffers for CUDA need no pool: LibTorch caches them.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  BufferPool(size_t bytes, size_t keep) : bytes_(bytes), keep_(keep) {}
  ~BufferPool() {
    for (void* buffer : free_) std::free(buffer);
  }

  torch::Tensor take(at::IntArrayRef sizes, torch::ScalarType dtype) {
    void* buffer = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (!free_.empty()) {
        buffer = free_.back();
        free_.pop_back();
      }
    }
    if (buffer == nullptr) buffer = std::aligned_alloc(64, (bytes_ + 63) / 64 * 64);
    if (buffer == nullptr) throw std::bad_alloc();
    std::weak_ptr<BufferPool> pool = weak_from_this();
    return torch::from_blob(
        buffer, sizes,
        [pool](void* data) {
          if (auto alive = pool.lock()) {
            alive->give(data);
          } else {
            std::free(data);
          }
        },
        dtype);
  }

 private:
  void give(void* buffer) {
    std::lock_guard lock(mutex_);
    if (free_.size() < keep_) {
      free_.push_back(buffer);
    } else {
      std::free(buffer);
    }
  }

  std::mutex mutex_;
  std::vector<void*> free_;
  size_t bytes_, keep_;
};

}  // namespace

std::vector<int64_t> epoch_permutation(int64_t count, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), int64_t{0});
  impl::SplitMix rng(impl::hash_words(seed, kPermutationStream, static_cast<uint64_t>(epoch)));
  for (int64_t i = count - 1; i > 0; --i) {
    std::swap(order[i], order[rng.below(static_cast<uint64_t>(i) + 1)]);
  }
  return order;
}

bool flip_sample(uint64_t seed, int64_t epoch, int64_t position) {
  return (impl::hash_words(impl::hash_words(seed, kFlipStream), static_cast<uint64_t>(epoch),
                           static_cast<uint64_t>(position)) >>
          63) != 0;
}

struct Loader::Impl {
  LoaderOptions options;
  DatasetInfo info;
  std::unique_ptr<impl::ImageRows> rows;
  std::vector<int64_t> labels;  // all labels, read once at open; empty when none
  int64_t global_batch = 0;
  int64_t per_epoch = 0;
  std::array<float, 256> to_float{};
  std::shared_ptr<BufferPool> image_buffers;  // float batches for the CPU
  std::shared_ptr<BufferPool> raw_buffers;    // uint8 batches as read

  // Owned by the I/O thread while it runs; set by restore() while it is stopped.
  LoaderState cursor;
  std::vector<int64_t> permutation;
  int64_t permutation_epoch = -1;
  uint64_t permutation_seed = 0;

  mutable std::mutex mutex;
  std::condition_variable io_wake, work_wake, ready_wake;
  bool stopping = false;
  int64_t next_read = 0, next_deliver = 0;  // sequence numbers since the last (re)start
  std::deque<RawBatch> work;
  std::map<int64_t, ReadyBatch> ready;
  std::exception_ptr failure;
  LoaderState delivered;
  LoaderStats stats;  // guarded by `mutex`
  std::thread io;
  std::vector<std::thread> workers;

  // The last incomplete global batch of an epoch is dropped: move to the next epoch when the
  // rest of this one cannot fill a global batch.
  LoaderState normalised(LoaderState state) const {
    if (state.position + global_batch > info.count) {
      ++state.epoch;
      state.position = 0;
    }
    return state;
  }

  RawBatch read_batch(int64_t sequence) {
    const int64_t batch = options.batch_size, world = options.world_size, rank = options.rank;
    if (options.before_batch_hook) options.before_batch_hook(cursor.samples_seen / global_batch);
    if (permutation_epoch != cursor.epoch || permutation_seed != cursor.seed) {
      permutation = epoch_permutation(info.count, cursor.seed, cursor.epoch);
      permutation_epoch = cursor.epoch;
      permutation_seed = cursor.seed;
    }
    RawBatch raw;
    raw.sequence = sequence;
    raw.indices = torch::empty({batch}, torch::kInt64);
    raw.flip.resize(batch);
    raw.source_row.resize(batch);
    auto* indices = raw.indices.data_ptr<int64_t>();
    std::vector<std::pair<int64_t, int64_t>> by_index(batch);  // (dataset index, batch slot)
    for (int64_t m = 0; m < batch; ++m) {
      const int64_t q = cursor.position + rank + world * m;
      indices[m] = permutation[q];
      by_index[m] = {indices[m], m};
      raw.flip[m] = options.random_flip && flip_sample(cursor.seed, cursor.epoch, q);
    }
    // Ascending order lets neighbouring indices share one hyperslab and one pass over the file.
    std::sort(by_index.begin(), by_index.end());
    std::vector<int64_t> sorted(batch);
    for (int64_t j = 0; j < batch; ++j) {
      sorted[j] = by_index[j].first;
      raw.source_row[by_index[j].second] = j;
    }
    raw.pixels = raw_buffers->take({batch, rows->row_bytes()}, torch::kUInt8);
    rows->read(impl::coalesce_runs(sorted), raw.pixels.data_ptr<uint8_t>());
    if (!labels.empty()) {
      auto options_labels = torch::TensorOptions(torch::kInt64).pinned_memory(options.device.is_cuda());
      raw.labels = torch::empty({batch}, options_labels);
      auto* out = raw.labels.data_ptr<int64_t>();
      for (int64_t m = 0; m < batch; ++m) out[m] = labels[indices[m]];
    }
    cursor.position += global_batch;
    cursor.samples_seen += global_batch;
    cursor = normalised(cursor);
    raw.after = cursor;
    return raw;
  }

  Batch convert(const RawBatch& raw) const {
    const int64_t batch = options.batch_size, c = info.channels, h = info.height, w = info.width;
    auto images = options.device.is_cuda()
                      ? torch::empty({batch, c, h, w}, torch::TensorOptions(torch::kFloat).pinned_memory(true))
                      : image_buffers->take({batch, c, h, w}, torch::kFloat);
    float* out = images.data_ptr<float>();
    const uint8_t* base = raw.pixels.data_ptr<uint8_t>();
    const int64_t image_bytes = h * w * c;
    for (int64_t m = 0; m < batch; ++m) {
      const uint8_t* src = base + raw.source_row[m] * image_bytes;
      float* dst = out + m * image_bytes;
      for (int64_t k = 0; k < c; ++k) {
        for (int64_t y = 0; y < h; ++y) {
          const uint8_t* s = src + y * w * c + k;
          float* d = dst + (k * h + y) * w;
          if (raw.flip[m]) {
            for (int64_t x = 0; x < w; ++x) d[x] = to_float[s[(w - 1 - x) * c]];
          } else {
            for (int64_t x = 0; x < w; ++x) d[x] = to_float[s[x * c]];
          }
        }
      }
    }
    return {images, raw.labels, raw.indices};
  }

  ReadyBatch convert_or_error(const RawBatch& raw) {
    const auto start = std::chrono::steady_clock::now();
    try {
      ReadyBatch ready{convert(raw), raw.after, nullptr};
      add_seconds(stats.convert_seconds, start);
      return ready;
    } catch (...) {
      return {{}, {}, std::current_exception()};
    }
  }

  void add_seconds(double& total, std::chrono::steady_clock::time_point since) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
    std::lock_guard lock(mutex);
    total += seconds;
  }

  void io_loop() {
    for (;;) {
      int64_t sequence = 0;
      {
        std::unique_lock lock(mutex);
        io_wake.wait(lock, [&] { return stopping || next_read - next_deliver < options.prefetch_batches; });
        if (stopping) return;
        sequence = next_read;
      }
      RawBatch raw;
      const auto read_start = std::chrono::steady_clock::now();
      try {
        raw = read_batch(sequence);
        add_seconds(stats.read_seconds, read_start);
      } catch (...) {
        std::lock_guard lock(mutex);
        ready[sequence] = {{}, {}, std::current_exception()};
        ++next_read;
        ready_wake.notify_all();
        return;  // the stream cannot continue past a batch it could not read
      }
      if (options.worker_threads == 0) {
        ReadyBatch converted = convert_or_error(raw);
        std::lock_guard lock(mutex);
        ready[sequence] = std::move(converted);
        ++next_read;
        ready_wake.notify_all();
      } else {
        std::lock_guard lock(mutex);
        work.push_back(std::move(raw));
        ++next_read;
        work_wake.notify_one();
      }
    }
  }

  void worker_loop() {
    for (;;) {
      RawBatch raw;
      {
        std::unique_lock lock(mutex);
        work_wake.wait(lock, [&] { return stopping || !work.empty(); });
        if (stopping) return;
        raw = std::move(work.front());
        work.pop_front();
      }
      ReadyBatch converted = convert_or_error(raw);
      std::lock_guard lock(mutex);
      ready[raw.sequence] = std::move(converted);
      ready_wake.notify_all();
    }
  }

  bool running = false;

  void start() {
    running = true;
    next_read = next_deliver = 0;
    failure = nullptr;
    stopping = false;
    io = std::thread([this] { io_loop(); });
    for (int i = 0; i < options.worker_threads; ++i) workers.emplace_back([this] { worker_loop(); });
  }

  void stop() {
    {
      std::lock_guard lock(mutex);
      stopping = true;
    }
    io_wake.notify_all();
    work_wake.notify_all();
    ready_wake.notify_all();
    if (io.joinable()) io.join();
    for (auto& worker : workers) worker.join();
    workers.clear();
    std::lock_guard lock(mutex);
    work.clear();
    ready.clear();
    running = false;
  }
};

Loader::Loader(LoaderOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  const std::string where = "loader for '" + options.path.string() + "'";
  if (options.batch_size < 1) {
    throw std::invalid_argument(where + ": batch_size must be >= 1, got " + std::to_string(options.batch_size));
  }
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    throw std::invalid_argument(where + ": rank " + std::to_string(options.rank) + " is not in a world of " +
                                std::to_string(options.world_size));
  }
  if (options.worker_threads < 0 || options.prefetch_batches < 1) {
    throw std::invalid_argument(where + ": worker_threads must be >= 0 and prefetch_batches >= 1, got " +
                                std::to_string(options.worker_threads) + " and " +
                                std::to_string(options.prefetch_batches));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    throw std::invalid_argument(where + ": device must be CPU or CUDA, got " + options.device.str());
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    throw std::runtime_error(where + ": device " + options.device.str() + " requested but CUDA is not available");
  }
  d.info = read_dataset_info(options.path);
  const DatasetInfo& info = d.info;
  const std::string file = "dataset '" + options.path.string() + "'";
  if (options.expected_size && (info.height != *options.expected_size || info.width != *options.expected_size)) {
    const auto s = std::to_string(*options.expected_size);
    throw std::runtime_error(file + " holds " + std::to_string(info.height) + "x" + std::to_string(info.width) +
                             " images but the model expects " + s + "x" + s + " (prepare it with `diffuse prep --size " +
                             s + "`)");
  }
  if (options.expected_channels && info.channels != *options.expected_channels) {
    throw std::runtime_error(file + " holds images with " + std::to_string(info.channels) +
                             " channel(s) but the model expects " + std::to_string(*options.expected_channels) +
                             " (prepare it with `diffuse prep --channels " +
                             std::to_string(*options.expected_channels) + "`)");
  }
  d.global_batch = options.batch_size * options.world_size;
  if (info.count < d.global_batch) {
    throw std::runtime_error(file + " has " + std::to_string(info.count) +
                             " images, fewer than one global batch (batch_size " + std::to_string(options.batch_size) +
                             " x world_size " + std::to_string(options.world_size) + " = " +
                             std::to_string(d.global_batch) + ")");
  }
  d.per_epoch = info.count / d.global_batch;
  // Uncompressed: read exactly the requested bytes. Compressed: keep decoded chunks, since
  // neighbouring indices in a batch may share one.
  d.rows = std::make_unique<impl::ImageRows>(options.path, /*chunk_cache=*/info.compression != "none");
  if (options.num_classes && !info.has_labels) {
    throw std::runtime_error(file + " has no labels, but the model is class-conditional (" +
                             std::to_string(*options.num_classes) +
                             " classes): prepare a labelled dataset (e.g. `diffuse prep --labels-from-folders`, "
                             "an MNIST idx labels file, `--synthetic shapes`) or train unconditionally "
                             "(model.num_classes=0)");
  }
  if (info.has_labels) {
    auto all = read_labels(options.path);
    d.labels.assign(all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel());
  }
  if (options.num_classes) {
    for (size_t i = 0; i < d.labels.size(); ++i) {
      if (d.labels[i] < 0 || d.labels[i] >= *options.num_classes) {
        throw std::runtime_error(file + ": image " + std::to_string(i) + " has label " +
                                 std::to_string(d.labels[i]) + ", outside [0, " +
                                 std::to_string(*options.num_classes) + ") of model.num_classes=" +
                                 std::to_string(*options.num_classes) +
                                 " (raise model.num_classes to the dataset's class count, or fix the labels)");
      }
    }
  }
  for (int v = 0; v < 256; ++v) d.to_float[v] = static_cast<float>(v) / 127.5f - 1.0f;
  // Enough for the batches in flight plus a couple the caller still holds.
  const auto image_bytes = static_cast<size_t>(options.batch_size * info.height * info.width * info.channels);
  const auto keep = static_cast<size_t>(options.prefetch_batches + options.worker_threads + 2);
  d.image_buffers = std::make_shared<BufferPool>(image_bytes * sizeof(float), keep);
  d.raw_buffers = std::make_shared<BufferPool>(image_bytes, keep);
  d.cursor = {0, 0, options.seed, 0};
  d.delivered = d.cursor;
  d.options = std::move(options);
  // The threads start with the first next(): a loader that is restored right away reads
  // nothing it would throw away.
}

Loader::~Loader() {
  impl_->stop();
  impl_->rows.reset();
}

Batch Loader::next() {
  Impl& d = *impl_;
  ReadyBatch ready;
  if (!d.running) d.start();
  {
    std::unique_lock lock(d.mutex);
    if (d.failure) std::rethrow_exception(d.failure);
    const auto start = std::chrono::steady_clock::now();
    d.ready_wake.wait(lock, [&] { return d.ready.count(d.next_deliver) > 0; });
    d.stats.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto found = d.ready.find(d.next_deliver);
    ready = std::move(found->second);
    d.ready.erase(found);
    ++d.next_deliver;
    d.io_wake.notify_one();
    if (ready.error) {
      d.failure = ready.error;
      std::rethrow_exception(ready.error);
    }
    d.delivered = ready.after;
    ++d.stats.batches;
  }
  Batch batch = std::move(ready.batch);
  if (d.options.device.is_cuda()) {
    // From pinned memory: asynchronous on the caller's current stream.
    batch.images = batch.images.to(d.options.device, /*non_blocking=*/true);
    if (batch.labels.defined()) batch.labels = batch.labels.to(d.options.device, /*non_blocking=*/true);
  }
  return batch;
}

LoaderState Loader::state() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->delivered;
}

void Loader::restore(const LoaderState& state) {
  Impl& d = *impl_;
  if (state.epoch < 0 || state.position < 0 || state.position > d.info.count || state.samples_seen < 0) {
    throw std::invalid_argument(
        "loader state {epoch " + std::to_string(state.epoch) + ", position " + std::to_string(state.position) +
        ", samples_seen " + std::to_string(state.samples_seen) + "} does not fit dataset '" +
        d.options.path.string() + "' of " + std::to_string(d.info.count) +
        " images (was the checkpoint made with another dataset?)");
  }
  d.stop();
  d.cursor = d.normalised(state);
  {
    std::lock_guard lock(d.mutex);
    d.delivered = d.cursor;
  }
}

int64_t Loader::batches_per_epoch() const { return impl_->per_epoch; }

const DatasetInfo& Loader::info() const { return impl_->info; }

const LoaderOptions& Loader::options() const { return impl_->options; }

double Loader::wait_seconds_total() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats.wait_seconds;
}

LoaderStats Loader::stats() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats;
}

}  // namespace diffuse::data
