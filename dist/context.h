// dist/context.h: the MPI world a process belongs to: bootstrap, identity, and job-wide abort.
//
//   auto ctx = diffuse::dist::Context::init(&argc, &argv);   // in main(), once
//   if (ctx.rank() == 0) ...;
//   ctx.abort("rank 3 lost its data file");                 // ends every rank
//
// A process started without a launcher is a world of one. There are no globals: main() owns
// the Context and passes it down.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace diffuse::dist {

/// Who this process is inside the job.
struct WorldInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        ///< rank among the processes on this node (MPI_COMM_TYPE_SHARED)
  int local_world_size = 1;  ///< processes on this node
  std::string hostname;
};

/// The world size the launcher meant to start, read from its environment
/// (SLURM_NTASKS under srun, OMPI_COMM_WORLD_SIZE under OpenMPI, PMI_SIZE under PMI launchers).
/// Returns the variable's name and value, or nothing when no launcher variable is set.
struct LauncherWorld {
  std::string variable;
  int size = 1;
};
std::optional<LauncherWorld> launcher_world_size();

/// Throws when MPI came up with a world of `mpi_world_size` but the launcher meant `launcher`:
/// the classic symptom of `srun` without `--mpi=pmix`, where N tasks become N worlds of one
/// and would train N separate models.
void check_launcher_world(const std::optional<LauncherWorld>& launcher, int mpi_world_size);

/// MPI library identification, e.g. "Open MPI v4.1.4, ...".
std::string mpi_library_version();

/// NCCL version ("2.28.9") of the library this process loaded, or nothing in a build without CUDA.
std::optional<std::string> nccl_version();

/// The few host messages (small strings and integers, not tensors) that protocols such as the
/// checkpoint store's need: implemented by Context over MPI and by SoloCollective for one process
/// without MPI (tools, tests).
class HostCollective {
 public:
  virtual ~HostCollective() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  bool is_root() const { return rank() == 0; }
  /// The largest of every rank's value, returned on every rank.
  virtual long long max_over_ranks(long long mine) const = 0;
  /// Rank 0 receives every rank's string in rank order; the other ranks an empty vector.
  virtual std::vector<std::string> gather_strings(const std::string& mine) const = 0;
  /// Rank `root`'s string, returned on every rank.
  virtual std::string broadcast_string(const std::string& value, int root) const = 0;
};

/// A world of one process, without MPI.
class SoloCollective final : public HostCollective {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  long long max_over_ranks(long long mine) const override { return mine; }
  std::vector<std::string> gather_strings(const std::string& mine) const override { return {mine}; }
  std::string broadcast_string(const std::string& value, int) const override { return value; }
};

class Context final : public HostCollective {
 public:
  /// MPI_Init_thread (MPI_THREAD_MULTIPLE requested, at least FUNNELED required), then the
  /// launcher world check. Throws with a message on failure.
  static Context init(int* argc, char*** argv);

  Context(Context&&) noexcept;
  Context& operator=(Context&&) = delete;
  Context(const Context&) = delete;
  ~Context();  ///< MPI_Finalize (after a barrier-free shutdown; collectives must be finished)

  const WorldInfo& world() const { return world_; }
  int rank() const override { return world_.rank; }
  int world_size() const override { return world_.world_size; }
  int local_rank() const { return world_.local_rank; }
  int local_world_size() const { return world_.local_world_size; }
  /// The thread level MPI granted (MPI_THREAD_*).
  int thread_level() const { return thread_level_; }

  /// Ends the whole job (MPI_Abort) so no rank is left waiting in a collective.
  /// The caller logs the reason first; this function does not print.
  [[noreturn]] void abort(int exit_code) const;

  /// Blocks until every rank arrives (MPI_Barrier on the world).
  void barrier() const;

  /// Collects one string from every rank; rank 0 receives all of them in rank order, the other
  /// ranks an empty vector. For reports and consistency checks, not for tensors.
  std::vector<std::string> gather_strings(const std::string& mine) const override;

  /// The largest of every rank's value, returned on every rank (e.g. an exit code all agree on).
  long long max_over_ranks(long long mine) const override;

  /// Rank `root`'s string, returned on every rank (the other ranks' `value` is ignored). For
  /// small host messages (a path, a manifest), not for tensors.
  std::string broadcast_string(const std::string& value, int root) const override;

 private:
  Context() = default;
  WorldInfo world_;
  int thread_level_ = 0;
  bool owns_mpi_ = false;
};

}  // namespace diffuse::dist
