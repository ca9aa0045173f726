// RemoveOnSignal in a forked child: the signal removes the file and still ends the process with
// that signal; ignored signals stay ignored; a disarmed guard leaves the file alone.
#include "util/remove_on_signal.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>

#include "support.h"

namespace diffuse::util {
namespace {
namespace fs = std::filesystem;

// Forks a child that prepares its signals with `setup`, arms a guard on `path` (armed = true)
// or arms and disarms it, reports ready through a pipe and waits to be signalled.
pid_t start_child(const fs::path& path, bool armed, void (*setup)()) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(ready[0]);
    setup();
    std::ofstream(path) << "half-written";
    {
      RemoveOnSignal guard(path);
      if (armed) {
        char byte = 1;
        (void)!::write(ready[1], &byte, 1);
        for (;;) ::pause();
      }
    }
    char byte = 1;
    (void)!::write(ready[1], &byte, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char byte = 0;
  (void)!::read(ready[0], &byte, 1);
  ::close(ready[0]);
  return pid;
}

// The child's end: the signal that killed it, or -1.
int termination_signal(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFSIGNALED(status) ? WTERMSIG(status) : -1;
}

void default_signals() {
  // ctest started from a non-interactive shell in the background inherits SIGINT ignored.
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
}

TEST(RemoveOnSignal, InterruptAndTerminateRemoveTheFileAndStillEndTheProcess) {
  testing::TempDir dir;
  for (int signal : {SIGINT, SIGTERM}) {
    const auto path = dir / ("partial-" + std::to_string(signal));
    pid_t child = start_child(path, /*armed=*/true, default_signals);
    ASSERT_GT(child, 0);
    ASSERT_TRUE(fs::exists(path));
    ::kill(child, signal);
    EXPECT_EQ(termination_signal(child), signal);
    EXPECT_FALSE(fs::exists(path)) << "signal " << signal;
  }
}

TEST(RemoveOnSignal, LeavesIgnoredSignalsIgnored) {
  testing::TempDir dir;
  const auto path = dir / "partial";
  pid_t child = start_child(path, /*armed=*/true, [] {
    default_signals();
    ::signal(SIGHUP, SIG_IGN);  // as under nohup
  });
  ASSERT_GT(child, 0);
  ::kill(child, SIGHUP);
  // Linux delivers pending signals lowest number first: a handled HUP would end the child with SIGHUP.
  ::kill(child, SIGTERM);
  EXPECT_EQ(termination_signal(child), SIGTERM);
  EXPECT_FALSE(fs::exists(path));
}

TEST(RemoveOnSignal, DisarmedGuardLeavesTheFile) {
  testing::TempDir dir;
  const auto path = dir / "finished";
  pid_t child = start_child(path, /*armed=*/false, default_signals);
  ASSERT_GT(child, 0);
  ::kill(child, SIGTERM);
  EXPECT_EQ(termination_signal(child), SIGTERM);
  EXPECT_TRUE(fs::exists(path));
}

}  // namespace
}  // namespace diffuse::util
