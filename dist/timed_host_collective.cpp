// Non-blocking MPI collectives on MPI_COMM_WORLD, tested until done or past the deadline. On the
// world (not a duplicate), so they interleave in program order with Context's blocking ones.
#include "dist/timed_host_collective.h"

#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <thread>

#include "dist/mpi_check.h"

namespace diffuse::dist {

namespace {

using Clock = std::chrono::steady_clock;

std::string bytes_text(unsigned long long bytes) { return std::to_string(bytes) + " bytes"; }

}  // namespace

TimedHostCollective::TimedHostCollective(const Context& ctx, std::chrono::milliseconds timeout)
    : ctx_(ctx), timeout_(timeout) {
  if (timeout.count() <= 0) {
    throw std::invalid_argument("host collective timeout must be positive, got " + std::to_string(timeout.count()) +
                                " ms");
  }
}

namespace {

// Waits for `request` until `timeout` has passed; the wait yields first, then sleeps briefly, so a
// rank waiting for a slow peer costs little CPU.
void wait_for(MPI_Request& request, std::chrono::milliseconds timeout, const std::string& what, int rank,
              int world_size) {
  const auto deadline = Clock::now() + timeout;
  for (int polls = 0;; ++polls) {
    int done = 0;
    DIFFUSE_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (Clock::now() > deadline) {
      throw std::runtime_error("MPI " + what + " on rank " + std::to_string(rank) + " of " +
                               std::to_string(world_size) + " did not complete within " +
                               std::to_string(timeout.count()) +
                               " ms: a peer rank died, is stuck, cannot be reached over the network, or issued a "
                               "different collective. The world is no longer usable.");
    }
    if (polls < 1000) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

}  // namespace

long long TimedHostCollective::max_over_ranks(long long mine) const {
  long long result = mine;
  MPI_Request request = MPI_REQUEST_NULL;
  DIFFUSE_MPI_CHECK(MPI_Iallreduce(&mine, &result, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD, &request));
  wait_for(request, timeout_, "all_reduce(max) of 1 x int64 (host)", rank(), world_size());
  return result;
}

std::vector<std::string> TimedHostCollective::gather_strings(const std::string& mine) const {
  if (mine.size() > static_cast<size_t>(INT_MAX)) {
    throw std::invalid_argument("gather_strings: " + bytes_text(mine.size()) + " exceed MPI's int count");
  }
  const std::string what = "gather(strings) of " + bytes_text(mine.size()) + " from this rank";
  int length = static_cast<int>(mine.size());
  std::vector<int> lengths(is_root() ? world_size() : 0);
  MPI_Request request = MPI_REQUEST_NULL;
  DIFFUSE_MPI_CHECK(MPI_Igather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, MPI_COMM_WORLD, &request));
  wait_for(request, timeout_, what, rank(), world_size());
  std::vector<int> offsets(lengths.size(), 0);
  long long total = 0;
  for (size_t r = 0; r < lengths.size(); ++r) {
    offsets[r] = static_cast<int>(total);
    total += lengths[r];
    if (total > INT_MAX) throw std::invalid_argument("gather_strings: the ranks' strings exceed MPI's int count");
  }
  std::string joined(static_cast<size_t>(total), '\0');
  DIFFUSE_MPI_CHECK(MPI_Igatherv(mine.data(), length, MPI_CHAR, joined.data(), lengths.data(), offsets.data(),
                                 MPI_CHAR, 0, MPI_COMM_WORLD, &request));
  wait_for(request, timeout_, what, rank(), world_size());
  std::vector<std::string> all;
  for (size_t r = 0; r < lengths.size(); ++r) all.push_back(joined.substr(offsets[r], lengths[r]));
  return all;
}

std::string TimedHostCollective::broadcast_string(const std::string& value, int root) const {
  if (root < 0 || root >= world_size()) {
    throw std::invalid_argument("broadcast_string: root " + std::to_string(root) + " is not a rank of a world of " +
                                std::to_string(world_size()));
  }
  unsigned long long length = rank() == root ? value.size() : 0;
  MPI_Request request = MPI_REQUEST_NULL;
  DIFFUSE_MPI_CHECK(MPI_Ibcast(&length, 1, MPI_UNSIGNED_LONG_LONG, root, MPI_COMM_WORLD, &request));
  const std::string what = "broadcast(root " + std::to_string(root) + ") of a host string";
  wait_for(request, timeout_, what, rank(), world_size());
  std::string result = rank() == root ? value : std::string(static_cast<size_t>(length), '\0');
  // MPI counts are ints: chunks, so a string over 2 GiB still works.
  constexpr unsigned long long kChunk = 1ull << 30;
  for (unsigned long long offset = 0; offset < length; offset += kChunk) {
    int count = static_cast<int>(std::min(kChunk, length - offset));
    DIFFUSE_MPI_CHECK(MPI_Ibcast(result.data() + offset, count, MPI_CHAR, root, MPI_COMM_WORLD, &request));
    wait_for(request, timeout_, what + " (" + bytes_text(length) + ")", rank(), world_size());
  }
  return result;
}

}  // namespace diffuse::dist
