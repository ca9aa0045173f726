#include "trainer/run_directory.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <cmath>
#include <iomanip>
#include <regex>
#include <sstream>
#include <stdexcept>

#include "util/json.h"

#include "util/durable_file.h"

namespace diffuse::trainer {

namespace json = util::json;

std::string step_name(int64_t step) {
  std::ostringstream name;
  name << "step-" << std::setw(6) << std::setfill('0') << step;
  return name.str();
}

std::filesystem::path RunDirectory::sample_grid(int64_t step) const { return samples() / (step_name(step) + ".png"); }

void RunDirectory::create() const {
  for (const auto& dir : {root, logs(), samples(), checkpoints()}) {
    std::error_code error;
    std::filesystem::create_directories(dir, error);
    if (error) throw std::runtime_error("cannot create run directory " + dir.string() + ": " + error.message());
  }
}

MetricsLogger::MetricsLogger(std::filesystem::path path) : path_(std::move(path)) {}

void MetricsLogger::truncate_after(int64_t step) {
  std::ifstream in(path_);
  if (!in) return;
  static const std::regex step_field(R"("step":\s*(-?[0-9]+))");
  std::vector<std::string> kept;
  std::string line;
  while (std::getline(in, line)) {
    std::smatch match;
    if (!std::regex_search(line, match, step_field)) continue;  // a torn last line from a crash
    if (std::stoll(match[1]) <= step) kept.push_back(line);
  }
  in.close();
  std::string text;
  for (const auto& l : kept) text += l + "\n";
  util::write_file(path_, text, /*overwrite=*/true);  // checked, temporary + rename
}

void MetricsLogger::write(const std::vector<std::pair<std::string, double>>& numbers,
                          const std::vector<std::pair<std::string, std::string>>& strings) {
  std::ostringstream line;
  line << "{";
  bool first = true;
  for (const auto& [key, value] : numbers) {
    line << (first ? "" : ", ") << json::quote(key) << ": ";
    if (std::isfinite(value)) {
      line << std::setprecision(std::abs(value - std::round(value)) < 1e-12 && std::abs(value) < 1e15 ? 15 : 7) << value;
    } else {
      line << "null";  // JSON has no inf/NaN
    }
    first = false;
  }
  for (const auto& [key, value] : strings) {
    line << (first ? "" : ", ") << json::quote(key) << ": " << json::quote(value);
    first = false;
  }
  line << "}\n";
  // One checked append per line: a full disk is an error, never a silently torn history.
  int fd = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot append to " + path_.string() + ": " + std::strerror(errno));
  const std::string text = line.str();
  util::write_all(fd, text.data(), text.size(), path_);
  if (::close(fd) != 0) throw std::runtime_error("cannot append to " + path_.string() + ": " + std::strerror(errno));
}

}  // namespace diffuse::trainer
