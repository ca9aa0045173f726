// util/files.h: whole-file reads, and a durable write for files inside a directory that is itself
// renamed into place later (a checkpoint's step-N.tmp/). For a file replaced on its own, use
// util::write_file or util::AtomicFile (durable_file.h). Failures throw naming the path.
#pragma once

#include <filesystem>
#include <string>

namespace diffuse::util {

/// Creates or truncates `path`, writes `content` with every write checked, fsyncs and closes it.
void write_file_durably(const std::filesystem::path& path, const std::string& content);

/// The whole file as bytes.
std::string read_file(const std::filesystem::path& path);

}  // namespace diffuse::util
