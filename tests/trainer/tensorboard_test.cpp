// The TensorBoard writer and its TFRecord framing, read back in C++: CRC-32C against published
// vectors, framing round trips and damage detection, and the events a writer produces (parsed
// with the same .proto). That TensorBoard itself reads them is tensorboard_reader_test.py's job.
//
// Built without LibTorch (see tests/trainer/CMakeLists.txt), hence no tests/support.h.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <regex>
#include <set>

#include "trainer/tensorboard.h"
#include "trainer/tensorboard_event.pb.h"
#include "trainer/tfrecord.h"

namespace diffuse::trainer {
namespace {

namespace fs = std::filesystem;
namespace pb = diffuse::tensorboard;

/// A fresh directory for one test, removed afterwards.
class Scratch {
 public:
  Scratch() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::path(::testing::TempDir()) /
            ("diffuse-tb-" + std::to_string(::getpid()) + "-" + info->test_suite_name() + "-" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~Scratch() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "(no error)";
}

std::vector<pb::Event> read_events(const fs::path& file) {
  std::vector<pb::Event> events;
  for (const auto& record : tfrecord::read_records(file)) {
    pb::Event event;
    EXPECT_TRUE(event.ParseFromString(record));
    events.push_back(event);
  }
  return events;
}

std::vector<fs::path> event_files(const fs::path& directory) {
  std::set<fs::path> sorted;
  for (const auto& entry : fs::directory_iterator(directory)) sorted.insert(entry.path());
  return {sorted.begin(), sorted.end()};
}

/// The first 33 bytes of a PNG: signature and IHDR chunk (enough for the writer, which reads
/// only the header; the reader test uses real PNGs).
std::string png_header(uint32_t width, uint32_t height, uint8_t colour_type) {
  std::string png("\x89PNG\r\n\x1a\n", 8);
  auto be32 = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) png.push_back(static_cast<char>((v >> shift) & 0xff));
  };
  be32(13);
  png += "IHDR";
  be32(width);
  be32(height);
  png.push_back(8);  // bit depth
  png.push_back(static_cast<char>(colour_type));
  png.append(3, '\0');  // compression, filter, interlace
  be32(0);              // chunk CRC (not checked by the writer)
  return png;
}

// ---------------------------------------------------------------------------------------------
// CRC-32C and framing

TEST(Crc32c, PublishedVectors) {
  EXPECT_EQ(tfrecord::crc32c("123456789"), 0xE3069283u);  // the CRC catalogue's check value
  // RFC 3720 (iSCSI), appendix B.4.
  EXPECT_EQ(tfrecord::crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(tfrecord::crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending, descending;
  for (int i = 0; i < 32; ++i) {
    ascending.push_back(static_cast<char>(i));
    descending.push_back(static_cast<char>(31 - i));
  }
  EXPECT_EQ(tfrecord::crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(tfrecord::crc32c(descending), 0x113FDB5Cu);
  EXPECT_EQ(tfrecord::crc32c(""), 0u);
}

TEST(Crc32c, ContinuesAcrossPieces) {
  EXPECT_EQ(tfrecord::crc32c("6789", tfrecord::crc32c("12345")), 0xE3069283u);
}

TEST(Crc32c, MaskRotatesAndAddsTheDelta) {
  // ((0xE3069283 >> 15) | (0xE3069283 << 17)) + 0xa282ead8, modulo 2^32.
  EXPECT_EQ(tfrecord::masked_crc32c("123456789"), 0xC78AB0E5u);
}

std::string hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

TEST(TFRecord, FrameLayoutMatchesAnIndependentEncoder) {
  // Computed with a bit-by-bit CRC in Python (no table): length LE, masked CRCs LE.
  EXPECT_EQ(hex(tfrecord::frame("")), "000000000000000029039807d8ea82a2");
  EXPECT_EQ(hex(tfrecord::frame("diffuse")), "0700000000000000bbd79f11646966667573654ac13215");
}

TEST(TFRecord, RoundTripsRecordsOfEverySize) {
  Scratch dir;
  std::vector<std::string> records{"", "x", std::string(300, 'a'), std::string(70000, '\0')};
  for (int i = 0; i < 256; ++i) records[2][i] = static_cast<char>(i);
  {
    std::ofstream file(dir.path() / "r.tfrecord", std::ios::binary);
    for (const auto& record : records) file << tfrecord::frame(record);
  }
  EXPECT_EQ(tfrecord::read_records(dir.path() / "r.tfrecord"), records);
}

TEST(TFRecord, DamageIsDetectedAndLocated) {
  Scratch dir;
  auto path = dir.path() / "r.tfrecord";
  std::string good = tfrecord::frame("first") + tfrecord::frame("second record");
  size_t second = tfrecord::frame("first").size();
  auto write = [&](const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; };

  std::string bad_data = good;
  bad_data[second + 12 + 3] ^= 0x01;  // one bit of the second record's data
  write(bad_data);
  auto message = error_of([&] { tfrecord::read_records(path); });
  EXPECT_NE(message.find("data checksum mismatch"), std::string::npos) << message;
  EXPECT_NE(message.find("byte " + std::to_string(second)), std::string::npos) << message;
  EXPECT_NE(message.find(path.string()), std::string::npos) << message;

  std::string bad_length = good;
  bad_length[0] ^= 0x04;
  write(bad_length);
  message = error_of([&] { tfrecord::read_records(path); });
  EXPECT_NE(message.find("length checksum mismatch"), std::string::npos) << message;

  write(good.substr(0, good.size() - 2));
  message = error_of([&] { tfrecord::read_records(path); });
  EXPECT_NE(message.find("ends inside the data"), std::string::npos) << message;
}

// ---------------------------------------------------------------------------------------------
// Writer

TEST(TensorBoardWriter, FileNameFollowsTensorFlow) {
  EXPECT_EQ(tensorboard_event_file_name(1700000000, "node7", 4242, 0), "events.out.tfevents.1700000000.node7.4242.0");
  EXPECT_EQ(tensorboard_event_file_name(5, "h", 1, 12), "events.out.tfevents.0000000005.h.1.12");
}

TEST(TensorBoardWriter, EachWriterStartsItsOwnFileWithTheVersion) {
  Scratch dir;
  fs::path first, second;
  {
    TensorBoardWriter a(dir.path() / "tensorboard", {.wall_clock = [] { return 1700000000.25; }});
    TensorBoardWriter b(dir.path() / "tensorboard", {.wall_clock = [] { return 1700000000.25; }});
    first = a.path();
    second = b.path();
  }
  EXPECT_NE(first, second);
  std::regex name(R"(events\.out\.tfevents\.1700000000\.[^.]+\.[0-9]+\.[0-9]+)");
  EXPECT_TRUE(std::regex_match(first.filename().string(), name)) << first;
  EXPECT_EQ(event_files(dir.path() / "tensorboard").size(), 2u);
  auto events = read_events(first);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].file_version(), "brain.Event:2");
  EXPECT_DOUBLE_EQ(events[0].wall_time(), 1700000000.25);
  // A fresh run's session starts at step 0.
  ASSERT_TRUE(events[1].has_session_log());
  EXPECT_EQ(events[1].session_log().status(), pb::SessionLog::START);
  EXPECT_EQ(events[1].step(), 0);
}

TEST(TensorBoardWriter, ScalarsImagesAndTextAreReadableBeforeTheWriterCloses) {
  Scratch dir;
  double clock = 1700000000.0;
  TensorBoardWriter writer(dir.path(), {.wall_clock = [&] { return clock; }});
  clock += 1.5;
  writer.add_scalars({{"loss", 0.125}, {"loss/q0", 0.5}, {"lr", 8e-5}}, 100);
  writer.add_scalar("grad_norm", 2.0, 200);
  auto png = png_header(66, 34, 2) + "rest of the file";
  writer.add_image("samples", png, 200);
  writer.add_text("config", "model:\n  dim: 64\n", 0);

  // No flush or close: a crashed run must still show all of it.
  auto events = read_events(writer.path());
  ASSERT_EQ(events.size(), 6u);  // file_version, SessionLog START, then ours
  events.erase(events.begin());
  const auto& row = events[1];
  EXPECT_EQ(row.step(), 100);
  EXPECT_DOUBLE_EQ(row.wall_time(), 1700000001.5);
  ASSERT_EQ(row.summary().value_size(), 3);
  EXPECT_EQ(row.summary().value(1).tag(), "loss/q0");
  EXPECT_FLOAT_EQ(row.summary().value(0).simple_value(), 0.125f);
  EXPECT_FLOAT_EQ(row.summary().value(2).simple_value(), 8e-5f);
  EXPECT_EQ(events[2].step(), 200);
  EXPECT_EQ(events[2].summary().value(0).tag(), "grad_norm");

  const auto& image = events[3].summary().value(0);
  EXPECT_EQ(image.tag(), "samples");
  EXPECT_EQ(image.image().width(), 66);
  EXPECT_EQ(image.image().height(), 34);
  EXPECT_EQ(image.image().colorspace(), 3);  // PNG colour type 2 (RGB)
  EXPECT_EQ(image.image().encoded_image_string(), png);

  const auto& text = events[4].summary().value(0);
  EXPECT_EQ(events[4].step(), 0);
  EXPECT_EQ(text.metadata().plugin_data().plugin_name(), "text");
  EXPECT_EQ(text.metadata().data_class(), pb::DATA_CLASS_TENSOR);
  EXPECT_EQ(text.tensor().dtype(), pb::DT_STRING);
  EXPECT_TRUE(text.tensor().has_tensor_shape());
  EXPECT_EQ(text.tensor().tensor_shape().dim_size(), 0);
  ASSERT_EQ(text.tensor().string_val_size(), 1);
  EXPECT_EQ(text.tensor().string_val(0), "model:\n  dim: 64\n");
}

TEST(TensorBoardWriter, ImageColourSpacesComeFromThePngHeader) {
  Scratch dir;
  TensorBoardWriter writer(dir.path());
  // PNG colour type -> Summary.Image colorspace.
  std::vector<std::pair<uint8_t, int>> cases{{0, 1}, {4, 2}, {2, 3}, {3, 3}, {6, 4}};
  for (auto [type, colorspace] : cases) writer.add_image("x", png_header(1, 1, type), 0);
  auto events = read_events(writer.path());
  ASSERT_EQ(events.size(), cases.size() + 2);
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(events[i + 2].summary().value(0).image().colorspace(), cases[i].second) << int(cases[i].first);
  }
  auto message = error_of([&] { writer.add_image("grid", "GIF89a not a png at all, but long enough", 1); });
  EXPECT_NE(message.find("'grid'"), std::string::npos) << message;
  EXPECT_NE(message.find("not a PNG"), std::string::npos) << message;
  EXPECT_EQ(read_events(writer.path()).size(), cases.size() + 2);  // nothing written for it
}

TEST(TensorBoardWriter, AResumedRunsSessionStartsAfterTheCheckpointStep) {
  Scratch dir;
  TensorBoardWriter resumed(dir.path(), {.resumed_from = 3000});
  resumed.add_scalar("loss", 0.5, 3100);
  auto events = read_events(resumed.path());
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].file_version(), "brain.Event:2");
  ASSERT_TRUE(events[1].has_session_log());
  EXPECT_EQ(events[1].session_log().status(), pb::SessionLog::START);
  EXPECT_EQ(events[1].step(), 3001);
  EXPECT_EQ(events[2].step(), 3100);
}

TEST(TensorBoardWriter, AnUnwritableDirectoryNamesThePathAndTheWayOut) {
  Scratch dir;
  std::ofstream(dir.path() / "plain-file") << "x";
  auto message = error_of([&] { TensorBoardWriter writer(dir.path() / "plain-file" / "tensorboard"); });
  EXPECT_NE(message.find((dir.path() / "plain-file" / "tensorboard").string()), std::string::npos) << message;
  EXPECT_NE(message.find("log.tensorboard=false"), std::string::npos) << message;
}

}  // namespace
}  // namespace diffuse::trainer
