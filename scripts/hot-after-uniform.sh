#!/bin/bash
# Write amplification and cleaner moves of two carmine binaries, alternating on files of
# their own: uniform randwrite at --fill 0.8 on a fresh preallocated file (a), a second run on
# the same file (b), then HOT_RUNS runs of a hot set on that file (h1, h2, ...), as in
# ARCHITECTURE.md ("Hot set after a uniform phase", "The cleaner's own log head").
#
#   scripts/hot-after-uniform.sh OLD_BINARY NEW_BINARY [OUT_DIR]
#   env: DURATION (20s), HOT (0.05:0.999999), HOT_RUNS (3), ROUNDS (1), DEVICE_SIZE (2GiB)
#
# Each line: run, IOPS, WA, blocks the cleaner moved per client write (and of those, to
# cold segments), ops per record, load average at the start of the run. JSON and logs stay
# in OUT_DIR. Files go in OUT_DIR too (2 x DEVICE_SIZE): put it on the disk to measure.
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") out=${3:-./hot-after-uniform}
mkdir -p "$out" && cd "$out"
duration=${DURATION:-20s} hot=${HOT:-0.05:0.999999} hot_runs=${HOT_RUNS:-3}
summary() {
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d['server']; o = max(1, d['ops'])
print(f"iops {d['iops']:8.0f} wa {d['write_amplification']:.3f} "
      f"moved/op {s['blocks_moved']/o:.3f} cold/op {s.get('blocks_moved_cold', 0)/o:.3f} "
      f"ops/rec {o/max(1, s['records_written']):.1f} fill {d['fill']['start']:.2f} "
      f"vf {d['verify_failures']} err {d['errors']}")
PY
}
one() { # binary tag run [store-bench args...]
  local bin=$1 tag=$2 run=$3; shift 3
  local extra=()
  if [ "$run" = a ]; then
    rm -f "dev-$tag.img"
    extra=(--device-size "${DEVICE_SIZE:-2GiB}" --preallocate)
  fi
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  "$bin" store-bench --device "dev-$tag.img" "${extra[@]}" --op randwrite --fill 0.8 \
    --duration "$duration" "$@" --json >"r$R-$tag-$run.json" 2>"r$R-$tag-$run.err"
  echo "r$R $tag $run load $load $(summary "r$R-$tag-$run.json")"
}
for R in $(seq 1 "${ROUNDS:-1}"); do
  echo "== round $R $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  for run in a b; do one "$old" old $run; one "$new" new $run; done
  for n in $(seq 1 "$hot_runs"); do
    one "$old" old "h$n" --hot "$hot"; one "$new" new "h$n" --hot "$hot"
  done
  # Each image checked by the binary that wrote it (formats differ across versions).
  "$old" fsck --device dev-old.img >"fsck-r$R-old.txt" 2>&1 || echo "fsck old: see fsck-r$R-old.txt"
  "$new" fsck --device dev-new.img >"fsck-r$R-new.txt" 2>&1 || echo "fsck new: see fsck-r$R-new.txt"
done
rm -f dev-old.img dev-new.img
echo "== done $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
