// The loader: exact sharding for every world size, determinism, exact resume (also under a
// new world size), pixel conversion and flips, open-time and read-time errors, and HDF5 safety
// when loaders and tensor-file writes share the process.
#include <gtest/gtest.h>

#include <atomic>
#include <fstream>
#include <mutex>
#include <numeric>
#include <thread>

#include "data/hdf5_tensors.h"
#include "data/impl/hdf5.h"
#include "data/loader.h"
#include "fixtures.h"
#include "support.h"

namespace diffuse::testing {
namespace {

using namespace diffuse::data;
namespace fs = std::filesystem;

LoaderOptions options_for(const fs::path& path, int64_t batch, int rank, int world, uint64_t seed) {
  LoaderOptions options;
  options.path = path;
  options.batch_size = batch;
  options.rank = rank;
  options.world_size = world;
  options.seed = seed;
  options.worker_threads = 1;
  options.prefetch_batches = 2;
  return options;
}

std::vector<int64_t> as_vector(const torch::Tensor& t) {
  auto c = t.cpu().contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

std::string open_error(const LoaderOptions& options) {
  return error_of([&] { Loader loader(options); });
}

// Checks a batch's images against the fixture: sample m is image indices[m], flipped exactly
// when flip_sample says so for its position q = position + rank + world * m.
void expect_batch_images(const Batch& batch, const LoaderState& before, int rank, int world, int64_t h, int64_t w,
                         int64_t c, bool random_flip, int* flipped = nullptr) {
  auto indices = as_vector(batch.indices);
  for (size_t m = 0; m < indices.size(); ++m) {
    const int64_t q = before.position + rank + world * static_cast<int64_t>(m);
    const bool flip = random_flip && flip_sample(before.seed, before.epoch, q);
    if (flipped) *flipped += flip;
    auto expected = expected_sample(indices[m], h, w, c, flip);
    ASSERT_TRUE(torch::equal(batch.images[m], expected)) << "sample " << m << " (index " << indices[m] << ")";
  }
}

TEST(Permutation, IsDeterministicAndDependsOnSeedAndEpoch) {
  auto a = epoch_permutation(1000, 7, 0);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_EQ(a, epoch_permutation(1000, 7, 0));
  EXPECT_NE(a, epoch_permutation(1000, 7, 1));
  EXPECT_NE(a, epoch_permutation(1000, 8, 0));
  EXPECT_NE(a, identity);
  // Flips: a pure function, about half of the samples.
  int flips = 0;
  for (int q = 0; q < 1000; ++q) {
    EXPECT_EQ(flip_sample(3, 2, q), flip_sample(3, 2, q));
    flips += flip_sample(3, 2, q);
  }
  EXPECT_GT(flips, 400);
  EXPECT_LT(flips, 600);
}

TEST(Runs, NeighbouringIndicesCoalesce) {
  auto runs = impl::coalesce_runs({0, 1, 2, 5, 7, 8, 20});
  ASSERT_EQ(runs.size(), 4u);
  EXPECT_EQ(runs[0].first, 0);
  EXPECT_EQ(runs[0].count, 3);
  EXPECT_EQ(runs[1].first, 5);
  EXPECT_EQ(runs[1].count, 1);
  EXPECT_EQ(runs[2].first, 7);
  EXPECT_EQ(runs[2].count, 2);
  EXPECT_EQ(runs[3].first, 20);
  EXPECT_EQ(runs[3].count, 1);
  EXPECT_TRUE(impl::coalesce_runs({}).empty());
}

TEST(Loader, ShardsAreDisjointAndCompleteForWorldSizes1To8) {
  TempDir dir;
  // 2520 = 3 * lcm(1..8): every world size divides the epoch into whole global batches.
  const int64_t n = 2520, batch = 3;
  auto path = write_fixture(dir / "f.h5", n, 2, 4, 1);
  const uint64_t seed = 5;
  const auto epoch0 = epoch_permutation(n, seed, 0), epoch1 = epoch_permutation(n, seed, 1);
  for (int world = 1; world <= 8; ++world) {
    std::vector<std::unique_ptr<Loader>> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<Loader>(options_for(path, batch, r, world, seed)));
    const int64_t per_epoch = n / (batch * world);
    std::vector<int> seen(n, 0);
    for (int r = 0; r < world; ++r) EXPECT_EQ(ranks[r]->batches_per_epoch(), per_epoch);
    for (int64_t k = 0; k < per_epoch; ++k) {
      for (int r = 0; r < world; ++r) {
        auto indices = as_vector(ranks[r]->next().indices);
        ASSERT_EQ(indices.size(), static_cast<size_t>(batch));
        for (int64_t m = 0; m < batch; ++m) {
          ASSERT_EQ(indices[m], epoch0[k * batch * world + r + world * m]) << "W " << world << " rank " << r;
          ++seen[indices[m]];
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "W " << world << ": index " << i;
    for (int r = 0; r < world; ++r) {
      auto state = ranks[r]->state();
      EXPECT_EQ(state.epoch, 1);
      EXPECT_EQ(state.position, 0);
      EXPECT_EQ(state.samples_seen, n);
      // The next epoch follows its own permutation.
      auto indices = as_vector(ranks[r]->next().indices);
      for (int64_t m = 0; m < batch; ++m) EXPECT_EQ(indices[m], epoch1[r + world * m]);
    }
  }
}

TEST(Loader, DropsTheIncompleteLastGlobalBatch) {
  TempDir dir;
  const int64_t n = 50, batch = 4;
  const int world = 3;  // global batch 12: 4 per epoch, 2 samples dropped
  auto path = write_fixture(dir / "f.h5", n, 2, 4, 1);
  std::vector<std::unique_ptr<Loader>> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<Loader>(options_for(path, batch, r, world, 1)));
  EXPECT_EQ(ranks[0]->batches_per_epoch(), 4);
  auto perm = epoch_permutation(n, 1, 0);
  std::set<int64_t> used;
  for (int k = 0; k < 4; ++k) {
    for (auto& loader : ranks) {
      for (int64_t index : as_vector(loader->next().indices)) used.insert(index);
    }
  }
  EXPECT_EQ(used.size(), 48u);
  EXPECT_EQ(used.count(perm[48]), 0u);
  EXPECT_EQ(used.count(perm[49]), 0u);
  auto next_epoch = epoch_permutation(n, 1, 1);
  EXPECT_EQ(as_vector(ranks[1]->next().indices)[0], next_epoch[1]);
}

TEST(Loader, ImagesAreTheIndexedSamplesScaledAndFlipped) {
  TempDir dir;
  const int64_t h = 3, w = 5, c = 3;
  auto path = write_fixture(dir / "f.h5", 30, h, w, c);
  auto options = options_for(path, 5, 0, 1, 3);
  Loader loader(options);
  int flipped = 0;
  for (int k = 0; k < 12; ++k) {  // two epochs
    auto before = loader.state();
    auto batch = loader.next();
    ASSERT_EQ(batch.images.sizes(), (std::vector<int64_t>{5, c, h, w}));
    ASSERT_EQ(batch.images.scalar_type(), torch::kFloat);
    expect_batch_images(batch, before, 0, 1, h, w, c, /*random_flip=*/true, &flipped);
    auto indices = as_vector(batch.indices);
    auto labels = as_vector(batch.labels);
    for (size_t m = 0; m < indices.size(); ++m) EXPECT_EQ(labels[m], fixture_label(indices[m]));
  }
  EXPECT_GT(flipped, 10);  // of 60 samples, about half flipped
  EXPECT_LT(flipped, 50);
  // Extremes map to -1 and 1.
  EXPECT_GE(loader.next().images.min().item<float>(), -1.0f);

  options.random_flip = false;
  Loader plain(options);
  for (int k = 0; k < 6; ++k) {
    auto before = plain.state();
    expect_batch_images(plain.next(), before, 0, 1, h, w, c, /*random_flip=*/false);
  }
}

TEST(Loader, DatasetWithoutLabelsGivesUndefinedLabels) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 8, 2, 2, 1, /*labels=*/false);
  Loader loader(options_for(path, 4, 0, 1, 0));
  auto batch = loader.next();
  EXPECT_FALSE(batch.labels.defined());
  EXPECT_FALSE(loader.info().has_labels);
}

TEST(Loader, SameSeedSameBatchesWhateverTheThreads) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 64, 4, 4, 3);
  auto a_options = options_for(path, 8, 0, 1, 11);
  a_options.worker_threads = 0;
  a_options.prefetch_batches = 1;
  auto b_options = options_for(path, 8, 0, 1, 11);
  b_options.worker_threads = 3;
  b_options.prefetch_batches = 6;
  Loader a(a_options), b(b_options);
  for (int k = 0; k < 20; ++k) {
    auto x = a.next(), y = b.next();
    ASSERT_TRUE(torch::equal(x.indices, y.indices)) << "batch " << k;
    ASSERT_TRUE(torch::equal(x.images, y.images)) << "batch " << k;
  }
  Loader other(options_for(path, 8, 0, 1, 12));
  Loader same(options_for(path, 8, 0, 1, 11));
  EXPECT_FALSE(torch::equal(other.next().indices, same.next().indices));
}

TEST(Loader, StateCountsOnlyDeliveredBatches) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 100, 2, 2, 1);
  auto options = options_for(path, 4, 1, 2, 9);
  options.prefetch_batches = 8;
  Loader loader(options);
  EXPECT_EQ(loader.state().position, 0);
  for (int k = 0; k < 3; ++k) loader.next();
  auto state = loader.state();
  EXPECT_EQ(state.epoch, 0);
  EXPECT_EQ(state.position, 3 * 4 * 2);
  EXPECT_EQ(state.samples_seen, 3 * 4 * 2);
  EXPECT_EQ(state.seed, 9u);
}

TEST(Loader, RestoreMidEpochGivesTheUninterruptedBatches) {
  TempDir dir;
  const int64_t h = 2, w = 3, c = 3;
  auto path = write_fixture(dir / "f.h5", 40, h, w, c);
  auto options = options_for(path, 4, 0, 1, 21);
  options.prefetch_batches = 4;
  std::vector<Batch> reference;
  {
    Loader loader(options);
    for (int k = 0; k < 25; ++k) reference.push_back(loader.next());  // 2.5 epochs of 10
  }
  for (int stop_at : {7, 10, 13}) {  // mid-epoch, at the boundary, in the second epoch
    LoaderState saved;
    Loader first(options);
    for (int k = 0; k < stop_at; ++k) first.next();
    saved = first.state();
    // A new process restoring the checkpoint...
    Loader resumed(options_for(path, 4, 0, 1, /*seed, overridden by the state=*/999));
    resumed.restore(saved);
    EXPECT_EQ(resumed.state().samples_seen, saved.samples_seen);
    // ...and the same loader, with prefetched batches in flight, rewinding.
    for (int k = 0; k < 3; ++k) first.next();
    first.restore(saved);
    for (int k = stop_at; k < 25; ++k) {
      auto x = resumed.next(), y = first.next();
      ASSERT_TRUE(torch::equal(x.indices, reference[k].indices)) << "stop " << stop_at << " batch " << k;
      ASSERT_TRUE(torch::equal(x.images, reference[k].images)) << "stop " << stop_at << " batch " << k;
      ASSERT_TRUE(torch::equal(y.indices, reference[k].indices)) << "stop " << stop_at << " batch " << k;
      ASSERT_TRUE(torch::equal(y.images, reference[k].images)) << "stop " << stop_at << " batch " << k;
    }
  }
}

// Saves after `steps` global steps with (batch, world), restores with (batch2, world2), and
// checks the new ranks continue the global sample stream exactly, images and flips included.
void check_world_size_change(int64_t batch, int world, int64_t batch2, int world2, int steps) {
  TempDir dir;
  const int64_t n = 120, h = 2, w = 4, c = 1;
  const uint64_t seed = 9;
  auto path = write_fixture(dir / "f.h5", n, h, w, c);
  LoaderState saved;
  {
    std::vector<std::unique_ptr<Loader>> ranks;
    for (int r = 0; r < world; ++r) ranks.push_back(std::make_unique<Loader>(options_for(path, batch, r, world, seed)));
    for (int k = 0; k < steps; ++k) {
      for (auto& loader : ranks) loader->next();
    }
    saved = ranks[0]->state();
    for (auto& loader : ranks) {
      auto s = loader->state();
      EXPECT_EQ(s.position, saved.position);  // the state is global: every rank holds the same
      EXPECT_EQ(s.epoch, saved.epoch);
      EXPECT_EQ(s.samples_seen, saved.samples_seen);
    }
  }
  std::vector<std::unique_ptr<Loader>> ranks;
  for (int r = 0; r < world2; ++r) {
    ranks.push_back(std::make_unique<Loader>(options_for(path, batch2, r, world2, /*seed=*/0)));
    ranks.back()->restore(saved);
  }
  LoaderState cursor = ranks[0]->state();
  const int64_t global = batch2 * world2;
  for (int k = 0; k < 30; ++k) {  // runs into the following epochs
    auto perm = epoch_permutation(n, seed, cursor.epoch);
    std::vector<int64_t> step;
    for (int r = 0; r < world2; ++r) {
      auto batch_r = ranks[r]->next();
      expect_batch_images(batch_r, cursor, r, world2, h, w, c, /*random_flip=*/true);
      for (int64_t index : as_vector(batch_r.indices)) step.push_back(index);
    }
    std::vector<int64_t> expected(perm.begin() + cursor.position, perm.begin() + cursor.position + global);
    std::sort(step.begin(), step.end());
    std::sort(expected.begin(), expected.end());
    ASSERT_EQ(step, expected) << "step " << k << " after restore";
    cursor.position += global;
    cursor.samples_seen += global;
    if (cursor.position + global > n) {
      ++cursor.epoch;
      cursor.position = 0;
    }
    EXPECT_EQ(ranks[0]->state().position, cursor.position);
    EXPECT_EQ(ranks[0]->state().samples_seen, cursor.samples_seen);
  }
}

TEST(Loader, RestoreWithAnotherWorldSizeContinuesTheGlobalStream) {
  check_world_size_change(3, 2, 2, 3, 5);   // 2 ranks x 3 -> 3 ranks x 2, from position 30
  check_world_size_change(2, 4, 2, 1, 7);   // 4 ranks -> 1 rank, from position 56
  check_world_size_change(4, 1, 4, 5, 11);  // 1 rank -> 5 ranks, from 44: 20 per step, then epoch 1
}

TEST(Loader, ClassConditionalNeedsLabelsInRange) {
  TempDir dir;
  // Fixture labels are (7 i) mod 10: 0, 7, 4, 1, 8, ...; with 7 classes image 1 (label 7) is the first bad one.
  auto labelled = write_fixture(dir / "labelled.h5", 8, 2, 2, 1);
  auto options = options_for(labelled, 4, 0, 1, 0);
  options.num_classes = 7;
  std::string message = open_error(options);
  EXPECT_NE(message.find("labelled.h5"), std::string::npos) << message;
  EXPECT_NE(message.find("image 1 has label 7, outside [0, 7)"), std::string::npos) << message;
  options.num_classes = 10;
  Loader loader(options);
  auto batch = loader.next();
  ASSERT_TRUE(batch.labels.defined());
  auto indices = as_vector(batch.indices);
  auto labels = as_vector(batch.labels);
  for (size_t m = 0; m < indices.size(); ++m) EXPECT_EQ(labels[m], fixture_label(indices[m]));

  auto bare = write_fixture(dir / "unlabelled.h5", 8, 2, 2, 1, /*labels=*/false);
  auto unlabelled = options_for(bare, 4, 0, 1, 0);
  unlabelled.num_classes = 2;
  message = open_error(unlabelled);
  EXPECT_NE(message.find("unlabelled.h5"), std::string::npos) << message;
  EXPECT_NE(message.find("has no labels, but the model is class-conditional"), std::string::npos) << message;
}

TEST(Loader, OpenTimeErrorsNameTheFileAndTheProblem) {
  TempDir dir;
  auto good = write_fixture(dir / "good.h5", 10, 8, 8, 1);
  auto expect_error = [](const LoaderOptions& options, const std::string& part) {
    std::string message = open_error(options);
    EXPECT_NE(message.find(part), std::string::npos) << "expected '" << part << "' in: " << message;
    EXPECT_NE(message.find(options.path.filename().string()), std::string::npos) << message;
  };
  expect_error(options_for(dir / "missing.h5", 2, 0, 1, 0), "does not exist");
  {
    std::ofstream(dir / "text.h5") << "not hdf5 at all";
    expect_error(options_for(dir / "text.h5", 2, 0, 1, 0), "not an HDF5 file");
  }
  write_hdf5_tensors(dir / "other.h5", {{"pixels", torch::zeros({4, 2, 2, 1}, torch::kUInt8)}});
  expect_error(options_for(dir / "other.h5", 2, 0, 1, 0), "no dataset 'images'");
  write_hdf5_tensors(dir / "float.h5", {{"images", torch::zeros({4, 2, 2, 1})}});
  expect_error(options_for(dir / "float.h5", 2, 0, 1, 0), "dtype float32, expected uint8");
  write_hdf5_tensors(dir / "rank3.h5", {{"images", torch::zeros({4, 2, 2}, torch::kUInt8)}});
  expect_error(options_for(dir / "rank3.h5", 2, 0, 1, 0), "expected 4 dimensions");
  write_hdf5_tensors(dir / "two.h5", {{"images", torch::zeros({4, 2, 2, 2}, torch::kUInt8)}});
  expect_error(options_for(dir / "two.h5", 2, 0, 1, 0), "must be 1 or 3");
  write_hdf5_tensors(dir / "bare.h5", {{"images", torch::zeros({4, 2, 2, 1}, torch::kUInt8)}});
  expect_error(options_for(dir / "bare.h5", 2, 0, 1, 0), "'format_version' is missing");
  set_format_attributes(dir / "bare.h5", 4, 2, 2, 1);
  EXPECT_EQ(open_error(options_for(dir / "bare.h5", 2, 0, 1, 0)), "(no error)");
  set_int_attribute(dir / "bare.h5", "count", 99);
  expect_error(options_for(dir / "bare.h5", 2, 0, 1, 0), "count = 99 does not match");
  set_format_attributes(dir / "bare.h5", 4, 2, 2, 1);
  set_int_attribute(dir / "bare.h5", "format_version", 7);
  expect_error(options_for(dir / "bare.h5", 2, 0, 1, 0), "format_version 7 is not supported");
  write_hdf5_tensors(dir / "labels.h5", {{"images", torch::zeros({4, 2, 2, 1}, torch::kUInt8)},
                                         {"labels", torch::zeros({3}, torch::kInt64)}});
  set_format_attributes(dir / "labels.h5", 4, 2, 2, 1);
  expect_error(options_for(dir / "labels.h5", 2, 0, 1, 0), "'labels' has shape [3], expected [4]");
  write_hdf5_tensors(dir / "flabels.h5", {{"images", torch::zeros({4, 2, 2, 1}, torch::kUInt8)},
                                          {"labels", torch::zeros({4})}});
  set_format_attributes(dir / "flabels.h5", 4, 2, 2, 1);
  expect_error(options_for(dir / "flabels.h5", 2, 0, 1, 0), "'labels' has dtype float32");

  auto sized = options_for(good, 2, 0, 1, 0);
  sized.expected_size = 16;
  expect_error(sized, "model expects 16x16");
  auto coloured = options_for(good, 2, 0, 1, 0);
  coloured.expected_channels = 3;
  expect_error(coloured, "--channels 3");
  expect_error(options_for(good, 3, 0, 4, 0), "fewer than one global batch");
  expect_error(options_for(good, 2, 2, 2, 0), "rank 2 is not in a world of 2");
  expect_error(options_for(good, 0, 0, 1, 0), "batch_size must be >= 1");
  if (!torch::cuda::is_available()) {
    auto cuda = options_for(good, 2, 0, 1, 0);
    cuda.device = torch::Device(torch::kCUDA, 0);
    expect_error(cuda, "CUDA is not available");
  }
  auto ok = options_for(good, 2, 0, 1, 0);
  ok.expected_size = 8;
  ok.expected_channels = 1;
  EXPECT_EQ(open_error(ok), "(no error)");
}

// Overwrites the stored bytes of image `index` in a one-image-per-chunk compressed dataset.
void corrupt_chunk(const fs::path& path, int64_t index) {
  hsize_t offset[4] = {static_cast<hsize_t>(index), 0, 0, 0}, size = 0;
  haddr_t address = 0;
  unsigned filter_mask = 0;
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t dataset = H5Dopen2(file, "images", H5P_DEFAULT);
  ASSERT_GE(H5Dget_chunk_info_by_coord(dataset, offset, &filter_mask, &address, &size), 0);
  H5Dclose(dataset);
  H5Fclose(file);
  std::fstream stream(path, std::ios::in | std::ios::out | std::ios::binary);
  stream.seekp(static_cast<std::streamoff>(address));
  std::string garbage(size, '\xff');
  stream.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
}

TEST(Loader, ReadErrorNamesTheIndexAndTheFile) {
  TempDir dir;
  auto path = write_fixture(dir / "gz.h5", 24, 8, 8, 1, true, "gzip");
  ASSERT_EQ(read_dataset_info(path).chunk_shape[0], 1);
  corrupt_chunk(path, 13);
  Loader loader(options_for(path, 4, 0, 1, 2));
  std::string message;
  for (int k = 0; k < 6 && message.empty(); ++k) {
    try {
      auto indices = as_vector(loader.next().indices);
      EXPECT_EQ(std::count(indices.begin(), indices.end(), 13), 0) << "a batch with image 13 came through";
    } catch (const std::exception& error) {
      message = error.what();
    }
  }
  ASSERT_FALSE(message.empty()) << "no batch failed";
  EXPECT_NE(message.find("image 13"), std::string::npos) << message;
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;
  EXPECT_THROW(loader.next(), std::runtime_error);  // failed for good
  EXPECT_THROW(read_images(path, 10, 5), std::runtime_error);
}

TEST(Loader, HookSeesGlobalStepsAndItsErrorSurfacesFromNext) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 20, 2, 2, 1);
  std::mutex mutex;
  std::vector<int64_t> steps;
  auto options = options_for(path, 2, 0, 1, 0);
  options.before_batch_hook = [&](int64_t k) {
    {
      std::lock_guard lock(mutex);
      steps.push_back(k);
    }
    if (k == 3) throw std::runtime_error("simulated failure at step 3");
  };
  Loader loader(options);
  for (int k = 0; k < 3; ++k) EXPECT_NO_THROW(loader.next());
  try {
    loader.next();
    FAIL() << "step 3 should fail";
  } catch (const std::runtime_error& error) {
    EXPECT_STREQ(error.what(), "simulated failure at step 3");
  }
  std::lock_guard lock(mutex);
  EXPECT_EQ(steps, (std::vector<int64_t>{0, 1, 2, 3}));
}

TEST(Loader, HookStepsContinueAfterRestore) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 20, 2, 2, 1);
  std::atomic<int64_t> first_step{-1};
  auto options = options_for(path, 2, 0, 1, 0);
  LoaderState saved;
  {
    Loader loader(options);
    for (int k = 0; k < 5; ++k) loader.next();
    saved = loader.state();
  }
  options.before_batch_hook = [&](int64_t k) {
    int64_t unset = -1;
    first_step.compare_exchange_strong(unset, k);
  };
  Loader resumed(options);
  resumed.restore(saved);
  resumed.next();
  EXPECT_EQ(first_step.load(), 5);
}

TEST(Loader, WaitTimeCountsTimeBlockedInNext) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 20, 2, 2, 1);
  auto options = options_for(path, 2, 0, 1, 0);
  options.prefetch_batches = 1;
  options.before_batch_hook = [](int64_t) { std::this_thread::sleep_for(std::chrono::milliseconds(30)); };
  Loader loader(options);
  for (int k = 0; k < 4; ++k) loader.next();
  // Four batches each take >= 30 ms to produce and the consumer does nothing else.
  EXPECT_GE(loader.wait_seconds_total(), 0.06);
}

TEST(Loader, BatchesStayValidWhateverTheCallerKeeps) {
  // Batch memory is recycled once dropped: batches held for long, in numbers beyond the pool,
  // or past the loader's own life must keep their contents.
  TempDir dir;
  const int64_t h = 4, w = 4, c = 3;
  auto path = write_fixture(dir / "f.h5", 64, h, w, c);
  std::vector<std::pair<LoaderState, Batch>> kept;
  {
    auto options = options_for(path, 4, 0, 1, 6);
    Loader loader(options);
    for (int k = 0; k < 30; ++k) {
      auto before = loader.state();
      kept.emplace_back(before, loader.next());
    }
  }
  for (const auto& [before, batch] : kept) expect_batch_images(batch, before, 0, 1, h, w, c, true);
}

TEST(Loader, RejectsAStateThatDoesNotFitTheDataset) {
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 20, 2, 2, 1);
  Loader loader(options_for(path, 2, 0, 1, 0));
  LoaderState bad;
  bad.position = 21;
  EXPECT_THROW(loader.restore(bad), std::invalid_argument);
  // A position the new sharding cannot fill rolls over to the next epoch.
  LoaderState tail;
  tail.position = 19;
  loader.restore(tail);
  EXPECT_EQ(loader.state().epoch, 1);
  EXPECT_EQ(loader.state().position, 0);
}

TEST(Loader, LoadersAndTensorFileWritesShareHdf5Safely) {
  TempDir dir;
  auto a = write_fixture(dir / "a.h5", 64, 4, 4, 3);
  auto b = write_fixture(dir / "b.h5", 48, 4, 4, 1, true, "gzip");
  std::atomic<int> failures{0};
  auto consume = [&](fs::path path, int64_t h, int64_t w, int64_t c) {
    try {
      auto options = options_for(path, 4, 0, 1, 1);
      options.worker_threads = 2;
      Loader loader(options);
      for (int k = 0; k < 150; ++k) {
        auto before = loader.state();
        auto batch = loader.next();
        auto indices = as_vector(batch.indices);
        for (size_t m = 0; m < indices.size(); ++m) {
          bool flip = flip_sample(before.seed, before.epoch, before.position + static_cast<int64_t>(m));
          if (!torch::equal(batch.images[m], expected_sample(indices[m], h, w, c, flip))) ++failures;
        }
      }
    } catch (...) {
      ++failures;
    }
  };
  std::thread first(consume, a, 4, 4, 3), second(consume, b, 4, 4, 1);
  for (int k = 0; k < 30; ++k) {
    auto tensor = torch::arange(1000, torch::kFloat) * k;
    write_hdf5_tensors(dir / "t.h5", {{"x", tensor}}, {{"k", std::to_string(k)}}, /*overwrite=*/true);
    auto back = read_hdf5_tensors(dir / "t.h5");
    if (!torch::equal(back.at("x"), tensor) || back.attributes.at("k") != std::to_string(k)) ++failures;
    read_dataset_info(a);
  }
  first.join();
  second.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST(Loader, BatchesOnTheGpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  auto path = write_fixture(dir / "f.h5", 64, 8, 8, 3);
  auto cpu_options = options_for(path, 8, 0, 1, 4);
  auto gpu_options = cpu_options;
  gpu_options.device = torch::Device(torch::kCUDA, 0);
  Loader cpu(cpu_options), gpu(gpu_options);
  // The pinned, non-blocking path: copies are queued on the current stream behind long GPU work and
  // the host never waits between batches, so a pinned buffer reused (or freed) before its copy ran
  // would show up as a wrong batch when they are all compared at the end.
  auto busy = torch::randn({2048, 2048}, torch::TensorOptions().device(gpu_options.device));
  std::vector<data::Batch> on_gpu, on_cpu;
  for (int k = 0; k < 24; ++k) {
    for (int m = 0; m < 4; ++m) busy = torch::tanh(busy.matmul(busy) * 1e-3);
    on_gpu.push_back(gpu.next());
    on_cpu.push_back(cpu.next());
  }
  for (size_t k = 0; k < on_gpu.size(); ++k) {
    const auto& x = on_cpu[k];
    const auto& y = on_gpu[k];
    ASSERT_TRUE(y.images.is_cuda());
    ASSERT_TRUE(y.labels.is_cuda());
    ASSERT_TRUE(torch::equal(x.images, y.images.cpu())) << "batch " << k;
    ASSERT_TRUE(torch::equal(x.labels, y.labels.cpu())) << "batch " << k;
    ASSERT_TRUE(torch::equal(x.indices, y.indices)) << "batch " << k;
  }
}

}  // namespace
}  // namespace diffuse::testing
