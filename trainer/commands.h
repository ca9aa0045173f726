// trainer/commands.h: the `diffuse` subcommands. Each add_*_command registers its options on the
// CLI and sets the action to run once MPI is up; main() owns parsing, MPI and error handling.
#pragma once

#include <CLI/CLI.hpp>

#include <filesystem>
#include <functional>
#include <optional>

#include "dist/context.h"

namespace diffuse::trainer {

/// What a subcommand does after parsing; returns the process exit code.
using CommandAction = std::function<int(const dist::Context&)>;

void add_doctor_command(CLI::App& app, CommandAction& action);
void add_train_command(CLI::App& app, CommandAction& action);
void add_sample_command(CLI::App& app, CommandAction& action);
void add_export_command(CLI::App& app, CommandAction& action);
void add_eval_command(CLI::App& app, CommandAction& action);
/// `inspect PATH`: a dataset file (data) or a checkpoint directory.
void add_inspect_command(CLI::App& app, CommandAction& action);
/// `prep`: builds an HDF5 dataset (trainer/data_commands.cpp).
void add_prep_command(CLI::App& app, CommandAction& action);
/// Prints a dataset summary (and optionally a PNG grid of the first k images); returns the exit code.
int inspect_dataset_command(const std::filesystem::path& file, const std::optional<std::filesystem::path>& grid,
                            int64_t k);

}  // namespace diffuse::trainer
