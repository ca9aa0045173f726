// app/commands.h: the `diffuse` subcommands. Each add_*_command registers its options on the
// CLI and sets the action to run once MPI is up; main() owns parsing, MPI and error handling.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>

#include "dist/context.h"

namespace diffuse::app {

/// A CLI11 check for counts: an integer >= 1, with a short message naming the value (CLI11's own
/// PositiveNumber prints the largest double as its bound).
CLI::Validator positive_integer();

/// What a subcommand does after parsing; returns the process exit code.
using CommandAction = std::function<int(const dist::Context&)>;

void add_doctor_command(CLI::App& app, CommandAction& action);
void add_train_command(CLI::App& app, CommandAction& action);
void add_sample_command(CLI::App& app, CommandAction& action);
void add_export_command(CLI::App& app, CommandAction& action);
void add_eval_command(CLI::App& app, CommandAction& action);
/// `diffuse stats`: reference feature statistics of a dataset (for `eval --fid`).
void add_stats_command(CLI::App& app, CommandAction& action);
/// `inspect PATH`: a dataset file (data) or a checkpoint directory.
void add_inspect_command(CLI::App& app, CommandAction& action);
/// `diffuse prep`: converts images into a dataset file (app/data_commands.cpp, data/prep.h).
void add_prep_command(CLI::App& app, CommandAction& action);

/// The dataset part of `diffuse inspect FILE.h5`: prints count, shape, dtype, chunking,
/// compression and the label histogram to stdout and, with `grid`, saves the first k images as
/// a PNG grid (an existing grid file is replaced only with `overwrite`). Throws naming the file
/// when it is not a valid dataset; returns the exit code.
int inspect_dataset_command(const std::filesystem::path& file, const std::optional<std::filesystem::path>& grid,
                            int64_t k, bool overwrite = false);

}  // namespace diffuse::app
