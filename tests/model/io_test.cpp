// Weights in and out: safetensors (round trips and every malformed-file
// case), and state dicts (PyTorch order, strict loading with actionable errors).
#include <gtest/gtest.h>

#include <fstream>

#include "model_support.h"
#include "support.h"

namespace diffuse::testing {
namespace {

TEST(Safetensors, RoundTripsEveryDtypeShapeAndMetadata) {
  TempDir dir;
  std::vector<std::pair<std::string, torch::Tensor>> tensors = {
      {"f32", torch::randn({3, 4})},
      {"f64", torch::randn({2}, torch::kFloat64)},
      {"f16", torch::randn({5}).to(torch::kHalf)},
      {"bf16", torch::randn({2, 2}).to(torch::kBFloat16)},
      {"i64", torch::tensor({int64_t{-5}, int64_t{1} << 40}, torch::kLong)},
      {"i32", torch::arange(7, torch::kInt)},
      {"i16", torch::arange(3, torch::kShort)},
      {"i8", torch::tensor({-128, 127}, torch::kChar)},
      {"u8", torch::tensor({0, 255}, torch::kByte)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::tensor(3.5f)},
      {"empty", torch::zeros({0, 3})},
      {"transposed", torch::arange(12, torch::kFloat).reshape({3, 4}).t()},  // non-contiguous
      {"unicode.\xc3\xa9", torch::ones({1})},
  };
  std::map<std::string, std::string> metadata{{"format", "pt"}, {"options", "{\"dim\":64}"}, {"quote\"d", "a\nb"}};
  model::save_safetensors(dir / "x.safetensors", tensors, metadata);
  auto file = model::load_safetensors(dir / "x.safetensors");
  EXPECT_EQ(file.metadata, metadata);
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(file.tensors[i].first, tensors[i].first);
    EXPECT_EQ(file.tensors[i].second.scalar_type(), tensors[i].second.scalar_type()) << tensors[i].first;
    EXPECT_TRUE(torch::equal(file.tensors[i].second, tensors[i].second)) << tensors[i].first;
  }
  // Layout: 8-byte length, a JSON object padded so the data starts 8-byte aligned, no temp file left.
  std::ifstream in(dir / "x.safetensors", std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(in.get(), '{');
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()), 1);
}

TEST(Safetensors, RefusesWhatItCannotWrite) {
  TempDir dir;
  auto p = dir / "x.safetensors";
  EXPECT_TRUE(throws_with([&] { model::save_safetensors(p, {{"a", torch::ones(1)}, {"a", torch::ones(1)}}); },
                          {"duplicate tensor name 'a'"}));
  EXPECT_TRUE(throws_with([&] { model::save_safetensors(p, {{"", torch::ones(1)}}); }, {"invalid tensor name"}));
  EXPECT_TRUE(throws_with([&] { model::save_safetensors(p, {{"c", torch::ones(1, torch::kComplexFloat)}}); },
                          {"tensor 'c'", "cannot store dtype"}));
  EXPECT_TRUE(throws_with([&] { model::save_safetensors(dir / "no/such/dir/x.safetensors", {}); },
                          {"no/such/dir", "does not exist"}));
  EXPECT_FALSE(std::filesystem::exists(p));
  // An existing file is replaced only when asked; a device node never.
  model::save_safetensors(p, {{"a", torch::ones(1)}});
  EXPECT_TRUE(throws_with([&] { model::save_safetensors(p, {{"a", torch::zeros(1)}}); }, {"exists", "--overwrite"}));
  EXPECT_EQ(model::load_safetensors(p).tensors[0].second.item<float>(), 1.0f);
  model::save_safetensors(p, {{"a", torch::zeros(1)}}, {}, /*overwrite=*/true);
  EXPECT_EQ(model::load_safetensors(p).tensors[0].second.item<float>(), 0.0f);
  EXPECT_TRUE(throws_with([&] { model::save_safetensors("/dev/null", {{"a", torch::ones(1)}}, {}, true); },
                          {"character device"}));
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/null"));
}

// Writes a file from parts: header length (default: the header's), header text, data bytes.
std::filesystem::path craft(const TempDir& dir, const std::string& header, const std::string& data,
                            std::optional<uint64_t> length = std::nullopt) {
  static int counter = 0;
  auto path = dir / ("crafted-" + std::to_string(counter++) + ".safetensors");
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = length.value_or(header.size());
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
  return path;
}

TEST(Safetensors, ReadsAHandWrittenFile) {
  TempDir dir;
  const float values[3] = {1.5f, -2.0f, 0.25f};
  std::string data(reinterpret_cast<const char*>(values), 12);
  data += std::string("\x01\x00", 2);
  auto path = craft(dir,
                    R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[12,14]},)"
                    R"("a":{"dtype":"F32","shape":[3],"data_offsets":[0,12],"extra":1},"__metadata__":{"k":"v"}}   )",
                    data);
  auto file = model::load_safetensors(path);
  ASSERT_EQ(file.tensors.size(), 2u);
  EXPECT_EQ(file.tensors[0].first, "a");  // offset order
  EXPECT_TRUE(torch::equal(file.tensors[0].second, torch::tensor({1.5f, -2.0f, 0.25f})));
  EXPECT_TRUE(torch::equal(file.tensors[1].second, torch::tensor({true, false})));
  EXPECT_EQ(file.metadata.at("k"), "v");
}

TEST(Safetensors, RejectsEveryMalformedFile) {
  TempDir dir;
  const std::string f32x2 = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string eight(8, '\0');
  struct Case {
    std::string label, header, data;
    std::optional<uint64_t> length;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases_ = {
      {"header too large", "{}", "", 200'000'000, {"header length 200000000 exceeds"}},
      {"header past end", f32x2, eight, 10'000, {"runs past the end of the file", "truncated"}},
      {"not json", "{\"t\": ", "", {}, {"not valid JSON", "unexpected end"}},
      {"not utf-8", "{\"\xff\":1}", "", {}, {"not valid JSON", "invalid UTF-8"}},
      {"not an object", "[1, 2]", "", {}, {"must be a JSON object, got array"}},
      {"entry not an object", R"({"t": 5})", "", {}, {"tensor 't'", "entry must be an object"}},
      {"missing dtype", R"({"t":{"shape":[2],"data_offsets":[0,8]}})", eight, {}, {"tensor 't'", "needs dtype"}},
      {"missing offsets", R"({"t":{"dtype":"F32","shape":[2]}})", eight, {}, {"data_offsets"}},
      {"unknown dtype", R"({"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", eight, {},
       {"unknown dtype 'F33'", "F32"}},
      {"negative dim", R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight, {}, {"non-negative"}},
      {"fractional dim", R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", eight, {}, {"non-integer"}},
      {"shape overflow", R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}})", eight, {},
       {"overflows"}},
      {"size mismatch", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight, {},
       {"hold 8 bytes", "needs 12"}},
      {"end before begin", R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", eight, {}, {"< begin"}},
      {"three offsets", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", eight, {}, {"[begin, end]"}},
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
       eight, {}, {"overlaps"}},
      {"gap", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight, {}, {"gap of 4 unused bytes"}},
      {"truncated data", f32x2, std::string(5, '\0'), {}, {"data ends at 8", "holds only 5", "truncated"}},
      {"trailing bytes", f32x2, std::string(12, '\0'), {}, {"4 bytes after the last tensor"}},
      {"metadata not strings", R"({"__metadata__":{"k":1}})", "", {}, {"__metadata__", "must be a string"}},
      {"metadata not object", R"({"__metadata__":[]})", "", {}, {"__metadata__ must be an object"}},
      {"duplicate names", R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"t":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
       "", {}, {"duplicate key \"t\""}},
      {"bool out of range", R"({"t":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", std::string("\x01\x02", 2), {},
       {"BOOL", "other than 0 and 1"}},
  };
  for (const auto& c : cases_) {
    auto path = craft(dir, c.header, c.data, c.length);
    std::vector<std::string> needles = c.needles;
    needles.push_back(path.string());
    EXPECT_TRUE(throws_with([&] { model::load_safetensors(path); }, needles)) << c.label;
  }
  // Too short to hold the length field, and missing.
  auto tiny = dir / "tiny.safetensors";
  std::ofstream(tiny, std::ios::binary) << "abc";
  EXPECT_TRUE(throws_with([&] { model::load_safetensors(tiny); }, {"3 bytes", "shorter than the 8-byte"}));
  EXPECT_TRUE(throws_with([&] { model::load_safetensors(dir / "none.safetensors"); }, {"none.safetensors", "cannot open"}));
  EXPECT_TRUE(throws_with([&] { model::load_safetensors(dir.path()); }, {"not a regular file"}));
}

// ---------------------------------------------------------------------------------------------
// state dicts

struct LeafImpl : torch::nn::Module {
  LeafImpl() {
    register_buffer("stat", torch::zeros({2}));
    register_parameter("w", torch::ones({2, 3}));
  }
};
TORCH_MODULE(Leaf);

struct TreeImpl : torch::nn::Module {
  TreeImpl() {
    register_module("child", Leaf());
    register_parameter("own", torch::zeros({1}));
    register_buffer("own_buffer", torch::ones({4}));
  }
};
TORCH_MODULE(Tree);

TEST(StateDict, FollowsPyTorchOrder) {
  Tree tree;
  std::vector<std::string> names;
  for (const auto& [k, v] : model::state_dict(*tree)) names.push_back(k);
  // Own parameters, own buffers, then children (each the same way), whatever the registration order.
  EXPECT_EQ(names, (std::vector<std::string>{"own", "own_buffer", "child.w", "child.stat"}));
}

TEST(StateDict, LoadCopiesByNameAndConverts) {
  Tree tree;
  model::load_state_dict(*tree, {{"child.stat", torch::tensor({1.0, 2.0}, torch::kFloat64)},
                                 {"own", torch::tensor({7.0f})},
                                 {"own_buffer", torch::arange(4, torch::kFloat)},
                                 {"child.w", torch::full({2, 3}, 3.0f)}});
  auto sd = model::state_dict(*tree);
  EXPECT_EQ(sd[0].second.item<float>(), 7.0f);
  EXPECT_TRUE(torch::equal(sd[3].second, torch::tensor({1.0f, 2.0f})));
  EXPECT_EQ(sd[3].second.scalar_type(), torch::kFloat);
  EXPECT_TRUE(tree->named_parameters()["own"].requires_grad());
}

TEST(StateDict, StrictLoadingListsEveryProblemAndChangesNothing) {
  Tree tree;
  const std::vector<std::pair<std::string, torch::Tensor>> bad = {
      {"own", torch::tensor({5.0f})},        {"child.w", torch::zeros({3, 2})},  // shape
      {"unknown.key", torch::zeros({1})},    {"own", torch::zeros({1})},         // duplicate
  };
  EXPECT_TRUE(throws_with([&] { model::load_state_dict(*tree, bad); },
                          {"2 missing, 1 unexpected, 2 other", "missing key: own_buffer [4]", "missing key: child.stat [2]",
                           "unexpected key: unknown.key [1]", "shape mismatch for 'child.w': the module expects [2, 3], got [3, 2]",
                           "key 'own' given twice"}));
  EXPECT_EQ(model::state_dict(*tree)[0].second.item<float>(), 0.0f) << "nothing may be copied on error";
  // Non-strict: missing and unexpected keys are fine, shapes are still checked.
  EXPECT_NO_THROW(model::load_state_dict(*tree, {{"own", torch::tensor({5.0f})}, {"extra", torch::ones(1)}}, false));
  EXPECT_EQ(model::state_dict(*tree)[0].second.item<float>(), 5.0f);
  EXPECT_TRUE(throws_with([&] { model::load_state_dict(*tree, {{"child.w", torch::zeros({1})}}, false); },
                          {"shape mismatch"}));
}

TEST(StateDict, UnetSurvivesASafetensorsRoundTrip) {
  TempDir dir;
  auto options = tiny_unet_options(3, {1, 2});
  options.self_condition = true;
  torch::manual_seed(1);
  model::Unet a(options);
  model::save_safetensors(dir / "unet.safetensors", model::state_dict(*a), {{"unet_options", options.to_json()}});
  auto file = model::load_safetensors(dir / "unet.safetensors");
  torch::manual_seed(2);
  model::Unet b(model::UnetOptions::from_json(file.metadata.at("unet_options")));
  model::load_state_dict(*b, file.tensors);
  a->eval();
  b->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 3, 8, 8});
  auto t = torch::tensor({1, 500}, torch::kLong);
  EXPECT_TRUE(torch::equal(a->forward(x, t, x), b->forward(x, t, x)));
}

}  // namespace
}  // namespace diffuse::testing
