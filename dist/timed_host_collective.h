// dist/timed_host_collective.h: the world's host messages (HostCollective) with a deadline.
//
//   dist::TimedHostCollective host(ctx, std::chrono::seconds(600));
//   CheckpointStore store(dir, host, ...);   // a save never waits forever for a rank it lost
//   host.max_over_ranks(stop_requested);     // throws after 600 s instead of hanging
//
// Context's own collectives block until every rank arrives: forever when a rank's node is cut off
// the network (its TCP connections report nothing; packets just stop) or died without closing
// them. These post the same messages as non-blocking MPI collectives on the world and poll them
// against a deadline; past it they throw, naming the operation, its size and the rank, like a
// Communicator timeout. The world is then unusable: the caller ends the job (Context::abort).
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "dist/context.h"

namespace diffuse::dist {

class TimedHostCollective final : public HostCollective {
 public:
  /// `timeout` must be positive; it bounds each call's wait for the other ranks.
  TimedHostCollective(const Context& ctx, std::chrono::milliseconds timeout);

  int rank() const override { return ctx_.rank(); }
  int world_size() const override { return ctx_.world_size(); }
  long long max_over_ranks(long long mine) const override;
  std::vector<std::string> gather_strings(const std::string& mine) const override;
  std::string broadcast_string(const std::string& value, int root) const override;

 private:
  const Context& ctx_;
  std::chrono::milliseconds timeout_;
};

}  // namespace diffuse::dist
