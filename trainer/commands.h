// trainer/commands.h: the `diffuse` subcommands. Each add_*_command registers its options on the
// CLI and returns the action to run once MPI is up; main() owns parsing, MPI and error handling.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

#include "dist/context.h"

namespace diffuse::trainer {

/// What a subcommand does after parsing; returns the process exit code.
using CommandAction = std::function<int(const dist::Context&)>;

/// Registers the subcommand on `app`; `action` is set when the subcommand was chosen.
void add_doctor_command(CLI::App& app, CommandAction& action);

}  // namespace diffuse::trainer
