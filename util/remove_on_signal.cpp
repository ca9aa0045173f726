// The signal handler may run on any thread at any point, so it touches only a fixed buffer filled
// before it was installed, and calls only unlink() and raise() (both async-signal-safe). With
// SA_RESETHAND the disposition is already back to the default when the handler runs; the raised
// signal stays blocked until the handler returns, then ends the process as it would have.
#include "util/remove_on_signal.h"

#include <limits.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <stdexcept>

namespace diffuse::util {
namespace {

constexpr int kSignals[] = {SIGINT, SIGTERM, SIGHUP};
constexpr int kSignalCount = sizeof(kSignals) / sizeof(kSignals[0]);

char g_path[PATH_MAX];
volatile sig_atomic_t g_armed = 0;
std::atomic<bool> g_in_use{false};
struct sigaction g_previous[kSignalCount];
bool g_installed[kSignalCount];

extern "C" void remove_and_die(int signal) {
  if (g_armed) ::unlink(g_path);
  ::raise(signal);
}

}  // namespace

RemoveOnSignal::RemoveOnSignal(const std::filesystem::path& path) {
  const std::string absolute = std::filesystem::absolute(path).string();
  if (absolute.size() >= sizeof(g_path)) {
    throw std::invalid_argument("RemoveOnSignal: path too long: " + absolute);
  }
  if (g_in_use.exchange(true)) return;
  owner_ = true;
  std::memcpy(g_path, absolute.c_str(), absolute.size() + 1);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  g_armed = 1;
  for (int i = 0; i < kSignalCount; ++i) {
    struct sigaction current {};
    sigaction(kSignals[i], nullptr, &current);
    // Leave ignored signals ignored, and signals the program handles itself to the program.
    g_installed[i] = !(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_DFL;
    if (!g_installed[i]) continue;
    struct sigaction action {};
    action.sa_handler = remove_and_die;
    sigemptyset(&action.sa_mask);
    for (int other : kSignals) sigaddset(&action.sa_mask, other);
    action.sa_flags = SA_RESETHAND;
    sigaction(kSignals[i], &action, &g_previous[i]);
  }
}

RemoveOnSignal::~RemoveOnSignal() {
  if (!owner_) return;
  for (int i = 0; i < kSignalCount; ++i) {
    if (g_installed[i]) sigaction(kSignals[i], &g_previous[i], nullptr);
  }
  g_armed = 0;
  g_in_use = false;
}

}  // namespace diffuse::util
