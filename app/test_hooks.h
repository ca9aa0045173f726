// app/test_hooks.h: fault injection for the launcher tests, read from the environment by the
// program (never by library code) and handed to the Trainer. Never set these in a real run.
//
//   DIFFUSE_TEST_STALL_RANK=<r>             rank r's loader sleeps before its 4th batch, as a rank
//                                           stuck on a dead filesystem would (collective timeout test)
//   DIFFUSE_TEST_FAIL_CHECKPOINT_RANK=<r>   rank r's checkpoint shard write fails after the file exists
//   DIFFUSE_TEST_FAIL_CHECKPOINT_STEP=<s>   ... only for the save of step s
//   DIFFUSE_TEST_PLANTED_FID=<step:fid,...> the eval: section's FID at those steps is replaced by the
//                                           given values (e.g. 5:5,10:3,15:4), to test checkpoint.keep_best
#pragma once

#include "trainer/trainer.h"

namespace diffuse::app {

/// The hooks the DIFFUSE_TEST_* variables ask for on rank `rank` (empty when none is set).
trainer::TrainerHooks trainer_hooks_from_environment(int rank);

}  // namespace diffuse::app
