// End-to-end tests of class-conditional runs (model.num_classes > 0) with the real `diffuse` CLI on
// CPU: a two-class set whose classes differ only in colour (`prep --synthetic red-blue`: red
// shapes are label 0, blue ones label 1); after a short training, guided samples of class 0 are
// measurably redder than those of class 1, and unguided ones (--guidance 1) less so. Plus: labels
// missing or out of range are refused before training, an interrupted conditional run resumes
// bit-identically, `export` writes the reference's classifier-free-guidance state dict, `sample`
// stores the labels beside the images and `eval --classes` conditions the bound.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <regex>

#include "data/dataset.h"
#include "data/hdf5_tensors.h"
#include "model/conditional_unet.h"
#include "model/safetensors.h"
#include "model/state_dict.h"
#include "support.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace fs = std::filesystem;

class Conditional : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto result = run_command(diffuse_exe() + " prep --synthetic red-blue --count 256 --size 16 --seed 1 -o " +
                              (dir_->path() / "redblue16.h5").string());
    ASSERT_EQ(result.exit_code, 0) << result.output;
    result = run_command(diffuse_exe() + " prep --synthetic shapes --count 32 --size 16 -o " +
                         (dir_->path() / "shapes16.h5").string());
    ASSERT_EQ(result.exit_code, 0) << result.output;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path path(const std::string& name) { return dir_->path() / name; }
  static fs::path data() { return path("redblue16.h5"); }

  /// `diffuse train` on configs/tiny.yaml made class-conditional (2 classes) on `dataset`.
  static CommandResult train(int ranks, const fs::path& run_dir, const std::string& extra = "",
                             const fs::path& dataset = {}) {
    std::string launcher = ranks > 1 ? mpirun(ranks) : std::string();
    return run_command(launcher + diffuse_exe() + " train -c " + (source_dir() / "configs/tiny.yaml").string() +
                       " --set data.path=" + (dataset.empty() ? data() : dataset).string() +
                       " --set model.num_classes=2 --run-dir " + run_dir.string() + " " + extra);
  }
  static std::string exported(const fs::path& run_dir, const std::string& weights) {
    auto out = run_dir / ("export-" + weights + ".safetensors");
    auto result = run_command(diffuse_exe() + " export --ckpt " + (run_dir / "checkpoints/latest").string() +
                              " --weights " + weights + " --out " + out.string());
    EXPECT_EQ(result.exit_code, 0) << result.output;
    return read_file(out);
  }

  static TempDir* dir_;
};
TempDir* Conditional::dir_ = nullptr;

/// Mean of (red - blue) over every pixel of the images of `label` in a sample file, in [-1, 1].
double redness(const fs::path& h5, int64_t label) {
  auto file = data::read_hdf5_tensors(h5);
  torch::Tensor images, labels;
  for (const auto& [name, tensor] : file.tensors) {
    if (name == "images") images = tensor;
    if (name == "labels") labels = tensor;
  }
  EXPECT_TRUE(images.defined() && labels.defined()) << h5;
  auto chosen = images.index({labels == label}).to(torch::kFloat64) / 255.0;  // [k, H, W, 3]
  EXPECT_GT(chosen.size(0), 0);
  return (chosen.select(3, 0) - chosen.select(3, 2)).mean().item<double>();
}

TEST_F(Conditional, GuidedSamplesFollowTheClassColour) {
  auto run = path("colour");
  // 500 steps of 8 images: ~1 min on a busy 2-core machine. Grids during training: one row per class.
  auto trained = train(1, run,
                       "--set train.steps=500 --set train.batch_size=8 --set train.lr=0.003 "
                       "--set ema.update_after_step=50 --set ema.decay=[0.98] --set checkpoint.every=500 "
                       "--set log.every=100 --set log.sample_every=500 --set log.num_samples=4");
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  EXPECT_TRUE(fs::exists(run / "samples/step-000500.png")) << trained.output;
  auto ckpt = (run / "checkpoints/latest").string();

  auto sample = [&](const std::string& name, const std::string& guidance) {
    auto h5 = path(name);
    auto result = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --classes 0,1 --n 24 --steps 20 --seed 5 " +
                              guidance + " --out-h5 " + h5.string() + " --out " + path(name + ".png").string());
    EXPECT_EQ(result.exit_code, 0) << result.output;
    return h5;
  };
  auto guided = sample("guided.h5", "--guidance 6 --rescaled-phi 0.7");
  auto unguided = sample("unguided.h5", "--guidance 1");
  auto labels = data::read_hdf5_tensors(guided).tensors.at(1).second;
  EXPECT_TRUE(torch::equal(labels, torch::cat({torch::zeros({24}, torch::kInt64), torch::ones({24}, torch::kInt64)})));

  const double guided_gap = redness(guided, 0) - redness(guided, 1);
  const double unguided_gap = redness(unguided, 0) - redness(unguided, 1);
  // The data's own gap: the mean (red - blue) of red images minus that of blue ones.
  auto images = data::read_images(data(), 0, 256).to(torch::kFloat64) / 255.0;
  auto data_labels = data::read_labels(data());
  auto rb = (images.select(3, 0) - images.select(3, 2)).mean({1, 2});
  const double data_gap = (rb.index({data_labels == 0}).mean() - rb.index({data_labels == 1}).mean()).item<double>();
  std::cout << "red - blue gap (class 0 minus class 1): data " << data_gap << ", guided " << guided_gap
            << ", unguided " << unguided_gap << "\n";
  // Measured (OMP_NUM_THREADS=1, as ctest runs it): data 0.187, guided 0.103, unguided 0.032.
  EXPECT_GT(guided_gap, 0.25 * data_gap);
  EXPECT_GT(guided_gap, unguided_gap + 0.02);
}

TEST_F(Conditional, LabelsMissingOrOutOfRangeAreRefusedBeforeTraining) {
  // shapes has labels 0..2: with 2 classes the first image of label 2 is refused by index.
  auto shapes_labels = data::read_labels(path("shapes16.h5"));
  int64_t first_bad = (shapes_labels == 2).nonzero().min().item<int64_t>();
  auto out_of_range = train(1, path("bad-labels"), "", path("shapes16.h5"));
  EXPECT_NE(out_of_range.exit_code, 0);
  EXPECT_NE(out_of_range.output.find("shapes16.h5"), std::string::npos) << out_of_range.output;
  EXPECT_NE(out_of_range.output.find("image " + std::to_string(first_bad) + " has label 2, outside [0, 2)"),
            std::string::npos)
      << out_of_range.output;
  EXPECT_FALSE(fs::exists(path("bad-labels") / "checkpoints"));

  auto bare = path("unlabelled.h5");
  data::write_dataset(bare, torch::randint(0, 256, {16, 16, 16, 3}).to(torch::kUInt8), torch::Tensor());
  auto missing = train(1, path("no-labels"), "", bare);
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("unlabelled.h5"), std::string::npos) << missing.output;
  EXPECT_NE(missing.output.find("has no labels, but the model is class-conditional"), std::string::npos)
      << missing.output;

  // Keys the conditional U-Net does not have are refused by name.
  auto flash = train(1, path("flash"), "--set model.flash_attn=true");
  EXPECT_NE(flash.exit_code, 0);
  EXPECT_NE(flash.output.find("model.flash_attn"), std::string::npos) << flash.output;
}

TEST_F(Conditional, ResumeIsBitIdentical) {
  auto full = path("full"), split = path("split");
  auto a = train(2, full);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  auto b1 = train(2, split, "--set train.steps=10");
  ASSERT_EQ(b1.exit_code, 0) << b1.output;
  auto b2 = train(2, split, "--resume latest");
  ASSERT_EQ(b2.exit_code, 0) << b2.output;
  EXPECT_NE(b2.output.find("resumed from"), std::string::npos) << b2.output;
  EXPECT_EQ(exported(full, "online"), exported(split, "online"));
  EXPECT_EQ(exported(full, "ema"), exported(split, "ema"));
  // model.num_classes defines the model: a resume that changes it is refused.
  auto changed = train(2, split, "--resume latest --set model.num_classes=3 --set train.steps=30");
  EXPECT_NE(changed.exit_code, 0);
  EXPECT_NE(changed.output.find("model.num_classes 2 -> 3"), std::string::npos) << changed.output;
}

TEST_F(Conditional, ExportSampleAndEvalOfAConditionalCheckpoint) {
  // The golden reference U-Net's options (tests/model/golden/generate.py CFG_KWARGS): dim 4, 3 classes.
  auto run = path("artefacts");
  auto trained = train(1, run,
                       "--set model.dim=4 --set model.num_classes=3 --set train.steps=4 --set checkpoint.every=4",
                       path("shapes16.h5"));
  ASSERT_EQ(trained.exit_code, 0) << trained.output;
  auto ckpt = (run / "checkpoints/latest").string();

  auto weights = path("cfg.safetensors");
  auto exported = run_command(diffuse_exe() + " export --ckpt " + ckpt + " --out " + weights.string());
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  EXPECT_NE(exported.output.find("classifier_free_guidance.Unet"), std::string::npos) << exported.output;
  auto file = model::load_safetensors(weights);
  // Exactly the reference's state_dict keys, in its order, with its shapes (strict load_state_dict).
  auto golden = model::load_safetensors(fs::path(source_dir()) / "tests/model/golden/unet_cfg.safetensors");
  auto keys_text = util::json::parse(golden.metadata.at("golden")).find("keys")->as_string();
  std::istringstream keys(keys_text);
  std::map<std::string, std::vector<int64_t>> golden_shapes;
  for (const auto& [name, tensor] : golden.tensors) golden_shapes[name] = tensor.sizes().vec();
  size_t i = 0;
  for (std::string key; std::getline(keys, key); ++i) {
    ASSERT_LT(i, file.tensors.size()) << "export lacks " << key;
    EXPECT_EQ(file.tensors[i].first, key) << "entry " << i;
    EXPECT_EQ(file.tensors[i].second.sizes().vec(), golden_shapes[key]) << key;
  }
  EXPECT_EQ(i, file.tensors.size());
  model::ConditionalUnet unet(model::ConditionalUnetOptions::from_json(file.metadata.at("unet_options")));
  model::load_state_dict(*unet, file.tensors);
  EXPECT_EQ(unet->num_classes(), 3);

  // --classes all: one row per class, labels stored beside the images; sharding changes nothing
  // (chunks of 2 images: rank 0 makes two, rank 1 one, yet every pixel is the one-rank run's).
  auto h5 = path("all.h5"), h5_two = path("all2.h5");
  auto sampled = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --classes all --n 2 --steps 3 --batch 2 " +
                             "--out-h5 " + h5.string() + " --out " + path("all.png").string());
  ASSERT_EQ(sampled.exit_code, 0) << sampled.output;
  auto two = run_command(mpirun(2) + diffuse_exe() + " sample --ckpt " + ckpt +
                         " --classes all --n 2 --steps 3 --batch 2 --out-h5 " + h5_two.string());
  ASSERT_EQ(two.exit_code, 0) << two.output;
  auto samples = data::read_hdf5_tensors(h5);
  ASSERT_EQ(samples.tensors.size(), 2u);
  EXPECT_EQ(samples.tensors[0].second.sizes(), (std::vector<int64_t>{6, 16, 16, 3}));
  EXPECT_EQ(samples.tensors[1].first, "labels");
  EXPECT_TRUE(torch::equal(samples.tensors[1].second, torch::tensor({0, 0, 1, 1, 2, 2}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(data::read_hdf5_tensors(h5_two).tensors[0].second, samples.tensors[0].second));

  // --classes-file: one class per image.
  auto list = path("classes.txt");
  std::ofstream(list) << "2\n0, 1\n2\n";
  auto from_file = path("file.h5");
  auto filed = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --classes-file " + list.string() +
                           " --steps 3 --out-h5 " + from_file.string());
  ASSERT_EQ(filed.exit_code, 0) << filed.output;
  EXPECT_TRUE(torch::equal(data::read_hdf5_tensors(from_file).tensors[1].second,
                           torch::tensor({2, 0, 1, 2}, torch::kInt64)));

  // Refusals: no classes, a class out of range, a bad file entry.
  auto none = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --steps 3 --out-h5 " + path("x.h5").string());
  EXPECT_NE(none.exit_code, 0);
  EXPECT_NE(none.output.find("give --classes all"), std::string::npos) << none.output;
  auto range = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --classes 0,3 --steps 3 --out-h5 " +
                           path("x.h5").string());
  EXPECT_NE(range.exit_code, 0);
  EXPECT_NE(range.output.find("class 3 is outside [0, 3)"), std::string::npos) << range.output;
  std::ofstream(path("bad.txt")) << "1\nred\n";
  auto bad = run_command(diffuse_exe() + " sample --ckpt " + ckpt + " --classes-file " + path("bad.txt").string() +
                         " --steps 3 --out-h5 " + path("x.h5").string());
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("entry 2: 'red' is not a class number"), std::string::npos) << bad.output;

  // eval: each image's label (default) or one class for all.
  auto bound = [&](const std::string& extra) {
    auto result = run_command(diffuse_exe() + " eval --ckpt " + ckpt + " --data " + path("shapes16.h5").string() +
                              " --n 4 --batch 2 " + extra);
    EXPECT_EQ(result.exit_code, 0) << result.output;
    std::smatch m;
    EXPECT_TRUE(std::regex_search(result.output, m, std::regex(R"(total\s+([0-9.]+) bits/dim)"))) << result.output;
    return m.size() > 1 ? std::stod(m[1]) : -1.0;
  };
  double own = bound(""), fixed = bound("--classes 1");
  EXPECT_GT(own, 0.0);
  EXPECT_LT(own, 20.0);
  EXPECT_GT(fixed, 0.0);
  EXPECT_NE(own, fixed);  // the condition reaches the bound
  auto bad_eval = run_command(diffuse_exe() + " eval --ckpt " + ckpt + " --data " + path("shapes16.h5").string() +
                              " --n 4 --classes 5");
  EXPECT_NE(bad_eval.exit_code, 0);
  EXPECT_NE(bad_eval.output.find("class 5 is outside [0, 3)"), std::string::npos) << bad_eval.output;
}

}  // namespace
}  // namespace diffuse::testing
