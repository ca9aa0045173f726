// A byte-at-a-time table CRC: event files are written a few records per logging interval, so
// speed is irrelevant and the small table keeps it obviously correct.
#include "trainer/tfrecord.h"

#include <array>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace diffuse::trainer::tfrecord {
namespace {

constexpr uint32_t kReflectedPolynomial = 0x82F63B78;  // 0x1EDC6F41 bit-reversed
constexpr uint32_t kMaskDelta = 0xa282ead8;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? kReflectedPolynomial : 0);
    table[i] = crc;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = make_table();

void put_le(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

uint64_t get_le(std::string_view in, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= static_cast<uint64_t>(static_cast<uint8_t>(in[i])) << (8 * i);
  return value;
}

}  // namespace

uint32_t crc32c(std::string_view data, uint32_t crc) {
  crc = ~crc;
  for (char c : data) crc = kTable[(crc ^ static_cast<uint8_t>(c)) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(std::string_view data) {
  uint32_t crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + kMaskDelta;
}

std::string frame(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 16);
  put_le(out, data.size(), 8);
  put_le(out, masked_crc32c(out), 4);
  out.append(data);
  put_le(out, masked_crc32c(data), 4);
  return out;
}

std::vector<std::string> read_records(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open TFRecord file " + path.string());
  std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::string_view rest(bytes);
  std::vector<std::string> records;
  auto fail = [&](const std::string& what) {
    throw std::runtime_error(path.string() + ": " + what + " in the record at byte " +
                             std::to_string(bytes.size() - rest.size()) + " (the file is damaged or still being written)");
  };
  while (!rest.empty()) {
    if (rest.size() < 12) fail("the file ends inside the length header");
    uint64_t length = get_le(rest, 8);
    if (get_le(rest.substr(8), 4) != masked_crc32c(rest.substr(0, 8))) fail("length checksum mismatch");
    if (rest.size() - 12 < length + 4) fail("the file ends inside the data");
    auto data = rest.substr(12, length);
    if (get_le(rest.substr(12 + length), 4) != masked_crc32c(data)) fail("data checksum mismatch");
    records.emplace_back(data);
    rest.remove_prefix(12 + length + 4);
  }
  return records;
}

}  // namespace diffuse::trainer::tfrecord
