#!/usr/bin/env bash
# Server instructions per op, counted by callgrind: repeatable where wall-clock IOPS are not
# (a shared or busy machine). Runs `carmine serve --store memory` under callgrind with
# instrumentation off, prefills with `carmine load`, turns instrumentation on for one timed
# `carmine load` run, off again, and divides the instructions by the server's own op counter.
# Also prints the server's network syscalls and poll passes per op.
#
# Usage: scripts/callgrind-op.sh [OP] [CORES] [DURATION]
#   OP        randread (default) or randwrite (any `carmine load --op`)
#   CORES     1 (default; reactor on CPU 1, generator on CPU 0) or 2 (CPUs 0,1, generator on 0)
#   DURATION  timed load, default 8s
# Environment: CARMINE (binary, default target/release/carmine), OUT (directory for the
# callgrind file and logs, default target/callgrind), PORT (default 6999), LOAD_ARGS (extra
# `carmine load` arguments for the timed run, e.g. LOAD_ARGS=--route), WARMUP (a duration: run
# an uninstrumented `--op seqread` that long before the timed run, so that every block has
# been read once; the memory store keeps a block's crc from its first read, and a short
# run under valgrind otherwise reads most blocks for the first time).
#
# Under valgrind the server runs ~50x slower, so the generator keeps it saturated and every op
# is counted at full batching (several frames per recv); callgrind sees no AVX-512, so the
# crc32c fold runs its PCLMULQDQ path there (see crc/).
set -euo pipefail
cd "$(dirname "$0")/.."
OP=${1:-randread}
CORES=${2:-1}
DURATION=${3:-8s}
CARMINE=${CARMINE:-target/release/carmine}
OUT=${OUT:-target/callgrind}
PORT=${PORT:-6999}
LOAD_ARGS=${LOAD_ARGS:-}
WARMUP=${WARMUP:-}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
[ -x "$CARMINE" ] || cargo build --release --quiet
mkdir -p "$OUT"
tag="$OP-$CORES${LOAD_ARGS:+$(echo "$LOAD_ARGS" | tr -d ' ')}"
cpus=1
[ "$CORES" = 2 ] && cpus=0,1
rm -f "$OUT/$tag.callgrind"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$tag.callgrind" \
  "$CARMINE" serve --cores "$CORES" --cpus "$cpus" --store memory --listen "127.0.0.1:$PORT" \
  --idle adaptive 2>"$OUT/$tag.serve.log" &
server=$!
trap 'kill -INT $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  "$CARMINE" status --target "127.0.0.1:$PORT" --json >/dev/null 2>&1 && break
  sleep 0.5
done
"$CARMINE" load --target "127.0.0.1:$PORT" --op randwrite --prefill --duration 1s --cpus 0 >/dev/null
counters() {
  "$CARMINE" status --target "127.0.0.1:$PORT" --json | python3 -c '
import json, sys
cores = json.load(sys.stdin)["per_core"]
print(*(sum(c[k] for c in cores) for k in ("ops", "rx_syscalls", "tx_syscalls", "passes")))'
}
if [ -n "$WARMUP" ]; then
  "$CARMINE" load --target "127.0.0.1:$PORT" --op seqread --duration "$WARMUP" --cpus 0 $LOAD_ARGS |
    grep -E "^ +ops " | sed "s/^/warm-up seqread: /"
fi
read -r ops0 rx0 tx0 passes0 < <(counters)
callgrind_control -i on "$server" >/dev/null 2>&1
"$CARMINE" load --target "127.0.0.1:$PORT" --op "$OP" --duration "$DURATION" --cpus 0 $LOAD_ARGS >"$OUT/$tag.load.txt"
callgrind_control -i off "$server" >/dev/null 2>&1
read -r ops1 rx1 tx1 passes1 < <(counters)
kill -INT "$server"
wait "$server" || true
trap - EXIT
ir=$(grep -E "Collected :" "$OUT/$tag.serve.log" | awk '{print $NF}' | tr -d ,)
python3 - "$tag" "$ir" "$ops0" "$ops1" "$rx0" "$rx1" "$tx0" "$tx1" "$passes0" "$passes1" <<'PY'
import sys
tag = sys.argv[1]
ir, o0, o1, r0, r1, t0, t1, p0, p1 = map(int, sys.argv[2:])
ops = o1 - o0
print(f"{tag}: {ops} ops, {ir / ops:.0f} instructions/op, "
      f"recv {(r1 - r0) / ops:.3f}/op, writev {(t1 - t0) / ops:.3f}/op, passes {(p1 - p0) / ops:.3f}/op")
PY
echo "callgrind_annotate $OUT/$tag.callgrind   # where they go"
