#!/usr/bin/env bash
# The DPDK transport against kernel TCP, same server, same run (issue 5's benchmark).
#
# One `carmine serve --store memory --cores 1 --cpus 1 --idle spin --transport dpdk` on a
# net_memif server vdev (it serves TCP on --listen too); `carmine load` pinned to CPU 0, 4 KiB,
# 4 clients x QD32, alternating TCP and DPDK (memif client vdev) for each of randwrite and
# randread, ROUNDS times. Server CPU per op = the reactor's busy time / ops between two STATUS
# reads (the reactor spins, so process CPU is wall time; busy time counts passes that did work,
# including any time the thread was preempted in them). "server preempted" is the reactor
# thread's run-queue wait (/proc/.../schedstat) over the run's wall time: on a shared machine a
# spinning reactor or generator is descheduled for whole time slices. "load cpu/op" is the
# generator process's user+system time per op (one thread; TCP sleeps in epoll, DPDK spins, so
# its cpu/op is its wall time per op). "load busy/op": the DPDK generator's time in passes that
# received or sent something, per op (its report's `generator_busy_s`): what its work costs.
# "ops/busy pass": ops over the reactor's passes that did work (`busy_passes`; nan for a server
# without the counter): how many ops a pass carries. "server syscalls/op": system calls the
# reactor thread entered per op in a 2 s window from 2 s into the run (`perf stat -e
# raw_syscalls:sys_enter -t`, when perf is installed; the window skips the generator's
# start-up): callgrind sees no kernel, and on a VM a system call costs more than an op's
# user-space path.
#
#   cargo build --release --features dpdk && scripts/dpdk-bench.sh
#   DURATION=10s ROUNDS=3 scripts/dpdk-bench.sh
#   SERVE_ARGS="--coalesce off" scripts/dpdk-bench.sh   # extra serve arguments
#   CLIENTS=8 QD=32 scripts/dpdk-bench.sh                 # more requests in flight (default 4 x 32)
#   DGRAM=udp scripts/dpdk-bench.sh   # the datagram RPC on kernel UDP sockets instead of DPDK
#                                     # (`serve --transport udp`, `load --transport udp`; no
#                                     # dpdk feature needed)
#   MEMIF_ZC=1 scripts/dpdk-bench.sh  # the server's memif port is a zero-copy client
#                                     # (role=client,zero-copy=yes) and the generator's the memif
#                                     # server: the generator writes requests into the server's
#                                     # rx rooms and reads replies from its mbufs, as a NIC's DMA
#                                     # would, so the copies memif makes are the generator's. A
#                                     # memif client connects once: each round starts a fresh
#                                     # server after the DPDK generator's port is up, and the
#                                     # generator prefills through DPDK (the window below starts
#                                     # after its prefill); the TCP run then uses that server.
# Needs root (the EAL's runtime files and the memif socket live under /run), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARMINE:-target/release/carmine}
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-2}
LISTEN=127.0.0.1:${PORT:-16900}
SOCK=/run/carmine-dpdk-bench-$$.sock
SERVER_IP=10.77.0.1:6800
OUT=${OUT:-target/dpdk-bench}
mkdir -p "$OUT"
cpus=$(nproc)
# --single-file-segments: a zero-copy memif client shares the EAL's memory as one file.
eal() { echo "--no-huge --no-pci -m 256 --single-file-segments --lcores 0@(0-$((cpus - 1))) --file-prefix $1 --log-level lib.eal:error --vdev net_memif0,role=$2,socket=$SOCK,bsize=9216"; }
MEMIF_ZC=${MEMIF_ZC:-0}
if [ "$MEMIF_ZC" = 1 ]; then serve_role=client,zero-copy=yes; load_role=server; else serve_role=server; load_role=client; fi

cleanup() {
  [ -n "${server:-}" ] && kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  rm -f "$SOCK"
  rm -rf /var/run/dpdk/carmine-bench-*-$$
}
trap cleanup EXIT

DGRAM=${DGRAM:-dpdk}
if [ "$DGRAM" = udp ]; then
  SERVER_IP=127.0.0.1:${UDP_PORT:-16901}
fi
serves=0
start_serve() { # -> $server, $reactor
  local dgram_serve
  serves=$((serves + 1))
  if [ "$DGRAM" = udp ]; then
    dgram_serve=(--transport udp --udp "$SERVER_IP")
  else
    dgram_serve=(--transport dpdk --udp "$SERVER_IP" "--dpdk-args=$(eal carmine-bench-serve$serves-$$ "$serve_role")")
  fi
  # shellcheck disable=SC2086 # SERVE_ARGS: extra serve arguments, split at spaces (e.g. "--coalesce off")
  "$B" serve --store memory --cores 1 --cpus 1 --idle spin --listen "$LISTEN" ${SERVE_ARGS:-} \
    "${dgram_serve[@]}" >"$OUT/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do grep -q "serving on" "$OUT/serve.log" && break; sleep 0.1; done
  grep -q "serving on" "$OUT/serve.log" || { cat "$OUT/serve.log"; exit 1; }
  reactor=$(grep -l carmine-core-0 /proc/"$server"/task/*/comm | head -1 | cut -d/ -f5)
}
stop_serve() {
  kill -INT "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  server=""
}

shape=(--bs 4096 --objects 64 --object-size 1MiB --clients "${CLIENTS:-4}" --qd "${QD:-32}" --cpus 0 --json)
n=0
run() { # transport op -> one line of results
  local transport=$1 op=$2 extra=()
  n=$((n + 1))
  if [ "$transport" = udp ]; then
    extra=(--transport udp --target "$SERVER_IP" --status-target "$LISTEN")
  elif [ "$transport" = dpdk ]; then
    extra=(--transport dpdk --target "$SERVER_IP" --status-target "$LISTEN" "--dpdk-args=$(eal carmine-bench-load$n-$$ "$load_role")")
  else
    extra=(--target "$LISTEN")
  fi
  local zc_load=""
  launch_load() { # extra load arguments; the load's report, stderr and time go to this run's files
    /usr/bin/time -f "%e %U %S" -o "$OUT/load-$n.time" \
      "$B" load "${extra[@]}" "${shape[@]}" --op "$op" --duration "$DURATION" "$@" >"$OUT/$transport-$op-$n.json" 2>"$OUT/load-$n.err"
  }
  if [ "$transport" = dpdk ] && [ "$MEMIF_ZC" = 1 ]; then
    # The generator (memif server) first, then a fresh server (zero-copy memif client) once
    # the generator's port is up; the window starts when its prefill is through.
    [ -n "${server:-}" ] && stop_serve
    rm -f "$SOCK"
    launch_load --prefill &
    zc_load=$!
    for _ in $(seq 300); do grep -q "DPDK port 0 started" "$OUT/load-$n.err" && break; sleep 0.1; done
    start_serve
    for _ in $(seq 300); do
      [ "$("$B" status --target "$LISTEN" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"]["ops"])')" -ge "$prefill_ops" ] && break
      sleep 0.1
    done
  fi
  "$B" status --target "$LISTEN" --json >"$OUT/before.json"
  local sched_before; sched_before=$(cat "/proc/$server/task/$reactor/schedstat")
  local perf=""
  rm -f "$OUT/perf.csv" "$OUT/perf-before.json" "$OUT/perf-after.json"
  if command -v perf >/dev/null; then
    (sleep 2
     "$B" status --target "$LISTEN" --json >"$OUT/perf-before.json"
     perf stat -x, -e raw_syscalls:sys_enter -t "$reactor" -o "$OUT/perf.csv" -- sleep 2 2>/dev/null
     "$B" status --target "$LISTEN" --json >"$OUT/perf-after.json") &
    perf=$!
  fi
  if [ -n "$zc_load" ]; then
    wait "$zc_load"
  else
    launch_load
  fi
  local sched_after; sched_after=$(cat "/proc/$server/task/$reactor/schedstat")
  [ -n "$perf" ] && { wait "$perf" || true; }
  "$B" status --target "$LISTEN" --json >"$OUT/after.json"
  python3 - "$transport" "$op" "$OUT/$transport-$op-$n.json" "$OUT/before.json" "$OUT/after.json" \
    "$OUT/load-$n.time" "$sched_before" "$sched_after" "$OUT/perf.csv" "$OUT/perf-before.json" "$OUT/perf-after.json" <<'EOF'
import json, sys
import os
transport, op, report, before, after, load_time, sched_b, sched_a, perf_csv, perf_b, perf_a = sys.argv[1:]
syscalls_per_op = float("nan")
if os.path.exists(perf_csv) and os.path.exists(perf_a):
    rows = [l.split(",") for l in open(perf_csv) if "raw_syscalls" in l]
    window_ops = json.load(open(perf_a))["totals"]["ops"] - json.load(open(perf_b))["totals"]["ops"]
    if rows and rows[0][0].isdigit() and window_ops > 0:
        syscalls_per_op = int(rows[0][0]) / window_ops
r = json.load(open(report)); b = json.load(open(before))["totals"]; a = json.load(open(after))["totals"]
ops = a["ops"] - b["ops"]
busy = (a["busy_ns"] - b["busy_ns"]) / ops if ops else float("nan")
busy_passes = a.get("busy_passes", 0) - b.get("busy_passes", 0)  # absent before session 11
per_pass = ops / busy_passes if busy_passes else float("nan")
# A busy-polling generator's time in passes that moved packets (DPDK; nan for TCP, which sleeps).
gen_busy = r["generator_busy_s"] / r["ops"] * 1e6 if r.get("generator_busy_s") and r["ops"] else float("nan")
wall, user, system = map(float, open(load_time).read().split()[-3:])
# schedstat: ns on CPU, ns waiting on a run queue (runnable but preempted), time slices.
run_b, wait_b, _ = map(int, sched_b.split()); run_a, wait_a, _ = map(int, sched_a.split())
print(f"{transport:5} {op:9} iops {r['iops']:9.0f}  p50 {r['latency_us']['p50']:7.1f} us  p99 {r['latency_us']['p99']:8.1f} us  "
      f"server busy/op {busy/1000:5.2f} us  ops/busy pass {per_pass:5.2f}  server syscalls/op {syscalls_per_op:5.2f}  "
      f"server preempted {(wait_a - wait_b) / 1e9 / wall:4.0%}  "
      f"load cpu/op {(user + system) / r['ops'] * 1e6 if r['ops'] else 0:5.2f} us ({(user + system) / wall:4.0%} of a CPU)  "
      f"load busy/op {gen_busy:5.2f} us  "
      f"errors {r['errors']} verify_failures {r['verify_failures']}")
EOF
}

prefill_ops=$((64 * 256)) # --objects 64 --object-size 1MiB in 4 KiB blocks
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); duration $DURATION per run; ${CLIENTS:-4} clients x QD${QD:-32}; memif zero-copy server: $MEMIF_ZC"
if [ "$MEMIF_ZC" = 1 ] && [ "$DGRAM" = dpdk ]; then
  for round in $(seq "$ROUNDS"); do
    for op in randwrite randread; do
      run dpdk "$op" # starts the server this round's TCP run uses too
      run tcp "$op"
    done
  done
else
  start_serve
  "$B" load --target "$LISTEN" "${shape[@]}" --op randwrite --prefill --duration 1s >/dev/null
  for round in $(seq "$ROUNDS"); do
    for op in randwrite randread; do
      run tcp "$op"
      run "$DGRAM" "$op"
    done
  done
fi
