// MPI bootstrap. Everything MPI-specific in the project's public headers stops here: callers see
// ranks and sizes, never MPI_Comm.
#include "dist/context.h"

#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "diffuse/build_config.h"
#include "dist/mpi_check.h"

#if DIFFUSE_WITH_CUDA
#include <nccl.h>
#endif

namespace diffuse::dist {

std::optional<LauncherWorld> launcher_world_size() {
  // OpenMPI's daemon sets OMPI_COMM_WORLD_SIZE for every rank it starts (srun, also with PMIx,
  // does not), so it comes first: `mpirun` inside a Slurm allocation starts its daemons on the
  // other nodes with srun (one task per node), and the ranks there inherit that step's
  // SLURM_STEP_ID and SLURM_NTASKS=1, the daemons' step, not the job's world.
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", "PMIX_SIZE"}) {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') continue;
    char* end = nullptr;
    long size = std::strtol(value, &end, 10);
    if (end == value || *end != '\0' || size < 1) continue;
    // SLURM_NTASKS is set for the whole allocation even when the program is started directly
    // inside `salloc`/`sbatch` without srun; only trust it when this process is a Slurm step task.
    if (std::string(name) == "SLURM_NTASKS" && std::getenv("SLURM_STEP_ID") == nullptr) continue;
    return LauncherWorld{name, static_cast<int>(size)};
  }
  return std::nullopt;
}

void check_launcher_world(const std::optional<LauncherWorld>& launcher, int mpi_world_size) {
  if (!launcher || launcher->size == mpi_world_size) return;
  throw std::runtime_error(
      "the launcher started " + std::to_string(launcher->size) + " tasks (" + launcher->variable +
      "=" + std::to_string(launcher->size) + ") but MPI sees a world of " +
      std::to_string(mpi_world_size) +
      ": the tasks could not find each other and would train separate models. Under Slurm launch "
      "with `srun --mpi=pmix ...` (check `srun --mpi=list`), or use `mpirun` inside the "
      "allocation; make sure diffuse runs against the MPI library the launcher belongs to.");
}

std::string mpi_library_version() {
  char buffer[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(buffer, &length);
  std::string version(buffer, static_cast<size_t>(length));
  while (!version.empty() && (version.back() == '\n' || version.back() == '\0')) version.pop_back();
  return version;
}

std::optional<std::string> nccl_version() {
#if DIFFUSE_WITH_CUDA
  int code = 0;
  if (ncclGetVersion(&code) != ncclSuccess) return std::nullopt;
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return std::to_string(code / 10000) + "." + std::to_string((code % 10000) / 100) + "." +
         std::to_string(code % 100);
#else
  return std::nullopt;
#endif
}

Context Context::init(int* argc, char*** argv) {
  Context ctx;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    DIFFUSE_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &ctx.thread_level_));
    ctx.owns_mpi_ = true;
  } else {
    MPI_Query_thread(&ctx.thread_level_);
  }
  if (ctx.thread_level_ < MPI_THREAD_FUNNELED) {
    throw std::runtime_error("the MPI library granted thread level " +
                             std::to_string(ctx.thread_level_) +
                             ", diffuse needs at least MPI_THREAD_FUNNELED");
  }
  // Errors come back as codes we turn into exceptions, instead of MPI aborting the job silently.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  DIFFUSE_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &ctx.world_.rank));
  DIFFUSE_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &ctx.world_.world_size));

  MPI_Comm node_comm = MPI_COMM_NULL;
  DIFFUSE_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, ctx.world_.rank,
                                        MPI_INFO_NULL, &node_comm));
  DIFFUSE_MPI_CHECK(MPI_Comm_rank(node_comm, &ctx.world_.local_rank));
  DIFFUSE_MPI_CHECK(MPI_Comm_size(node_comm, &ctx.world_.local_world_size));
  MPI_Comm_free(&node_comm);

  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  ctx.world_.hostname = host;

  try {
    check_launcher_world(launcher_world_size(), ctx.world_.world_size);
  } catch (const std::exception&) {
    // With several ranks, some may have passed the check and gone on: MPI_Finalize here would
    // wait for them forever, before main() could even print why. Exiting without it lets the
    // launcher end the job (mpirun, srun --kill-on-bad-exit) with the message shown.
    if (ctx.world_.world_size > 1) ctx.owns_mpi_ = false;
    throw;
  }
  return ctx;
}

Context::Context(Context&& other) noexcept
    : world_(std::move(other.world_)), thread_level_(other.thread_level_), owns_mpi_(other.owns_mpi_) {
  other.owns_mpi_ = false;
}

Context::~Context() {
  if (!owns_mpi_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void Context::abort(int exit_code) const {
  MPI_Abort(MPI_COMM_WORLD, exit_code == 0 ? 1 : exit_code);
  std::_Exit(exit_code == 0 ? 1 : exit_code);  // MPI_Abort does not return; this satisfies [[noreturn]]
}

void Context::barrier() const { DIFFUSE_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); }

std::vector<std::string> Context::gather_strings(const std::string& mine) const {
  int length = static_cast<int>(mine.size());
  std::vector<int> lengths(is_root() ? world_size() : 0);
  DIFFUSE_MPI_CHECK(MPI_Gather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, MPI_COMM_WORLD));
  std::vector<int> offsets(lengths.size(), 0);
  int total = 0;
  for (size_t r = 0; r < lengths.size(); ++r) {
    offsets[r] = total;
    total += lengths[r];
  }
  std::string joined(static_cast<size_t>(total), '\0');
  DIFFUSE_MPI_CHECK(MPI_Gatherv(mine.data(), length, MPI_CHAR, joined.data(), lengths.data(),
                                offsets.data(), MPI_CHAR, 0, MPI_COMM_WORLD));
  std::vector<std::string> all;
  for (size_t r = 0; r < lengths.size(); ++r) all.push_back(joined.substr(offsets[r], lengths[r]));
  return all;
}

long long Context::max_over_ranks(long long mine) const {
  long long result = mine;
  DIFFUSE_MPI_CHECK(MPI_Allreduce(&mine, &result, 1, MPI_LONG_LONG, MPI_MAX, MPI_COMM_WORLD));
  return result;
}

std::string Context::broadcast_string(const std::string& value, int root) const {
  if (root < 0 || root >= world_size()) {
    throw std::invalid_argument("broadcast_string: root " + std::to_string(root) +
                                " is not a rank of a world of " + std::to_string(world_size()));
  }
  unsigned long long length = rank() == root ? value.size() : 0;
  DIFFUSE_MPI_CHECK(MPI_Bcast(&length, 1, MPI_UNSIGNED_LONG_LONG, root, MPI_COMM_WORLD));
  std::string result = rank() == root ? value : std::string(static_cast<size_t>(length), '\0');
  // MPI counts are ints: send in chunks so a string over 2 GiB still works.
  constexpr unsigned long long kChunk = 1ull << 30;
  for (unsigned long long offset = 0; offset < length; offset += kChunk) {
    int count = static_cast<int>(std::min(kChunk, length - offset));
    DIFFUSE_MPI_CHECK(MPI_Bcast(result.data() + offset, count, MPI_CHAR, root, MPI_COMM_WORLD));
  }
  return result;
}

}  // namespace diffuse::dist
