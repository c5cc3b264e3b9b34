#!/usr/bin/env bash
# Builds the NVMe test binaries and runs them in the ci/vm guest against the emulated
# controller. Exit status: 0 only if every test passed in the guest. Used by ci/test.sh.
#
# Usage: ci/vm/test.sh     (env as ci/vm/run.sh: CARMINE_VM_TIMEOUT, CARMINE_VM_DIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
# The path of each test binary cargo builds ("Executable tests/nvme.rs (target/...)").
binaries=$(cargo test -p carmine-storage --test nvme --no-run --locked 2>&1 |
  sed -n 's/^ *Executable .* (\(.*\))$/\1/p')
[ -n "$binaries" ] || { echo "ci/vm/test.sh: no test binary built" >&2; exit 1; }
cargo build --locked --bin carmine
export CARMINE_VM_TOOLS="$PWD/target/debug/carmine"
# shellcheck disable=SC2086
exec ci/vm/run.sh $binaries "$PWD/ci/vm/e2e.sh"
