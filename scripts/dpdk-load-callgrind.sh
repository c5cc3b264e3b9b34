#!/usr/bin/env bash
# Instructions per op of the DPDK load generator (`carmine load --transport dpdk`), counted by
# callgrind: the generator's side of issue 5's benchmark (scripts/dpdk-callgrind.sh counts the
# server's).
#
# The server runs natively (memory store, memif server vdev); the generator runs under
# `valgrind --tool=callgrind --separate-threads=yes` against it, once per op. Its counters are
# zeroed WARM s into the run and dumped WINDOW s later; the server's STATUS gives the ops of the
# same window (the generator is its only client). Reported: the generator thread's Ir per op and
# its functions' self cost per op (scripts/callgrind-self.py), memcpy included. valgrind runs
# the pclmul crc, not the AVX-512 one of a native run. The generator polls, so its empty passes
# count too: when the server is starved of CPU (a loaded machine) they dominate (one run at
# load average 4.5 counted 186K Ir per write instead of ~7K); compare runs on a quiet machine.
#
#   cargo build --release --features dpdk && scripts/dpdk-load-callgrind.sh
#   LOAD_ARGS="--verify" scripts/dpdk-load-callgrind.sh    # extra load arguments
# Needs root, valgrind, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARMINE:-target/release/carmine}
LISTEN=127.0.0.1:${PORT:-16960}
SOCK=/run/carmine-dpdk-lcg-$$.sock
OUT=${OUT:-target/dpdk-load-callgrind}
WARM=${WARM:-4}
WINDOW=${WINDOW:-8}
rm -rf "$OUT" && mkdir -p "$OUT"
eal() { echo "--no-huge --no-pci -m 256 --lcores 0@(0-1) --file-prefix $1 --log-level lib.eal:error --vdev net_memif0,role=$2,socket=$SOCK,bsize=9216"; }
cleanup() {
  [ -n "${server:-}" ] && kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rm -f "$SOCK"; rm -rf /var/run/dpdk/carmine-lcg-*-$$
}
trap cleanup EXIT

"$B" serve --store memory --cores 1 --cpus 1 --idle spin --listen "$LISTEN" \
  --transport dpdk --udp 10.77.0.1:6800 --dpdk-args="$(eal carmine-lcg-serve-$$ server)" \
  >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do grep -q "serving on" "$OUT/serve.log" && break; sleep 0.1; done
grep -q "serving on" "$OUT/serve.log" || { cat "$OUT/serve.log"; exit 1; }

ops() { "$B" status --target "$LISTEN" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['totals']['ops'])"; }
"$B" load --transport dpdk --target 10.77.0.1:6800 --status-target "$LISTEN" --cpus 0 \
  --objects 64 --object-size 1MiB --clients 4 --qd 32 --op randwrite --prefill --duration 1s \
  "--dpdk-args=$(eal carmine-lcg-prefill-$$ client)" >/dev/null
for op in randwrite randread; do
  # shellcheck disable=SC2086 # LOAD_ARGS: extra load arguments, split at spaces
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$OUT/$op.%p" \
    "$B" load --transport dpdk --target 10.77.0.1:6800 --status-target "$LISTEN" --cpus 0 \
    --objects 64 --object-size 1MiB --clients 4 --qd 32 --op "$op" ${LOAD_ARGS:-} \
    --duration $((WARM + WINDOW + 4))s --json "--dpdk-args=$(eal carmine-lcg-$op-$$ client)" \
    >"$OUT/$op.json" 2>"$OUT/$op.err" &
  load=$!
  sleep "$WARM"
  callgrind_control -z "$load" >/dev/null; before=$(ops)
  sleep "$WINDOW"
  after=$(ops); callgrind_control -d window "$load" >/dev/null
  wait "$load"
  # The generator thread's file of the dump is the one with the most instructions.
  f=$(for g in "$OUT"/"$op".$load.*; do
      if grep -q '^desc: Trigger: dump window$' "$g"; then echo "$(grep -m1 '^summary:' "$g" | cut -d' ' -f2) $g"; fi
    done | sort -n | tail -1)
  ir=${f%% *}; ops_window=$((after - before))
  echo "$op: $ops_window ops, $ir Ir: $((ir / ops_window)) Ir/op (generator thread)"
  file=${f#* }
  for g in "$OUT"/"$op".$load*; do mv "$g" "$OUT/cg.${g##*/$op.}"; done
  python3 scripts/callgrind-self.py "$OUT" "${file##*-}" window "$ops_window" "${TOP:-20}"
  rm -f "$OUT"/cg.*
done
