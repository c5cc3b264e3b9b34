#!/usr/bin/env bash
# Instructions per op of the segment store driven by `carmine store-bench`, counted by
# callgrind: repeatable where IOPS on a shared machine are not. Collection is on only inside
# store-bench's `Bench::run_phase`, and the device file is prepared (formatted and prefilled)
# by an untimed run outside valgrind first, so for randread the count is the timed phase's
# alone: the store's submit and poll, the queue pair, crc32c checks, and the benchmark's own
# bookkeeping (clock reads, histogram), divided by the ops the report counts.
#
# Usage: scripts/callgrind-store-bench.sh [OP] [DURATION] [EXTRA ARGS...]
#   OP        randread (default) or randwrite (randwrite also counts its untimed read-back)
#   DURATION  timed phase under valgrind, default 2s (valgrind runs ~50x slower)
#   EXTRA     more store-bench arguments, e.g. --spin
# Environment: CARMINE (binary, default target/release/carmine, built with debug info by the
# release profile), OUT (directory for the device file, reports and callgrind file, default
# target/callgrind-store-bench; the device file is kept and reused, delete it to start over).
#
# Callgrind sees no AVX-512, so crc32c runs its PCLMULQDQ path (see crc/).
set -euo pipefail
cd "$(dirname "$0")/.."
OP=${1:-randread}
DURATION=${2:-2s}
shift $(($# > 2 ? 2 : $#))
CARMINE=${CARMINE:-target/release/carmine}
OUT=${OUT:-target/callgrind-store-bench}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
[ -x "$CARMINE" ] || cargo build --release --quiet
mkdir -p "$OUT"
device="$OUT/device.img"
common=(store-bench --device "$device" --bs 4k --qd 32 --no-verify --json)
if [ ! -e "$device" ]; then
  # Creates, formats and prefills the device (64 objects of 4 MiB), outside valgrind.
  "$CARMINE" "${common[@]}" --device-size 2g --preallocate --op randread --duration 1s \
    >"$OUT/prepare.json" 2>"$OUT/prepare.log"
fi
tag="$OP${*:+$(echo "$*" | tr -d ' ')}"
valgrind --tool=callgrind --toggle-collect='*Bench*run_phase*' \
  --callgrind-out-file="$OUT/$tag.callgrind" \
  "$CARMINE" "${common[@]}" --op "$OP" --duration "$DURATION" "$@" \
  >"$OUT/$tag.json" 2>"$OUT/$tag.log"
ir=$(grep -E "Collected :" "$OUT/$tag.log" | awk '{print $NF}' | tr -d ,)
python3 - "$OUT/$tag.json" "$ir" "$tag" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
ir, ops = int(sys.argv[2]), report["ops"]
waits = report["server"].get("idle_waits")
print(f"{sys.argv[3]}: {ops} ops, {ir / ops:.0f} instructions/op, idle waits {waits}")
PY
echo "callgrind_annotate $OUT/$tag.callgrind   # where they go"
