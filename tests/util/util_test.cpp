// util_test: the strict JSON reader/writer, the formatter, and file helpers.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "support.h"
#include "util/files.h"
#include "util/format.h"
#include "util/json.h"

namespace diffuse::testing {
namespace {

namespace json = util::json;

TEST(Json, ParsesDocuments) {
  auto v = json::parse(R"( {"a": [1, -2, 3.5e2, 0], "b": {"c": null, "d": true, "e": false},
                            "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"} )");
  const auto& a = v.find("a")->as_array();
  ASSERT_EQ(a.size(), 4u);
  EXPECT_EQ(a[0].as_int64(), 1);
  EXPECT_EQ(a[1].as_int64(), -2);
  EXPECT_EQ(a[2].as_double(), 350.0);
  EXPECT_EQ(a[3].as_uint64(), 0u);
  EXPECT_TRUE(v.find("b")->find("c")->is_null());
  EXPECT_TRUE(v.find("b")->find("d")->as_bool());
  EXPECT_EQ(v.find("s")->as_string(), "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80");
  EXPECT_EQ(v.find("missing"), nullptr);
  EXPECT_EQ(json::parse("18446744073709551615").as_uint64(), 18446744073709551615ull);
  EXPECT_EQ(json::parse("-9223372036854775808").as_int64(), INT64_MIN);
}

TEST(Json, RejectsEverythingOutsideTheGrammar) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "unexpected end"},           {"{", "unexpected end"},
      {"[1,]", "unexpected character"}, {"{\"a\":1,}", "expected a string key"},
      {"01", "leading zeros"},          {"1.", "expected a digit"},
      {"-", "expected a digit"},        {"+1", "unexpected character"},
      {"NaN", "unexpected character"},  {"tru", "invalid literal"},
      {"\"abc", "unterminated string"}, {"\"a\x01\"", "control character"},
      {"\"\\x\"", "invalid escape"},    {"\"\\u12g4\"", "hex digit"},
      {"\"\\udc00\"", "unpaired low"},  {"\"\\ud800x\"", "unpaired high"},
      {"{\"a\":1,\"a\":2}", "duplicate key \"a\""},
      {"[1] 2", "after the JSON value"}, {"\"\xff\"", "invalid UTF-8"},
      {"\"\xc0\xaf\"", "invalid UTF-8"},  // overlong '/'
      {"\"\xed\xa0\x80\"", "invalid UTF-8"},  // encoded surrogate
      {std::string(65, '[') + std::string(65, ']'), "deeper than 64"},
  };
  for (const auto& [text, needle] : bad) {
    EXPECT_TRUE(throws_with([&] { json::parse(text); }, {"JSON error at byte", needle})) << text;
  }
  EXPECT_NO_THROW(json::parse(std::string(64, '[') + std::string(64, ']')));
}

TEST(Json, ConversionsCheckTypeAndRange) {
  EXPECT_TRUE(throws_with([] { json::parse("1.5").as_int64(); }, {"non-integer"}));
  EXPECT_TRUE(throws_with([] { json::parse("1e3").as_int64(); }, {"non-integer"}));
  EXPECT_TRUE(throws_with([] { json::parse("9223372036854775808").as_int64(); }, {"out of range"}));
  EXPECT_TRUE(throws_with([] { json::parse("-1").as_uint64(); }, {"non-negative"}));
  EXPECT_TRUE(throws_with([] { json::parse("\"1\"").as_int64(); }, {"expected an integer, got string"}));
  EXPECT_TRUE(throws_with([] { json::parse("1e999").as_double(); }, {"out of the range"}));
  EXPECT_TRUE(throws_with([] { json::parse("[]").as_object(); }, {"expected an object, got array"}));
}

TEST(Json, QuoteAndNumberRoundTrip) {
  const std::string s = "tab\there \"quoted\" back\\slash \x01 \xc3\xa9";
  EXPECT_EQ(json::parse(json::quote(s)).as_string(), s);
  for (double v : {0.0, -0.5, 0.1, 1e-300, 123456789.125, 10000.0, 0.995}) {
    EXPECT_EQ(json::parse(json::number(v)).as_double(), v);
  }
  EXPECT_THROW(json::number(std::nan("")), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// safetensors


TEST(Format, BytesDurationsShapesDtypesSteps) {
  EXPECT_EQ(util::format_bytes(512), "512 B");
  EXPECT_EQ(util::format_bytes(1536), "1.5 KiB");
  EXPECT_EQ(util::format_bytes(3.0 * 1024 * 1024 * 1024), "3.0 GiB");
  EXPECT_EQ(util::format_duration(3725.9), "1:02:05");
  EXPECT_EQ(util::format_duration(-1), "?");
  EXPECT_EQ(util::format_duration(NAN), "?");
  EXPECT_EQ(util::format_shape(std::vector<int64_t>{64, 3, 3, 3}), "[64, 3, 3, 3]");
  EXPECT_EQ(util::format_shape(std::vector<int64_t>{}), "[]");
  EXPECT_EQ(util::dtype_name(c10::ScalarType::BFloat16), "bfloat16");
  EXPECT_EQ(util::dtype_from_name("uint8"), c10::ScalarType::Byte);
  EXPECT_FALSE(util::dtype_from_name("F32").has_value());
  EXPECT_EQ(util::step_name(1200), "step-001200");
  EXPECT_EQ(util::step_name(12345678), "step-12345678");
  EXPECT_EQ(util::parse_step_name("step-001200"), 1200);
  EXPECT_FALSE(util::parse_step_name("step-12a").has_value());
  EXPECT_FALSE(util::parse_step_name("step-").has_value());
  EXPECT_FALSE(util::parse_step_name("steps-1").has_value());
}

TEST(Files, DurableWriteAndRead) {
  TempDir dir;
  auto path = dir.path() / "a.txt";
  util::write_file_durably(path, "abc");
  EXPECT_EQ(util::read_file(path), "abc");
  util::write_file_durably(path, "de");  // truncates
  EXPECT_EQ(util::read_file(path), "de");
  EXPECT_NE(error_of([&] { util::read_file(dir.path() / "missing"); }).find("missing"), std::string::npos);
  EXPECT_NE(error_of([&] { util::write_file_durably(dir.path() / "no" / "such" / "dir", "x"); }).find("no/such"),
            std::string::npos);
}

}  // namespace
}  // namespace diffuse::testing
