// Checkpoint store: round trips, the on-disk layout, atomicity under failure, corruption fallback,
// retention and resharding. Runs as 1, 2 and 4 ranks; every rank runs every test, and a checkpoint
// "of another world size" is written by rank 0 with write_checkpoint_as_world.
#include "trainer/checkpoint.h"
#include "trainer/checkpoint_inspect.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <set>

#include "data/hdf5_tensors.h"
#include "diffuse/build_config.h"
#include "mpi_support.h"
#include "support.h"

namespace diffuse::trainer {
namespace {
namespace fs = std::filesystem;

const dist::Context& ctx() { return testing::world(); }
int rank() { return ctx().rank(); }
int world() { return ctx().world_size(); }

/// Every rank sees it.
struct SharedDir : testing::SharedDir {
  SharedDir() : testing::SharedDir("diffuse-ckpt") {}
};

/// Byte-for-byte equality (NaN payloads and -0.0 included), dtype and shape included.
bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  auto ca = a.contiguous().cpu(), cb = b.contiguous().cpu();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

void expect_same_tensors(const NamedTensors& got, const NamedTensors& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first) << what << " #" << i;
    EXPECT_TRUE(same_bits(got[i].second, want[i].second)) << what << ": " << want[i].first;
  }
}

const std::string kConfig =
    "model:\n  dim: 64\n  dim_mults: [1, 2, 4, 8]\ndata:\n  path: \"/data/my \\\"quoted\\\" dir\\\\x.h5\"\n"
    "note: 'tab\there, caf\xc3\xa9, bell \x07, emoji \xf0\x9f\x98\x80'\n";

/// State that encodes its step (replicated) and its rank (per-rank), with every dtype a trainer
/// saves and the awkward cases: NaN/inf/-0/subnormal, a 0-d scalar, an empty and a transposed tensor.
CheckpointContents make_contents(int64_t step, int r) {
  torch::manual_seed(static_cast<uint64_t>(step));
  auto weight = torch::randn({64, 33});
  weight.view(-1).index_put_({torch::indexing::Slice(0, 5)},
                             torch::tensor({std::nanf(""), INFINITY, -INFINITY, -0.0f, 1e-42f}));
  CheckpointContents c;
  c.step = step;
  c.replicated = {
      {"model.downs.0.weight", weight},
      {"model.downs.0.bias", torch::randn({33})},
      {"ema.0.9999.model.downs.0.weight", torch::randn({64, 33}).to(torch::kBFloat16)},
      {"optimizer.exp_avg.0", torch::randn({100, 7})},
      {"optimizer.step", torch::tensor(step, torch::kInt64)},
      {"sampler.loss_counts", torch::arange(10, torch::kInt64) * step},
      {"scaler.mask", torch::randint(0, 256, {17}, torch::kUInt8)},
      {"scaler.flags", torch::tensor({true, false, true})},
      {"half", torch::randn({5}).to(torch::kFloat16)},
      {"empty", torch::zeros({0, 4})},
      {"transposed", torch::arange(12, torch::kFloat32).reshape({3, 4}).t()},
  };
  c.per_rank = {
      {"rng", torch::arange(64, torch::kInt64).to(torch::kUInt8) + static_cast<uint8_t>(r)},
      {"loader.cursor", torch::tensor(1000 + r + step, torch::kInt64)},
  };
  c.config_yaml = kConfig;
  c.metadata = {{"elapsed_seconds", std::to_string(step * 0.5)},
                {"samples_seen", std::to_string(step * 64)},
                {"odd", "quote \" backslash \\ newline \n end"}};
  return c;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string latest_target(const fs::path& checkpoints) {
  return fs::read_symlink(checkpoints / "latest").string();
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string shard_name(int r, int world_size) {
  char name[64];
  std::snprintf(name, sizeof(name), "shard-%05d-of-%05d.h5", r, world_size);
  return name;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  return all;
}

// ------------------------------------------------------------------------------------------------

TEST(Checkpoint, RoundTripIsBitExactForEveryDtype) {
  SharedDir run;
  CheckpointStore store(run / "checkpoints", ctx());
  EXPECT_FALSE(store.load("latest").has_value());  // nothing yet: a fresh start, not an error

  auto saved = store.save(make_contents(100, rank()));
  EXPECT_EQ(saved.directory, run / "checkpoints" / "step-000100");
  if (ctx().is_root()) {
    EXPECT_GT(saved.bytes, 64 * 33 * 4);
  }

  auto want = make_contents(100, rank());
  for (const std::string& which :
       std::vector<std::string>{"latest", "step-000100", (run / "checkpoints" / "step-000100").string()}) {
    SCOPED_TRACE(which);
    auto loaded = store.load(which);
    ASSERT_TRUE(loaded.has_value());
    EXPECT_TRUE(fs::equivalent(loaded->directory, run / "checkpoints" / "step-000100"));
    EXPECT_EQ(loaded->step, 100);
    EXPECT_EQ(loaded->saved_world_size, world());
    expect_same_tensors(loaded->replicated, want.replicated, "replicated");
    expect_same_tensors(loaded->per_rank, want.per_rank, "per_rank");
    EXPECT_EQ(loaded->per_rank_source, rank());
    EXPECT_FALSE(loaded->per_rank_inherited);
    EXPECT_EQ(loaded->config_yaml, kConfig);
    EXPECT_EQ(loaded->metadata, want.metadata);
    EXPECT_EQ(loaded->diffuse_version, DIFFUSE_VERSION);
    EXPECT_EQ(loaded->git_hash, diffuse::git_hash());
    EXPECT_EQ(loaded->created.size(), 20u) << loaded->created;  // 2025-01-31T12:00:00Z
    EXPECT_TRUE(loaded->warnings.empty()) << joined(loaded->warnings);
  }

  // One process, no collectives (sample/export): the same replicated state from every way of
  // naming the checkpoint.
  for (const fs::path& path : {run.path(), run / "checkpoints", run / "checkpoints" / "latest",
                               run / "latest", run / "checkpoints" / "step-000100"}) {
    SCOPED_TRACE(path.string());
    auto single = read_checkpoint_single_process(path);
    EXPECT_EQ(single.step, 100);
    expect_same_tensors(single.replicated, want.replicated, "single-process replicated");
    EXPECT_TRUE(single.per_rank.empty());
    EXPECT_EQ(single.per_rank_source, -1);
  }
}

TEST(Checkpoint, EachReplicatedTensorIsStoredOnceBalancedByBytes) {
  SharedDir run;
  CheckpointStore store(run / "checkpoints", ctx());
  auto contents = make_contents(7, rank());
  store.save(contents);
  if (!ctx().is_root()) return;

  const fs::path dir = run / "checkpoints" / "step-000007";
  std::vector<std::string> expected_files{"manifest.json"};
  for (int r = 0; r < world(); ++r) expected_files.push_back(shard_name(r, world()));
  std::sort(expected_files.begin(), expected_files.end());
  ASSERT_EQ(names_in(dir), expected_files);

  std::map<std::string, int> copies;
  std::vector<int64_t> shard_bytes(world(), 0);
  int64_t largest = 0;
  for (const auto& [name, t] : contents.replicated) {
    largest = std::max<int64_t>(largest, t.numel() * t.element_size());
  }
  for (int r = 0; r < world(); ++r) {
    auto file = data::read_hdf5_tensors(dir / shard_name(r, world()));
    EXPECT_EQ(file.attributes.at("format"), "diffuse-checkpoint-shard");
    EXPECT_EQ(file.attributes.at("step"), "7");
    EXPECT_EQ(file.attributes.at("rank"), std::to_string(r));
    EXPECT_EQ(file.attributes.at("world_size"), std::to_string(world()));
    for (const auto& [name, t] : file.tensors) {
      if (name.rfind("rank", 0) == 0 && name.find('.') != std::string::npos && std::isdigit(name[4])) {
        // Per-rank tensors live in their own rank's shard, under "rank<r>.".
        EXPECT_EQ(name.substr(0, name.find('.') + 1), "rank" + std::to_string(r) + ".") << name;
        continue;
      }
      ++copies[name];
      shard_bytes[r] += t.numel() * t.element_size();
    }
    // This shard's per-rank state is exactly what rank r passed (recomputed: it encodes r).
    auto theirs = make_contents(7, r).per_rank;
    for (const auto& [name, t] : theirs) {
      EXPECT_TRUE(same_bits(file.at("rank" + std::to_string(r) + "." + name), t)) << name;
    }
  }
  for (const auto& [name, t] : contents.replicated) {
    EXPECT_EQ(copies[name], 1) << name << " stored " << copies[name] << "x";
  }
  EXPECT_EQ(copies.size(), contents.replicated.size());
  // Greedy largest-first: the heaviest and lightest shard differ by at most the largest tensor.
  auto [lightest, heaviest] = std::minmax_element(shard_bytes.begin(), shard_bytes.end());
  EXPECT_LE(*heaviest - *lightest, largest);
  if (world() > 1) {
    EXPECT_GT(*lightest, 0) << "every shard carries part of the replicated state";
  }

  // The manifest names every tensor with its shard.
  const std::string manifest = read_text(dir / "manifest.json");
  EXPECT_TRUE(contains(manifest, "\"format\": \"diffuse-checkpoint\"")) << manifest;
  EXPECT_TRUE(contains(manifest, "\"world_size\": " + std::to_string(world())));
  EXPECT_TRUE(contains(manifest, "\"ema.0.9999.model.downs.0.weight\": {\"kind\": \"replicated\""));
  EXPECT_TRUE(contains(manifest, "\"dtype\": \"bfloat16\", \"shape\": [64, 33]"));
  EXPECT_TRUE(contains(manifest, "\"rank" + std::to_string(world() - 1) + ".rng\": {\"kind\": \"per_rank\""));

  // Python's json module (strict: no raw control characters) reads it and gets the same config.
  if (testing::run_command("command -v python3").exit_code == 0) {
    write_text(run / "config.expected", kConfig);
    auto python = testing::run_command(
        "python3 -c 'import json, sys; m = json.load(open(sys.argv[1], encoding=\"utf-8\")); "
        "assert m[\"config\"] == open(sys.argv[2], encoding=\"utf-8\", newline=\"\").read(); "
        "print(len(m[\"tensors\"]), m[\"metadata\"][\"odd\"].count(chr(10)))' " +
        (dir / "manifest.json").string() + " " + (run / "config.expected").string());
    EXPECT_EQ(python.exit_code, 0) << python.output;
    EXPECT_EQ(python.output, std::to_string(contents.replicated.size() + 2 * world()) + " 1\n");
  }
}

TEST(Checkpoint, ManifestIsWrittenLastAndDirectoriesWithoutOneAreIgnored) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx());
  store.save(make_contents(100, rank()));
  store.save(make_contents(200, rank()));
  if (ctx().is_root()) {
    // Ordering on disk: no shard is newer than the manifest.
    struct stat manifest {};
    ASSERT_EQ(::stat((checkpoints / "step-000200" / "manifest.json").c_str(), &manifest), 0);
    for (const auto& entry : fs::directory_iterator(checkpoints / "step-000200")) {
      struct stat shard {};
      ASSERT_EQ(::stat(entry.path().c_str(), &shard), 0);
      auto ns = [](const struct stat& s) { return s.st_mtim.tv_sec * 1000000000LL + s.st_mtim.tv_nsec; };
      EXPECT_LE(ns(shard), ns(manifest)) << entry.path();
    }
    // A newer directory whose manifest never came (a save cut short), and a stray temporary one.
    fs::create_directory(checkpoints / "step-000300");
    for (const auto& entry : fs::directory_iterator(checkpoints / "step-000200")) {
      if (entry.path().filename() != "manifest.json") fs::copy(entry.path(), checkpoints / "step-000300");
    }
    fs::copy(checkpoints / "step-000200", checkpoints / "step-000400.tmp");
    // Without `latest`, "latest" means the newest complete checkpoint.
    fs::remove(checkpoints / "latest");
  }
  ctx().barrier();
  auto listed = store.list();
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].filename(), "step-000200");
  EXPECT_EQ(listed[1].filename(), "step-000100");
  auto loaded = store.load("latest");
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->step, 200);
  EXPECT_TRUE(loaded->warnings.empty()) << joined(loaded->warnings);
  EXPECT_THROW(store.load("step-000300"), CheckpointError);

  // The next save clears the stray temporary directory.
  store.save(make_contents(500, rank()));
  if (ctx().is_root()) {
    EXPECT_FALSE(fs::exists(checkpoints / "step-000400.tmp"));
    EXPECT_EQ(latest_target(checkpoints), "step-000500");
  }
}

TEST(Checkpoint, TheNextSaveCleansUpAfterACrashedOne) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx(), {.keep_last = 0});
  store.save(make_contents(100, rank()));
  store.save(make_contents(200, rank()));
  if (ctx().is_root()) {
    // A crash while re-saving step 200 (after resuming from an older checkpoint), between moving the
    // old copy aside and renaming the new one in; and a crash halfway through a retention deletion.
    fs::rename(checkpoints / "step-000200", checkpoints / "step-000200.old");
    fs::copy(checkpoints / "step-000100", checkpoints / "step-000050.trash");
    fs::create_directory(checkpoints / "step-000300.tmp");
  }
  ctx().barrier();
  store.save(make_contents(300, rank()));
  EXPECT_EQ(names_in(checkpoints),
            (std::vector<std::string>{"latest", "step-000100", "step-000200", "step-000300"}));
  auto restored = store.load("step-000200");
  ASSERT_TRUE(restored);
  expect_same_tensors(restored->replicated, make_contents(200, rank()).replicated, "restored step 200");
}

TEST(Checkpoint, AFailureOnOneRankFailsEveryRankAndChangesNothing) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  const int failing = world() - 1;
  int64_t failing_step = -1;  // -1: every step
  bool armed = false;
  auto hook = [&](int shard_rank, int64_t step, const fs::path& shard) {
    if (!armed || shard_rank != failing || (failing_step >= 0 && step != failing_step)) return;
    throw std::runtime_error("test hook: simulated failure after writing " + shard.string());
  };
  CheckpointStore store(checkpoints, ctx(), {}, hook);
  store.save(make_contents(100, rank()));

  armed = true;
  std::string message;
  try {
    store.save(make_contents(200, rank()));
    ADD_FAILURE() << "the save should have failed on every rank";
  } catch (const CheckpointError& e) {
    message = e.what();
  }
  armed = false;
  EXPECT_TRUE(contains(message, "rank " + std::to_string(failing) + ": test hook")) << message;
  EXPECT_TRUE(contains(message, "step 200")) << message;
  // Every rank throws the same message.
  auto messages = ctx().gather_strings(message);
  for (const auto& m : messages) EXPECT_EQ(m, messages[0]);

  ctx().barrier();
  EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"latest", "step-000100"}));
  EXPECT_EQ(latest_target(checkpoints), "step-000100");
  auto loaded = store.load("latest");
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->step, 100);
  EXPECT_TRUE(loaded->warnings.empty());

  // The store is usable after a failed save; a hook limited to one step fails only that one.
  armed = true;
  failing_step = 300;
  EXPECT_NO_THROW(store.save(make_contents(200, rank())));
  EXPECT_THROW(store.save(make_contents(300, rank())), CheckpointError);
  armed = false;
  ctx().barrier();
  EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"latest", "step-000100", "step-000200"}));
  EXPECT_EQ(latest_target(checkpoints), "step-000200");
}

TEST(Checkpoint, UnwritableDirectoryFailsOnEveryRank) {
  SharedDir run;
  // Root ignores permissions, so block the path with a regular file instead of chmod.
  if (ctx().is_root()) write_text(run / "not-a-directory", "x");
  ctx().barrier();
  CheckpointStore blocked(run / "not-a-directory" / "checkpoints", ctx());
  try {
    blocked.save(make_contents(1, rank()));
    ADD_FAILURE() << "saving under a regular file should fail";
  } catch (const CheckpointError& e) {
    EXPECT_TRUE(contains(e.what(), "rank 0: cannot create the checkpoint directory")) << e.what();
  }

  // A failure while publishing (the step's name is taken by a file): rolled back, nothing lost.
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx());
  store.save(make_contents(100, rank()));
  if (ctx().is_root()) write_text(checkpoints / "step-000200", "someone else's file");
  ctx().barrier();
  try {
    store.save(make_contents(200, rank()));
    ADD_FAILURE() << "publishing over a file should fail";
  } catch (const CheckpointError& e) {
    EXPECT_TRUE(contains(e.what(), "exists and is not a checkpoint directory")) << e.what();
  }
  ctx().barrier();
  EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"latest", "step-000100", "step-000200"}));
  EXPECT_EQ(read_text(checkpoints / "step-000200"), "someone else's file");
  EXPECT_EQ(latest_target(checkpoints), "step-000100");
}

TEST(Checkpoint, InvalidContentsAreRejectedBeforeAnythingIsWritten) {
  SharedDir run;
  CheckpointStore store(run / "checkpoints", ctx());
  auto with = [&](auto edit) {
    auto c = make_contents(10, rank());
    edit(c);
    return c;
  };
  const std::vector<std::pair<std::string, CheckpointContents>> cases{
      {"appears twice", with([](auto& c) { c.replicated.push_back(c.replicated[0]); })},
      {"reserved per-rank prefix",
       with([](auto& c) { c.replicated.emplace_back("rank0.x", torch::ones(1)); })},
      {"contains '/'", with([](auto& c) { c.per_rank.emplace_back("loader/state", torch::ones(1)); })},
      {"undefined", with([](auto& c) { c.replicated.emplace_back("missing", torch::Tensor()); })},
      {"cannot store tensors of dtype",
       with([](auto& c) { c.replicated.emplace_back("z", torch::ones(2, torch::kComplexFloat)); })},
      {"negative", with([](auto& c) { c.step = -1; })},
  };
  for (const auto& [expected, contents] : cases) {
    try {
      store.save(contents);
      ADD_FAILURE() << "accepted a checkpoint that should fail with: " << expected;
    } catch (const CheckpointError& e) {
      EXPECT_TRUE(contains(e.what(), expected)) << e.what();
    }
  }
  ctx().barrier();
  EXPECT_FALSE(fs::exists(run / "checkpoints"));

  // Ranks that disagree about the replicated state (a trainer bug) are named.
  auto mine = make_contents(10, rank());
  if (rank() == 1) mine.replicated.emplace_back("only.on.rank1", torch::ones(3));
  if (world() > 1) {
    try {
      store.save(mine);
      ADD_FAILURE() << "ranks with different replicated tensors must not save";
    } catch (const CheckpointError& e) {
      EXPECT_TRUE(contains(e.what(), "ranks 1 passed a different step or different replicated tensors"))
          << e.what();
    }
  }
  if (ctx().is_root()) {
    auto other = make_contents(10, 1);
    other.replicated.emplace_back("only.on.rank1", torch::ones(3));
    EXPECT_THROW(write_checkpoint_as_world(run / "single", {make_contents(10, 0), other}), CheckpointError);
  }
}

TEST(Checkpoint, CorruptLatestFallsBackToThePreviousGoodOne) {
  struct Case {
    std::string name;
    std::string reason;  // in the warning
    std::function<void(const fs::path& step_dir, const fs::path& shard)> corrupt;
  };
  const std::vector<Case> cases{
      {"truncated shard", "(truncated)",
       [](const fs::path&, const fs::path& shard) { fs::resize_file(shard, fs::file_size(shard) / 2); }},
      {"flipped byte", "fails its sha256 check",
       [](const fs::path&, const fs::path& shard) {
         std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
         auto middle = static_cast<std::streamoff>(fs::file_size(shard) / 2);
         f.seekg(middle);
         char c = 0;
         f.read(&c, 1);
         c = static_cast<char>(c ^ 0x10);
         f.seekp(middle);
         f.write(&c, 1);
       }},
      {"missing shard", "is missing", [](const fs::path&, const fs::path& shard) { fs::remove(shard); }},
      {"garbled manifest", "invalid JSON at byte",
       [](const fs::path& dir, const fs::path&) {
         auto text = read_text(dir / "manifest.json");
         write_text(dir / "manifest.json", text.substr(0, text.size() / 3));
       }},
      {"missing manifest", "has no manifest",
       [](const fs::path& dir, const fs::path&) { fs::remove(dir / "manifest.json"); }},
      {"manifest of another step", "the manifest says step 100",
       [](const fs::path& dir, const fs::path&) {
         fs::copy_file(dir.parent_path() / "step-000100" / "manifest.json", dir / "manifest.json",
                       fs::copy_options::overwrite_existing);
       }},
      {"latest names a deleted checkpoint", "is missing or has no manifest",
       [](const fs::path& dir, const fs::path&) { fs::remove_all(dir); }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    SharedDir run;
    const fs::path checkpoints = run / "checkpoints";
    CheckpointStore store(checkpoints, ctx());
    store.save(make_contents(100, rank()));
    store.save(make_contents(200, rank()));
    const fs::path bad = checkpoints / "step-000200";
    if (ctx().is_root()) c.corrupt(bad, bad / shard_name(world() - 1, world()));
    ctx().barrier();

    auto loaded = store.load("latest");
    ASSERT_TRUE(loaded);
    EXPECT_EQ(loaded->step, 100);
    expect_same_tensors(loaded->replicated, make_contents(100, rank()).replicated, "fallback replicated");
    expect_same_tensors(loaded->per_rank, make_contents(100, rank()).per_rank, "fallback per_rank");
    const std::string warnings = joined(loaded->warnings);
    EXPECT_TRUE(contains(warnings, "step-000200")) << warnings;
    EXPECT_TRUE(contains(warnings, c.reason)) << warnings;
    EXPECT_TRUE(contains(warnings, "using the older checkpoint")) << warnings;

    // Named explicitly, a bad checkpoint is an error, never a silent substitute.
    try {
      store.load(bad.string());
      ADD_FAILURE() << "loading the corrupt checkpoint by name should fail";
    } catch (const CheckpointError& e) {
      EXPECT_TRUE(contains(e.what(), "step-000200")) << e.what();
    }
    if (ctx().is_root()) {
      auto single = read_checkpoint_single_process(run.path());
      EXPECT_EQ(single.step, 100);
      EXPECT_FALSE(single.warnings.empty());
      EXPECT_THROW(read_checkpoint_single_process(bad), CheckpointError);
    }
  }
}

TEST(Checkpoint, NoUsableCheckpointIsAnErrorNotAFreshStart) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx());
  store.save(make_contents(100, rank()));
  if (ctx().is_root()) fs::resize_file(checkpoints / "step-000100" / shard_name(0, world()), 10);
  ctx().barrier();
  try {
    store.load("latest");
    ADD_FAILURE() << "a run whose only checkpoint is corrupt must not start over silently";
  } catch (const CheckpointError& e) {
    EXPECT_TRUE(contains(e.what(), "no usable checkpoint")) << e.what();
  }
  EXPECT_THROW(store.load("step-000999"), CheckpointError);
}

TEST(Checkpoint, RetentionKeepsTheLastKAndEveryMth) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx(), {.keep_last = 2, .keep_every = 3});
  std::vector<fs::path> removed;
  for (int64_t step = 1; step <= 8; ++step) {
    auto saved = store.save(make_contents(step, rank()));
    removed.insert(removed.end(), saved.removed.begin(), saved.removed.end());
  }
  std::vector<std::string> kept;
  for (const auto& p : store.list()) kept.push_back(p.filename().string());
  EXPECT_EQ(kept, (std::vector<std::string>{"step-000008", "step-000007", "step-000006", "step-000003"}));
  if (ctx().is_root()) {
    EXPECT_EQ(removed.size(), 4u);  // 1, 2, 4, 5
    EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"latest", "step-000003", "step-000006",
                                                               "step-000007", "step-000008"}));
  } else {
    EXPECT_TRUE(removed.empty());
  }

  // Saving a step again (after resuming from an older checkpoint) replaces it; the one just
  // written is always kept and becomes `latest`.
  auto again = make_contents(3, rank());
  again.replicated[0].second = again.replicated[0].second + 1;
  store.save(again);
  auto loaded = store.load("latest");
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded->step, 3);
  expect_same_tensors(loaded->replicated, again.replicated, "replaced step");
  if (ctx().is_root()) {
    EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"latest", "step-000003", "step-000006",
                                                               "step-000007", "step-000008"}));
  }
  EXPECT_THROW(CheckpointStore(checkpoints, ctx(), {.keep_last = -1}), std::invalid_argument);

  SharedDir all;
  CheckpointStore keep_all(all / "checkpoints", ctx(), {.keep_last = 0});
  for (int64_t step = 1; step <= 4; ++step) keep_all.save(make_contents(step, rank()));
  EXPECT_EQ(keep_all.list().size(), 4u);
}

TEST(Checkpoint, TheBestIsLinkedAndSurvivesRetention) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx(), {.keep_last = 1});
  auto save = [&](int64_t step, std::optional<int64_t> best) {
    auto contents = make_contents(step, rank());
    contents.best_step = best;
    store.save(contents);
  };
  save(1, std::nullopt);
  save(2, 2);
  save(3, 2);
  save(4, 2);
  if (ctx().is_root()) {
    // keep_last=1 alone would leave step 4 only.
    EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"best", "latest", "step-000002", "step-000004"}));
    EXPECT_EQ(fs::read_symlink(checkpoints / "best"), fs::path("step-000002"));
    EXPECT_EQ(fs::read_symlink(checkpoints / "latest"), fs::path("step-000004"));
  }
  auto best = store.load((checkpoints / "best").string());
  ASSERT_TRUE(best);
  EXPECT_EQ(best->step, 2);
  save(5, 5);  // a new best: the old one is an ordinary checkpoint again
  if (ctx().is_root()) {
    EXPECT_EQ(names_in(checkpoints), (std::vector<std::string>{"best", "latest", "step-000005"}));
    EXPECT_EQ(fs::read_symlink(checkpoints / "best"), fs::path("step-000005"));
    EXPECT_THROW(point_best_at(checkpoints, 4), CheckpointError);  // removed: not a checkpoint any more
    EXPECT_EQ(fs::read_symlink(checkpoints / "best"), fs::path("step-000005"));
  }
}

TEST(Checkpoint, LoadsOnAnyWorldSize) {
  // Checkpoints written "as if" by 1, 3 and 5 ranks, loaded by this run's ranks.
  for (int saved_world : {1, 3, 5}) {
    SCOPED_TRACE("saved by " + std::to_string(saved_world) + " ranks");
    SharedDir run;
    const fs::path checkpoints = run / "checkpoints";
    if (ctx().is_root()) {
      std::vector<CheckpointContents> ranks;
      for (int r = 0; r < saved_world; ++r) ranks.push_back(make_contents(42, r));
      write_checkpoint_as_world(checkpoints, ranks);
    }
    ctx().barrier();
    CheckpointStore store(checkpoints, ctx());
    auto loaded = store.load("latest");
    ASSERT_TRUE(loaded);
    EXPECT_EQ(loaded->step, 42);
    EXPECT_EQ(loaded->saved_world_size, saved_world);
    expect_same_tensors(loaded->replicated, make_contents(42, 0).replicated, "replicated");
    const int source = rank() < saved_world ? rank() : rank() % saved_world;
    EXPECT_EQ(loaded->per_rank_source, source);
    EXPECT_EQ(loaded->per_rank_inherited, rank() >= saved_world);
    expect_same_tensors(loaded->per_rank, make_contents(42, source).per_rank, "per_rank");
    EXPECT_TRUE(loaded->warnings.empty()) << joined(loaded->warnings);

    // And saving again at this world size reshards it.
    auto next = make_contents(43, rank());
    store.save(next);
    auto reloaded = store.load("latest");
    ASSERT_TRUE(reloaded);
    EXPECT_EQ(reloaded->saved_world_size, world());
    expect_same_tensors(reloaded->replicated, next.replicated, "resaved replicated");
  }

  // A checkpoint saved by this run's ranks, read by one process on every rank.
  SharedDir run;
  CheckpointStore store(run / "checkpoints", ctx());
  store.save(make_contents(9, rank()));
  auto single = read_checkpoint_single_process(run / "checkpoints" / "latest");
  EXPECT_EQ(single.saved_world_size, world());
  expect_same_tensors(single.replicated, make_contents(9, 0).replicated, "single-process replicated");
}

TEST(Checkpoint, SavesTensorsThatLiveOnTheGpu_CUDA) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  SharedDir run;
  CheckpointStore store(run / "checkpoints", ctx());
  auto on_cpu = make_contents(11, rank());
  auto on_gpu = on_cpu;
  for (auto& [name, t] : on_gpu.replicated) t = t.to(torch::kCUDA);
  for (auto& [name, t] : on_gpu.per_rank) t = t.to(torch::kCUDA);
  store.save(on_gpu);
  auto loaded = store.load("latest");
  ASSERT_TRUE(loaded);
  expect_same_tensors(loaded->replicated, on_cpu.replicated, "replicated from the GPU");
  expect_same_tensors(loaded->per_rank, on_cpu.per_rank, "per_rank from the GPU");
}

TEST(Checkpoint, ManifestReaderAcceptsAnyValidJsonLayout) {
  // A manifest rewritten by another tool (compact, \u escapes, escaped slashes) still loads.
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx());
  store.save(make_contents(5, rank()));
  if (ctx().is_root()) {
    const fs::path path = checkpoints / "step-000005" / "manifest.json";
    std::string text = read_text(path), compact;
    bool in_string = false, escaped = false;
    for (char c : text) {
      if (in_string) {
        in_string = escaped || c != '"';
        escaped = !escaped && c == '\\';
      } else if (c == '"') {
        in_string = true;
      } else if (c == ' ' || c == '\n') {
        continue;
      }
      compact += c;
    }
    auto replace_all = [&](const std::string& from, const std::string& to) {
      for (size_t at = compact.find(from); at != std::string::npos; at = compact.find(from, at + to.size())) {
        compact.replace(at, from.size(), to);
      }
    };
    replace_all("\\n", "\\u000A");
    replace_all("/data", "\\/data");
    replace_all("caf\xc3\xa9", "caf\\u00e9");
    replace_all("\xf0\x9f\x98\x80", "\\ud83d\\ude00");
    write_text(path, compact);
  }
  ctx().barrier();
  auto loaded = store.load("latest");
  ASSERT_TRUE(loaded);
  EXPECT_TRUE(loaded->warnings.empty()) << joined(loaded->warnings);
  EXPECT_EQ(loaded->config_yaml, kConfig);
  EXPECT_EQ(loaded->metadata, make_contents(5, rank()).metadata);
}

TEST(Checkpoint, DescribeReportsLayoutAndHashChecks) {
  SharedDir run;
  const fs::path checkpoints = run / "checkpoints";
  CheckpointStore store(checkpoints, ctx());
  store.save(make_contents(200, rank()));
  if (!ctx().is_root()) return;

  auto summary = describe_checkpoint(run.path());  // a run directory means its latest checkpoint
  EXPECT_TRUE(summary.ok) << summary.text;
  const std::string& text = summary.text;
  EXPECT_TRUE(contains(text, "step        200\n")) << text;
  EXPECT_TRUE(
      contains(text, "saved by    " + std::to_string(world()) + (world() == 1 ? " rank\n" : " ranks\n")));
  EXPECT_TRUE(contains(text, "tensors     11 replicated")) << text;
  EXPECT_TRUE(contains(text, std::to_string(2 * world()) + " per-rank")) << text;
  EXPECT_TRUE(contains(text, "\n  samples_seen: 12800\n")) << text;
  EXPECT_TRUE(contains(text, "\n  odd: \"quote \\\" backslash \\\\ newline \\n end\"\n")) << text;
  EXPECT_TRUE(contains(text, "\n  model:\n    dim: 64\n")) << text;
  EXPECT_TRUE(contains(text, "result      OK")) << text;
  for (int r = 0; r < world(); ++r) EXPECT_TRUE(contains(text, shard_name(r, world()))) << text;

  // A flipped byte: caught by the hash, invisible to a size-only check.
  const fs::path shard = checkpoints / "step-000200" / shard_name(0, world());
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x5a');
  }
  auto hashed = describe_checkpoint(checkpoints / "step-000200");
  EXPECT_FALSE(hashed.ok);
  EXPECT_TRUE(contains(hashed.text, "FAILED: shard 0")) << hashed.text;
  EXPECT_TRUE(contains(hashed.text, "result      FAILED (1 of " + std::to_string(world()) + " shards)"));
  EXPECT_TRUE(describe_checkpoint(checkpoints / "latest", /*verify_hashes=*/false).ok);
  fs::resize_file(shard, 50);
  EXPECT_FALSE(describe_checkpoint(checkpoints / "latest", false).ok);

  EXPECT_THROW(describe_checkpoint(run / "nowhere"), CheckpointError);
}

}  // namespace
}  // namespace diffuse::trainer
