#!/usr/bin/env bash
# Builds the NVMe test binaries and carmine, and runs them in the ci/vm guest against the
# emulated controllers: storage/tests/nvme.rs (the driver), the nvme_ tests of
# storage/tests/queue_pair.rs (the QueuePair contract every backend keeps, and no allocation
# per I/O), then ci/vm/e2e.sh (mkfs, serve, load --verify, restart, kill -9, fsck).
# Exit status: 0 only if every test passed in the guest. Used by ci/test.sh.
#
# Usage: ci/vm/test.sh     (env as ci/vm/run.sh: CARMINE_VM_TIMEOUT, CARMINE_VM_DIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
# The path of each test binary cargo builds ("Executable tests/nvme.rs (target/...)"); the
# queue_pair binary runs only its nvme_ tests (the shared QueuePair contract on NVMe).
binaries=$(cargo test -p carmine-storage --test nvme --test queue_pair --no-run --locked 2>&1 |
  sed -n -e 's/^ *Executable tests\/queue_pair.rs (\(.*\))$/\1::nvme_/p' \
    -e 's/^ *Executable tests\/nvme.rs (\(.*\))$/\1/p')
[ -n "$binaries" ] || { echo "ci/vm/test.sh: no test binary built" >&2; exit 1; }
cargo build --locked --bin carmine
export CARMINE_VM_TOOLS="$PWD/target/debug/carmine"
# shellcheck disable=SC2086
exec ci/vm/run.sh $binaries "$PWD/ci/vm/e2e.sh"
