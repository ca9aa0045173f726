// trainer/run_lock.h: one job per run directory. The lock is a file, RUN/run.lock, created with
// O_CREAT|O_EXCL (atomic on local filesystems, NFSv3 and later, and Lustre, where flock() may be
// missing or node-local) and holding who owns it: host, PID, Slurm/Open MPI job id and start time.
// It lives as long as the owning job; the owner removes it on exit.
//
// Limits: a job killed hard (SIGKILL, node loss) leaves its lock behind. The next job takes it over
// when the lock is provably stale (same host and that PID is gone) or its own (a requeued Slurm
// job with the same job id); otherwise it refuses, names the holder and says how to recover.
#pragma once

#include <filesystem>
#include <string>

namespace diffuse::trainer {

class RunLock {
 public:
  /// Takes the lock of `run_dir` (which must exist) or throws std::runtime_error naming the
  /// holder. `warning` receives a note when a stale lock was taken over.
  static RunLock acquire(const std::filesystem::path& run_dir, std::string* warning = nullptr);

  RunLock(RunLock&& other) noexcept;
  RunLock& operator=(RunLock&&) = delete;
  RunLock(const RunLock&) = delete;
  ~RunLock();  ///< removes the lock file if this process still owns it

  const std::filesystem::path& path() const { return path_; }

 private:
  explicit RunLock(std::filesystem::path path, std::string owner) : path_(std::move(path)), owner_(std::move(owner)) {}
  std::filesystem::path path_;
  std::string owner_;  ///< the text written into the lock, to recognise it as ours on release
};

/// This process as a lock holder: "host=... pid=... job=... started=..." (one line).
std::string lock_owner_text();

}  // namespace diffuse::trainer
