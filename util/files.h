// util/files.h: file operations whose failures are never silent: durable writes (fsync of the file
// and, for renames to survive a power cut, of its directory), whole-file reads, and SHA-256.
// Every failure throws std::runtime_error naming the path and the system's reason.
#pragma once

#include <filesystem>
#include <string>

namespace diffuse::util {

/// fsync of a file or a directory. Filesystems that refuse fsync on directories (EINVAL) are
/// accepted: their renames are durable anyway.
void fsync_path(const std::filesystem::path& path, bool directory);

/// Creates or truncates `path`, writes `content` with every write checked, fsyncs and closes it.
/// Not atomic by itself: callers write into a temporary directory or name and rename.
void write_file_durably(const std::filesystem::path& path, const std::string& content);

/// The whole file as bytes.
std::string read_file(const std::filesystem::path& path);

/// Lower-case hex SHA-256 of a file's bytes (streamed) or of a string.
std::string sha256_of_file(const std::filesystem::path& path);
std::string sha256_of_string(const std::string& text);

}  // namespace diffuse::util
