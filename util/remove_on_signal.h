// util/remove_on_signal.h: removes a half-written file when the process is interrupted, so
// Ctrl-C or a `kill` during a long write (`diffuse prep`) leaves no large temporary behind.
//
//   util::AtomicFile file(output, overwrite, ".incomplete-");
//   util::RemoveOnSignal guard(file.temporary());   // SIGINT, SIGTERM, SIGHUP: unlink, then die
//   (or arm it first with AtomicFile::temporary_for(output, marker), before the file exists)
//   ... write ...
//   file.commit();                                  // guard disarms when it goes out of scope
#pragma once

#include <filesystem>

namespace diffuse::util {

/// While alive, SIGINT, SIGTERM and SIGHUP remove `path` and then end the process the way the
/// signal would have (exit status 128 + signal number in a shell). The handler calls only
/// async-signal-safe functions (unlink, raise) on a path stored beforehand. Signals that were
/// ignored (SIG_IGN, e.g. SIGINT of a background job) or that the program handles itself are
/// left alone. The previous dispositions come back on destruction. One file per process: while
/// a guard is alive, another one does nothing (armed() is false).
class RemoveOnSignal {
 public:
  explicit RemoveOnSignal(const std::filesystem::path& path);
  ~RemoveOnSignal();
  RemoveOnSignal(const RemoveOnSignal&) = delete;
  RemoveOnSignal& operator=(const RemoveOnSignal&) = delete;

  /// Whether this guard removes its file on a signal.
  bool armed() const { return owner_; }

 private:
  bool owner_ = false;
};

}  // namespace diffuse::util
