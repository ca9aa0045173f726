// Compiled without LibTorch's include paths (target diffuse_tensorboard): LibTorch ships
// protobuf 3.13 headers, which would shadow Debian's 3.21 that the generated code needs. Nothing
// protobuf-typed crosses the header, so the rest of the trainer never sees either.
#include "trainer/tensorboard.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "trainer/log_sink.h"
#include "trainer/tensorboard_event.pb.h"
#include "trainer/tfrecord.h"

namespace diffuse::trainer {
namespace {

namespace pb = diffuse::tensorboard;

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

struct PngHeader {
  int32_t width = 0, height = 0, colorspace = 0;
};

uint32_t big_endian32(const std::string& bytes, size_t at) {
  uint32_t value = 0;
  for (size_t i = 0; i < 4; ++i) value = (value << 8) | static_cast<uint8_t>(bytes[at + i]);
  return value;
}

/// Size and colour space from the IHDR chunk, which the PNG specification puts first.
PngHeader read_png_header(const std::string& png, const std::string& tag) {
  static const std::string signature("\x89PNG\r\n\x1a\n", 8);
  if (png.size() < 33 || png.compare(0, 8, signature) != 0 || png.compare(12, 4, "IHDR") != 0) {
    throw std::invalid_argument("TensorBoard image '" + tag + "': the bytes given (" + std::to_string(png.size()) +
                                ") are not a PNG file");
  }
  PngHeader header;
  header.width = static_cast<int32_t>(big_endian32(png, 16));
  header.height = static_cast<int32_t>(big_endian32(png, 20));
  // PNG colour types -> Summary.Image colorspace (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA); a
  // palette image displays as RGB.
  switch (static_cast<uint8_t>(png[25])) {
    case 0: header.colorspace = 1; break;
    case 4: header.colorspace = 2; break;
    case 2:
    case 3: header.colorspace = 3; break;
    case 6: header.colorspace = 4; break;
    default:
      throw std::invalid_argument("TensorBoard image '" + tag + "': unknown PNG colour type " +
                                  std::to_string(static_cast<uint8_t>(png[25])));
  }
  return header;
}

pb::Event event_at(double wall_time, int64_t step) {
  pb::Event event;
  event.set_wall_time(wall_time);
  event.set_step(step);
  return event;
}

pb::Summary::Value* add_value(pb::Event& event, const std::string& tag) {
  auto* value = event.mutable_summary()->add_value();
  value->set_tag(tag);
  return value;
}

std::string serialize(const pb::Event& event) {
  std::string bytes;
  if (!event.SerializeToString(&bytes)) throw std::runtime_error("TensorBoard: could not serialise an event");
  return bytes;
}

}  // namespace

std::string tensorboard_event_file_name(int64_t unix_seconds, const std::string& host, int64_t pid,
                                        int64_t sequence) {
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%010lld", static_cast<long long>(unix_seconds));
  return std::string("events.out.tfevents.") + seconds + "." + host + "." + std::to_string(pid) + "." +
         std::to_string(sequence);
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& directory, TensorBoardOptions options)
    : options_(std::move(options)) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) {
    throw std::runtime_error("cannot create the TensorBoard directory " + directory.string() + ": " +
                             error.message() + " (set log.tensorboard=false to run without it)");
  }
  // The sequence number keeps two writers of one process apart within the same second.
  static std::atomic<int64_t> sequence{0};
  path_ = directory / tensorboard_event_file_name(static_cast<int64_t>(std::floor(now())), host_name(), ::getpid(),
                                                  sequence++);
  // "x": never append to (or truncate) another writer's file.
  file_ = std::fopen(path_.c_str(), "wbx");
  if (file_ == nullptr) {
    throw std::runtime_error("cannot create the TensorBoard event file " + path_.string() + ": " +
                             std::strerror(errno) + " (set log.tensorboard=false to run without it)");
  }
  pb::Event header;
  header.set_wall_time(now());
  header.set_file_version("brain.Event:2");
  write_event(serialize(header));
  auto start = event_at(now(), options_.resumed_from ? *options_.resumed_from + 1 : 0);
  start.mutable_session_log()->set_status(pb::SessionLog::START);
  write_event(serialize(start));
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_ == nullptr) return;
  try {
    flush();
  } catch (const std::exception& error) {
    log::write(log::Level::warn, error.what());
  }
  std::fclose(file_);
}

double TensorBoardWriter::now() const {
  if (options_.wall_clock) return options_.wall_clock();
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void TensorBoardWriter::write_event(const std::string& serialized_event) {
  auto record = tfrecord::frame(serialized_event);
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size() || std::fflush(file_) != 0) {
    throw std::runtime_error("cannot write to the TensorBoard event file " + path_.string() + ": " +
                             std::strerror(errno));
  }
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  add_scalars({{tag, value}}, step);
}

void TensorBoardWriter::add_scalars(const std::vector<std::pair<std::string, double>>& values, int64_t step) {
  auto event = event_at(now(), step);
  for (const auto& [tag, value] : values) add_value(event, tag)->set_simple_value(static_cast<float>(value));
  write_event(serialize(event));
}

void TensorBoardWriter::add_image(const std::string& tag, const std::string& png, int64_t step) {
  auto header = read_png_header(png, tag);
  auto event = event_at(now(), step);
  auto* image = add_value(event, tag)->mutable_image();
  image->set_height(header.height);
  image->set_width(header.width);
  image->set_colorspace(header.colorspace);
  image->set_encoded_image_string(png);
  write_event(serialize(event));
}

void TensorBoardWriter::add_text(const std::string& tag, const std::string& text, int64_t step) {
  auto event = event_at(now(), step);
  auto* entry = add_value(event, tag);
  // What tensorboard.plugins.text writes: plugin "text", its TextPluginData content (version 0,
  // which serialises to nothing), and a scalar DT_STRING tensor.
  auto* metadata = entry->mutable_metadata();
  metadata->mutable_plugin_data()->set_plugin_name("text");
  metadata->set_data_class(pb::DATA_CLASS_TENSOR);
  auto* tensor = entry->mutable_tensor();
  tensor->set_dtype(pb::DT_STRING);
  tensor->mutable_tensor_shape();  // present and empty: rank 0
  tensor->add_string_val(text);
  write_event(serialize(event));
}

void TensorBoardWriter::flush() {
  if (std::fflush(file_) != 0 || ::fsync(::fileno(file_)) != 0) {
    throw std::runtime_error("cannot flush the TensorBoard event file " + path_.string() + ": " +
                             std::strerror(errno));
  }
}

}  // namespace diffuse::trainer
