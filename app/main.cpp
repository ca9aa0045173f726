// diffuse: the command-line entry point. Parses the subcommand, brings up MPI, sets up logging,
// runs the subcommand, and turns any exception on any rank into a logged message and an
// MPI_Abort, so one rank's failure never leaves the others waiting in a collective.
#include <CLI/CLI.hpp>

#include <iostream>
#include <optional>

#include "diffuse/build_config.h"
#include "dist/context.h"
#include "app/commands.h"
#include "trainer/logging.h"
#include "trainer/memory.h"

int main(int argc, char** argv) {
  using namespace diffuse;
  CLI::App app{"diffuse: train image diffusion models on many GPUs (MPI + NCCL), sample from them"};
  app.set_version_flag("--version", std::string("diffuse ") + DIFFUSE_VERSION + " (git " + git_hash() + ")");
  trainer::log::Options log_options;
  std::string log_dir;
  app.add_option("--log-level", log_options.level, std::string("Log level: ") + trainer::log::level_names())
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}));
  app.add_option("--log-dir", log_dir, "Write every rank's full log to DIR/rank-N.log");
  app.require_subcommand(1);

  app::CommandAction action;
  app::add_doctor_command(app, action);
  app::add_prep_command(app, action);
  app::add_inspect_command(app, action);
  app::add_train_command(app, action);
  app::add_sample_command(app, action);
  app::add_export_command(app, action);
  app::add_eval_command(app, action);
  app::add_stats_command(app, action);

  // CLI11 reports a misspelt subcommand as "a subcommand is required"; name it instead.
  for (int i = 1; i < argc; ++i) {
    std::string word = argv[i];
    if (word.empty() || word[0] == '-') {
      if (word == "--log-level" || word == "--log-dir") ++i;  // skip the option's value
      continue;
    }
    std::string known;
    bool found = false;
    for (const auto* sub : app.get_subcommands({})) {
      known += (known.empty() ? "" : ", ") + sub->get_name();
      found = found || sub->get_name() == word;
    }
    if (!found) {
      std::cerr << "diffuse: unknown subcommand '" << word << "'; expected one of: " << known
                << " (see diffuse --help)" << std::endl;
      return 2;
    }
    break;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  if (!log_dir.empty()) log_options.directory = log_dir;

  std::optional<dist::Context> ctx;
  try {
    ctx.emplace(dist::Context::init(&argc, &argv));
  } catch (const std::exception& error) {
    std::cerr << "diffuse: cannot start: " << error.what() << std::endl;
    return 2;
  }
  try {
    trainer::log::setup(ctx->rank(), ctx->world_size(), log_options);
    return action(*ctx);
  } catch (const std::exception& error) {
    // An allocation failure anywhere gets the allocator's words without LibTorch's C++ trace, and
    // what to change.
    if (trainer::is_out_of_memory(error)) {
      trainer::log::critical("[rank {}] out of memory: {}. Ask for less at once (--batch, --n, train.batch_size)",
                             ctx->rank(), trainer::error_text(error));
    } else {
      trainer::log::critical("[rank {}] {}", ctx->rank(), trainer::error_text(error));
    }
    trainer::log::flush();
    std::cerr.flush();
    if (ctx->world_size() > 1) ctx->abort(1);
    return 1;
  }
}
