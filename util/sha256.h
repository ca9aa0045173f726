// util/sha256.h: SHA-256 digests (OpenSSL) of bytes and files, as lowercase hex.
//
//   util::Sha256 sha;
//   sha.update(header.data(), header.size());
//   std::string hex = sha.hex_digest();          // 64 hex digits
//   std::string of_file = util::sha256_file("shard-00000-of-00002.h5");
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

namespace diffuse::util {

/// An incremental SHA-256.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(const void* data, std::size_t size);
  void update(std::string_view bytes) { update(bytes.data(), bytes.size()); }
  /// The digest as 64 lowercase hex digits; the object is spent afterwards.
  std::string hex_digest();

 private:
  struct Context;
  std::unique_ptr<Context> context_;
};

/// SHA-256 of `bytes`, as hex.
std::string sha256_hex(std::string_view bytes);

/// SHA-256 of a file's contents, as hex; throws naming the file when it cannot be read.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace diffuse::util
