#!/usr/bin/env bash
# Instructions per op of the server's reactor with the server as a zero-copy memif client
# (`role=client,zero-copy=yes`; see README "Zero-copy memif"), counted by callgrind.
#
# A memif client connects once, so the order is: the generator (memif server, prefill then OP
# for 60 s) starts first; once its port is up, `serve` starts under valgrind and connects; after
# the prefill the counters are zeroed, 15 s of OP are dumped, and the reactor's thread file of
# the dump gives Ir, the server's STATUS the ops of the same interval. Reported: Ir per op (all
# the reactor ran, idle polling included) and the inclusive Ir of `OsdCore::handle_frame` and
# `RpcNet::reply` per op. (`scripts/dpdk-callgrind.sh` is the same for memif copying.)
#
#   cargo build --release --features dpdk && scripts/dpdk-callgrind-zc.sh       # randread
#   OP=randwrite scripts/dpdk-callgrind-zc.sh
# Needs root, valgrind, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARMINE:-target/release/carmine}
OP=${OP:-randread}
SOCK=/run/carmine-cgzc-$$.sock
LISTEN=127.0.0.1:${PORT:-16970}
OUT=${OUT:-target/dpdk-callgrind-zc}/$OP
rm -rf "$OUT" && mkdir -p "$OUT"
eal() { echo "--no-huge --no-pci -m 256 --single-file-segments --lcores 0@(0-1) --file-prefix $1 --log-level lib.eal:error --vdev net_memif0,$2,socket=$SOCK,bsize=9216"; }
cleanup() {
  [ -n "${server:-}" ] && kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  [ -n "${load:-}" ] && kill "$load" 2>/dev/null && wait "$load" 2>/dev/null || true
  rm -f "$SOCK"; rm -rf /var/run/dpdk/carmine-cgzc-*-$$
}
trap cleanup EXIT

"$B" load --transport dpdk --target 10.77.0.1:6800 --status-target "$LISTEN" \
  "--dpdk-args=$(eal carmine-cgzc-load-$$ role=server)" --objects 64 --object-size 1MiB \
  --clients 4 --qd 32 --cpus 0 --json --prefill --op "$OP" --duration 60s >"$OUT/load.json" 2>"$OUT/load.err" &
load=$!
for _ in $(seq 300); do grep -q "DPDK port 0 started" "$OUT/load.err" && break; sleep 0.1; done
valgrind --tool=callgrind --separate-threads=yes --compress-strings=no --callgrind-out-file="$OUT/cg.%p" \
  "$B" serve --store memory --cores 1 --cpus 1 --idle spin --listen "$LISTEN" --transport dpdk \
  --udp 10.77.0.1:6800 "--dpdk-args=$(eal carmine-cgzc-serve-$$ role=client,zero-copy=yes)" \
  >"$OUT/serve.log" 2>&1 &
server=$!
st() { "$B" status --target "$LISTEN" --json | python3 -c "import json,sys; t=json.load(sys.stdin)['totals']; print(t['ops'], t['passes'])"; }
prefill=$((64 * 256))
for _ in $(seq 600); do
  ops=$(st 2>/dev/null | cut -d' ' -f1) || true
  [ "${ops:-0}" -gt $((prefill + 1000)) ] && break
  sleep 0.2
done
callgrind_control -z "$server" >/dev/null
read -r ops0 passes0 < <(st)
sleep 15
read -r ops1 passes1 < <(st)
callgrind_control -d run "$server" >/dev/null
sleep 1
# The reactor's file of the dump is the thread file with the most instructions.
read -r ir file < <(for f in "$OUT"/cg."$server".*; do
  if grep -q "^desc: Trigger: dump run\$" "$f"; then echo "$(grep -m1 '^summary:' "$f" | cut -d' ' -f2) $f"; fi
done | sort -n | tail -1)
ops=$((ops1 - ops0))
echo "$OP (zero-copy memif): reactor $ir Ir over $ops ops, $((passes1 - passes0)) passes: $((ir / ops)) Ir/op"
callgrind_annotate --inclusive=yes "$file" 2>/dev/null |
  grep -E "OsdCore<N>::handle_frame \[|RpcNet>::reply \[" |
  while read -r count _ name; do echo "  inclusive $(( ${count//,/} / ops )) Ir/op  $name"; done
