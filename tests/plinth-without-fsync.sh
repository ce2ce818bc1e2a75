#!/usr/bin/env bash
# plinth with fsync, fdatasync, sync and O_SYNC turned into no-ops (libeatmydata, preloaded), for
# one measurement only: how fast a lifecycle would be if plinth persisted nothing durably, the
# floor under the control-path ratios. Never a way to run plinth. Use it as the harness's plinth:
#   tests/bench.sh --only control --kinds block --plinth tests/plinth-without-fsync.sh
# The preload reaches the tools plinth runs too (mkfs syncs its device), so only a block cycle,
# which runs none, measures plinth's own share exactly.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec eatmydata "${PLINTH_DURABLE_BIN:-${CARGO_TARGET_DIR:-$here/target}/release/plinth}" "$@"
