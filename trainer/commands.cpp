// The subcommands' option definitions. Their work lives in the library files they call.
#include "trainer/commands.h"

#include <memory>

#include "trainer/doctor.h"

namespace diffuse::trainer {

void add_doctor_command(CLI::App& app, CommandAction& action) {
  auto* cmd = app.add_subcommand(
      "doctor", "Report this environment per rank (versions, GPUs, MPI, HDF5) and check it is usable");
  auto device = std::make_shared<std::string>("auto");
  cmd->add_option("--device", *device, "Which run to check for: auto (CUDA when a GPU is visible), cpu, cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->callback([&action, device] {
    action = [device](const dist::Context& ctx) { return run_doctor(ctx, parse_device_request(*device)); };
  });
}

}  // namespace diffuse::trainer
