#!/usr/bin/env bash
# Instructions per op on the server path of `serve --transport dpdk` (memory store, 4 KiB,
# memif), counted by callgrind (repeatable, unlike wall time).
#
# The server runs under `valgrind --tool=callgrind --separate-threads=yes`; counters are zeroed
# and dumped around three intervals: 10 s idle, then a randwrite and a randread load (the load
# generator runs natively, over memif). The reactor's thread file of each dump gives Ir; the
# server's STATUS gives ops and poll passes for the same interval. Reported:
#   total/op  = Ir / ops                      (everything the reactor ran, idle polling included)
#   path/op   = (Ir - passes * Ir_idle_pass) / ops   (idle-pass skeleton removed)
# path/op moves with passes per op (the generator's scheduling: +-150 Ir between runs of one
# binary), so the inclusive Ir per op of two per-op entry points is printed too, which does not:
# `OsdCore::handle_frame` (every op's check, store and reply) and `RpcNet::reply` (the datagram
# reply). Names are left uncompressed (`--compress-strings=no`) so that callgrind_annotate
# reads every dump, not only the first.
#
#   cargo build --release --features dpdk && scripts/dpdk-callgrind.sh
# Then, per load, the functions' self cost per op (scripts/callgrind-self.py), memcpy included.
# Needs root, valgrind, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARMINE:-target/release/carmine}
LISTEN=127.0.0.1:${PORT:-16950}
SOCK=/run/carmine-dpdk-cg-$$.sock
OUT=${OUT:-target/dpdk-callgrind}
DURATION=${DURATION:-10s}
rm -rf "$OUT" && mkdir -p "$OUT"
eal() { echo "--no-huge --no-pci -m 256 --lcores 0@(0-1) --file-prefix $1 --log-level lib.eal:error --vdev net_memif0,role=$2,socket=$SOCK,bsize=9216"; }
cleanup() {
  [ -n "${server:-}" ] && kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rm -f "$SOCK"; rm -rf /var/run/dpdk/carmine-cg-*-$$
}
trap cleanup EXIT

valgrind --tool=callgrind --separate-threads=yes --compress-strings=no --callgrind-out-file="$OUT/cg.%p" \
  "$B" serve --store memory --cores 1 --cpus 1 --idle spin --listen "$LISTEN" \
  --transport dpdk --udp 10.77.0.1:6800 --dpdk-args="$(eal carmine-cg-serve-$$ server)" \
  >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 600); do grep -q "serving on" "$OUT/serve.log" && break; sleep 0.1; done
grep -q "serving on" "$OUT/serve.log" || { cat "$OUT/serve.log"; exit 1; }

st() { "$B" status --target "$LISTEN" --json | python3 -c "import json,sys; t=json.load(sys.stdin)['totals']; print(t['ops'], t['passes'])"; }
load() { "$B" load --transport dpdk --target 10.77.0.1:6800 --status-target "$LISTEN" --cpus 0 \
  --objects 64 --object-size 1MiB --clients 4 --qd 32 --json "--dpdk-args=$(eal "carmine-cg-$1-$$" client)" "${@:2}" >"$OUT/$1.json"; }

declare -A before after
callgrind_control -z "$server" >/dev/null; before[idle]=$(st); sleep 10; after[idle]=$(st)
callgrind_control -d idle "$server" >/dev/null
load prefill --op randwrite --prefill --duration 1s
for op in randwrite randread; do
  callgrind_control -z "$server" >/dev/null; before[$op]=$(st)
  load "$op" --op "$op" --duration "$DURATION"
  after[$op]=$(st); callgrind_control -d "$op" "$server" >/dev/null
done
sleep 1
# The reactor's file of a dump is the thread file with the most instructions.
file_of() { for f in "$OUT"/cg.$server.*; do
    if grep -q "^desc: Trigger: dump $1\$" "$f"; then echo "$(grep -m1 '^summary:' "$f" | cut -d' ' -f2) $f"; fi
  done | sort -n | tail -1; }
ir_of() { file_of "$1" | cut -d' ' -f1; }
python3 - "${before[idle]}" "${after[idle]}" "$(ir_of idle)" \
  "${before[randwrite]}" "${after[randwrite]}" "$(ir_of randwrite)" \
  "${before[randread]}" "${after[randread]}" "$(ir_of randread)" <<'EOF'
import sys
a = sys.argv[1:]
def interval(i):
    b_ops, b_passes = map(int, a[i].split()); e_ops, e_passes = map(int, a[i + 1].split())
    return e_ops - b_ops, e_passes - b_passes, int(a[i + 2])
_, idle_passes, idle_ir = interval(0)
per_pass = idle_ir / idle_passes
print(f"idle: {idle_passes} passes, {per_pass:.0f} Ir per idle pass")
for name, i in (("randwrite", 3), ("randread", 6)):
    ops, passes, ir = interval(i)
    print(f"{name}: {ops} ops, {passes} passes, {ir} Ir: total {ir / ops:.0f} Ir/op, "
          f"path {(ir - passes * per_pass) / ops:.0f} Ir/op")
EOF
# Where each op's instructions go (self cost per function, idle passes included), and how
# many are payload copies (memcpy/memmove; memif's own copies are inlined in its functions).
for op in randwrite randread; do
  f=$(file_of "$op" | cut -d' ' -f2)
  ops=$(( $(echo "${after[$op]}" | cut -d' ' -f1) - $(echo "${before[$op]}" | cut -d' ' -f1) ))
  python3 scripts/callgrind-self.py "$OUT" "${f##*-}" "$op" "$ops" "${TOP:-12}"
done
for op in randwrite randread; do
  f=$(file_of "$op" | cut -d' ' -f2)
  ops=$(( $(echo "${after[$op]}" | cut -d' ' -f1) - $(echo "${before[$op]}" | cut -d' ' -f1) ))
  callgrind_annotate --inclusive=yes "$f" 2>/dev/null | python3 -c '
import re, sys
op, ops = sys.argv[1], int(sys.argv[2])
wanted = {"OsdCore<N>::handle_frame": None, "RpcNet>::reply": None}
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(.*?\)\s+\S*?:(.*) \[", line)
    for key in wanted:
        if m and wanted[key] is None and m.group(2).endswith(key):
            wanted[key] = int(m.group(1).replace(",", ""))
print(f"{op}: inclusive Ir/op " + ", ".join(f"{k} {v / ops:.0f}" for k, v in wanted.items() if v))
' "$op" "$ops"
done
