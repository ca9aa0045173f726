// trainer/tfrecord.h: TFRecord framing, the container of TensorBoard event files, and the
// CRC-32C (Castagnoli) checksum it uses.
//
// Each record on disk is
//   uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
// with masked_crc32c(x) = rotate_right(crc32c(x), 15) + 0xa282ead8, the masking TensorFlow uses
// so that a CRC stored beside its own data does not checksum to a fixed pattern.
//
//   std::string bytes = tfrecord::frame(serialized_event);      // append to the file
//   for (auto& record : tfrecord::read_records(path)) { ... }   // verifies both checksums
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace diffuse::trainer::tfrecord {

/// CRC-32C (Castagnoli polynomial 0x1EDC6F41, reflected) of `data`; pass a previous result as
/// `crc` to continue over several pieces. crc32c("123456789") == 0xE3069283.
uint32_t crc32c(std::string_view data, uint32_t crc = 0);

/// TFRecord's masked checksum of `data`.
uint32_t masked_crc32c(std::string_view data);

/// One framed record holding `data`.
std::string frame(std::string_view data);

/// Every record of a TFRecord file, each checked against both of its checksums. Throws
/// std::runtime_error naming the file and the record's byte offset when a checksum does not
/// match or the file ends inside a record.
std::vector<std::string> read_records(const std::filesystem::path& path);

}  // namespace diffuse::trainer::tfrecord
