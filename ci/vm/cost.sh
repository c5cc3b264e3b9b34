#!/usr/bin/env bash
# Counts instructions per 4 KiB read in the NVMe driver's submit+poll path, under callgrind in
# the ci/vm guest against the emulated controller. EMULATION: the count is the driver's own
# instructions (submit_read + poll, inclusive), which TCG does not change; device latency and
# MMIO cost are not those of real hardware. Not run by ci/test.sh (a measurement, not a test).
#
# Usage: ci/vm/cost.sh     prints CARMINE-COST lines (zero-copy and bounced reads)
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(cargo test --release -p carmine-storage --test nvme --no-run --locked 2>&1 |
  sed -n 's/^ *Executable .* (\(.*\))$/\1/p')
[ -n "$binary" ] || { echo "ci/vm/cost.sh: no test binary built" >&2; exit 1; }
command -v valgrind >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "ci/vm/cost.sh: install valgrind (or run as root)" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >&2
}
mkdir -p target/vm
cp "$binary" target/vm/nvme-cost
lib=/usr/libexec/valgrind
# /usr/bin/valgrind is a wrapper script around valgrind.bin (static).
export CARMINE_VM_TOOLS="target/vm/nvme-cost /usr/bin/valgrind.bin"
export CARMINE_VM_EXTRA_FILES="$lib/callgrind-amd64-linux $lib/vgpreload_core-amd64-linux.so $lib/default.supp"
exec ci/vm/run.sh "$PWD/ci/vm/cost-guest.sh"
