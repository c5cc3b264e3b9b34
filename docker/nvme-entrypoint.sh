#!/usr/bin/env bash
# The carmine-nvme image's entry point (docker/Dockerfile.nvme): boots the ci/vm guest with the
# carmine binary and runs ci/vm/e2e.sh in it against the emulated NVMe controller. Exit status
# 0 only if the guest reports every step passed. Env as ci/vm/run.sh (CARMINE_VM_TIMEOUT).
set -euo pipefail
export CARMINE_VM_TOOLS=/usr/local/bin/carmine CARMINE_VM_DIR=${CARMINE_VM_DIR:-/tmp/vm}
exec /opt/carmine/ci/vm/run.sh /opt/carmine/ci/vm/e2e.sh
