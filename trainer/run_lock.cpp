// trainer/run_lock.cpp: see run_lock.h.
#include "trainer/run_lock.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>

#include "util/files.h"
#include "util/format.h"

namespace diffuse::trainer {
namespace fs = std::filesystem;

namespace {

std::string hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

/// The launcher's job id: Slurm's, else Open MPI's, else "none".
std::string job_id() {
  for (const char* name : {"SLURM_JOB_ID", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"}) {
    const char* value = std::getenv(name);
    if (value != nullptr && *value != '\0') return std::string(name) + ":" + value;
  }
  return "none";
}

std::map<std::string, std::string> parse_owner(const std::string& text) {
  std::map<std::string, std::string> fields;
  std::istringstream in(text);
  for (std::string word; in >> word;) {
    auto eq = word.find('=');
    if (eq != std::string::npos) fields[word.substr(0, eq)] = word.substr(eq + 1);
  }
  return fields;
}

/// Creates the lock file with our text; false when it already exists.
bool try_create(const fs::path& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return false;
    throw std::runtime_error("cannot create the run lock " + path.string() + ": " + std::strerror(errno));
  }
  std::string line = text + "\n";
  bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  int code = errno;
  ::close(fd);
  if (!ok) {
    ::unlink(path.c_str());
    throw std::runtime_error("cannot write the run lock " + path.string() + ": " + std::strerror(code));
  }
  return true;
}

// A killed rank stays a zombie until its parent, or the init process after mpirun is gone, reaps
// it: kill(pid, 0) still succeeds, yet it holds no files and will never write again.
bool process_running(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;  // no /proc: trust kill()
  // The state follows the command name, which is in parentheses and may itself hold ") ".
  const auto close = line.rfind(')');
  if (close == std::string::npos || close + 2 >= line.size()) return true;
  const char state = line[close + 2];
  return state != 'Z' && state != 'X';
}

}  // namespace

std::string lock_owner_text() {
  return "host=" + hostname() + " pid=" + std::to_string(::getpid()) + " job=" + job_id() +
         " started=" + util::utc_timestamp();
}

RunLock RunLock::acquire(const fs::path& run_dir, std::string* warning) {
  const fs::path path = run_dir / "run.lock";
  const std::string mine = lock_owner_text();
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (try_create(path, mine)) return RunLock(path, mine);
    std::string held;
    try {
      held = util::read_file(path);
    } catch (const std::exception&) {
      continue;  // released between our create and our read: try again
    }
    while (!held.empty() && (held.back() == '\n' || held.back() == '\r')) held.pop_back();
    auto holder = parse_owner(held);
    const bool same_host = holder["host"] == hostname();
    const long pid = std::atol(holder["pid"].c_str());
    const bool dead = same_host && pid > 0 && !process_running(static_cast<pid_t>(pid));
    const bool requeued_self = holder["job"] != "none" && holder["job"].rfind("SLURM_JOB_ID:", 0) == 0 &&
                               holder["job"] == job_id();
    if (dead || requeued_self) {
      if (warning) {
        *warning = "took over the stale run lock " + path.string() + " (" + held + "): " +
                   (dead ? "that process no longer exists" : "it belongs to this Slurm job before its requeue");
      }
      ::unlink(path.c_str());
      continue;
    }
    throw std::runtime_error(
        "run directory " + run_dir.string() + " is in use by another job (" + held +
        "). Two jobs in one run directory would overwrite each other's checkpoints and metrics: wait for "
        "it to finish, or use another --run-dir. If that job is no longer running (check on " +
        (holder["host"].empty() ? std::string("its host") : holder["host"]) +
        " with ps, or with squeue/sacct for its job id), remove " + path.string() + " and start again.");
  }
  throw std::runtime_error("could not take the run lock " + path.string() + ": it keeps changing hands");
}

RunLock::RunLock(RunLock&& other) noexcept : path_(std::move(other.path_)), owner_(std::move(other.owner_)) {
  other.owner_.clear();
}

RunLock::~RunLock() {
  if (owner_.empty()) return;
  try {
    std::string held = util::read_file(path_);
    if (held.rfind(owner_, 0) == 0) ::unlink(path_.c_str());  // never remove a lock someone took over
  } catch (const std::exception&) {
  }
}

}  // namespace diffuse::trainer
