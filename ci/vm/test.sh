#!/usr/bin/env bash
# Builds the NVMe test binaries and runs them in the ci/vm guest against the emulated
# controller. Exit status: 0 only if every test passed in the guest. Used by ci/test.sh.
#
# Usage: ci/vm/test.sh     (env as ci/vm/run.sh: CARMINE_VM_TIMEOUT, CARMINE_VM_DIR)
set -euo pipefail
cd "$(dirname "$0")/../.."
# The path of each test binary cargo builds, from its JSON messages.
binaries=$(cargo test -p carmine-storage --test nvme --no-run --locked --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") and message["profile"]["test"]:
        print(message["executable"])
')
[ -n "$binaries" ] || { echo "ci/vm/test.sh: no test binary built" >&2; exit 1; }
# shellcheck disable=SC2086
exec ci/vm/run.sh $binaries
