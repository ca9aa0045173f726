#!/usr/bin/env bash
# launch/test.sh: the README's test command. Sets up (if needed), builds, and runs every test
# with ctest. Extra arguments go to ctest, e.g. `launch/test.sh -R model` or `-L mpi`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The launcher tests run a private one-node Slurm: have setup.sh install it (DIFFUSE_WITH_SLURM=0 opts out).
export DIFFUSE_WITH_SLURM="${DIFFUSE_WITH_SLURM:-1}"
"$DIFFUSE_ROOT/launch/setup.sh"
say "running tests (ctest in $DIFFUSE_BUILD_DIR)"
cd "$DIFFUSE_BUILD_DIR"
ctest --output-on-failure --timeout 900 "$@"
