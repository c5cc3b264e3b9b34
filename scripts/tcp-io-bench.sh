#!/usr/bin/env bash
# The rtc server's two TCP system-call paths against each other (issue 7): `serve --tcp-io
# epoll` and `--tcp-io uring`, alternating in the same run, ROUNDS times.
#
# Each run starts a fresh `carmine serve --store memory --cores 1 --cpus 1 --idle adaptive
# --tcp-io MODE`, prefills 64 x 4 MiB objects and reads them all once (so the store's blocks
# and kept crcs are warm, as in `carmine compare`), then runs `carmine load --route` pinned to
# CPU 0 (4 clients x QD32, 4 KiB) for each of randread and randwrite. Per op it reports:
#   process cpu/op  the server process's user+system CPU time (/proc/PID/stat) over the run:
#                   everything the server made the CPU do for it, kernel work in its
#                   io_uring_enter included (the primary figure for the uring path).
#   busy cpu/op     the reactor's CPU time booked to busy passes (status `busy_cpu_ns`).
#   syscalls/op     system calls the reactor thread entered in a 2 s window from 2 s into the
#                   run (`perf stat -e raw_syscalls:sys_enter -t`, when perf is installed).
#   iou-wrk         io_uring worker threads seen in the server during the run (work done
#                   there would not be in the reactor's counters; must be 0). Sampled every
#                   100 ms from /proc/PID/task/*/comm.
#
#   cargo build --release && scripts/tcp-io-bench.sh
#   ROUNDS=3 DURATION=8s scripts/tcp-io-bench.sh
# Wall-clock figures (IOPS) are noise on a shared machine; compare the CPU-per-op columns of
# the two modes within one run, and say the load average (printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${CARMINE:-target/release/carmine}
DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-3}
LISTEN=127.0.0.1:${PORT:-16950}
OUT=${OUT:-target/tcp-io-bench}
mkdir -p "$OUT"
TICKS=$(getconf CLK_TCK)

stop_server() { # SIGINT, then SIGKILL if it has not stopped within 20 s
  kill -INT "$server" 2>/dev/null || return 0
  for _ in $(seq 200); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$server" 2>/dev/null; then
    echo "server $server did not stop within 20 s of SIGINT; killed" >&2
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
}
cleanup() { if [ -n "${server:-}" ]; then stop_server; fi; }
trap cleanup EXIT

shape=(--target "$LISTEN" --route --bs 4096 --objects 64 --object-size 4MiB --clients 4 --qd 32 --cpus 0 --json)

proc_cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # mode op -> one line of results
  local mode=$1 op=$2 tag="$1-$2-$round"
  "$B" status --target "$LISTEN" --json >"$OUT/before.json"
  local cpu_before; cpu_before=$(proc_cpu_ticks "$server")
  rm -f "$OUT/perf.csv" "$OUT/perf-before.json" "$OUT/perf-after.json" "$OUT/iou-wrk"
  local perf=""
  if command -v perf >/dev/null; then
    (sleep 2
     "$B" status --target "$LISTEN" --json >"$OUT/perf-before.json"
     perf stat -x, -e raw_syscalls:sys_enter -t "$reactor" -o "$OUT/perf.csv" -- sleep 2 2>/dev/null
     "$B" status --target "$LISTEN" --json >"$OUT/perf-after.json") &
    perf=$!
  fi
  (while kill -0 "$server" 2>/dev/null; do
     (cat /proc/"$server"/task/*/comm 2>/dev/null | grep -c '^iou-wrk' || true) >>"$OUT/iou-wrk"
     sleep 0.1
   done) &
  local watcher=$!
  timeout 300 "$B" load "${shape[@]}" --op "$op" --duration "$DURATION" >"$OUT/$tag.json" 2>"$OUT/$tag.err" ||
    { echo "load failed ($?): $(tail -3 "$OUT/$tag.err")" >&2; exit 1; }
  sleep 0.2 # one more sample of the server's threads
  [ -n "$perf" ] && { wait "$perf" || true; }
  local cpu_after; cpu_after=$(proc_cpu_ticks "$server")
  "$B" status --target "$LISTEN" --json >"$OUT/after.json"
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null || true
  python3 - "$mode" "$op" "$OUT/$tag.json" "$OUT/before.json" "$OUT/after.json" "$cpu_before" \
    "$cpu_after" "$TICKS" "$OUT/perf.csv" "$OUT/perf-before.json" "$OUT/perf-after.json" \
    "$(sort -n "$OUT/iou-wrk" 2>/dev/null | tail -1)" <<'EOF'
import json, os, sys
mode, op, report, before, after, cpu_b, cpu_a, ticks, perf_csv, perf_b, perf_a, iou_wrk = sys.argv[1:]
r = json.load(open(report)); b = json.load(open(before))["totals"]; a = json.load(open(after))["totals"]
ops = a["ops"] - b["ops"]
process_ns = (int(cpu_a) - int(cpu_b)) / int(ticks) * 1e9 / ops
busy_cpu_ns = (a["busy_cpu_ns"] - b["busy_cpu_ns"]) / ops
enters = (a.get("uring_enters", 0) - b.get("uring_enters", 0)) / ops
syscalls = float("nan")
if os.path.exists(perf_csv) and os.path.exists(perf_a):
    rows = [l.split(",") for l in open(perf_csv) if "raw_syscalls" in l]
    window = json.load(open(perf_a))["totals"]["ops"] - json.load(open(perf_b))["totals"]["ops"]
    if rows and rows[0][0].isdigit() and window > 0:
        syscalls = int(rows[0][0]) / window
iou_wrk = iou_wrk or "nan"
print(f"{mode:5} {op:9} iops {r['iops']:9.0f}  process cpu/op {process_ns:6.0f} ns  "
      f"busy cpu/op {busy_cpu_ns:6.0f} ns  syscalls/op {syscalls:6.3f}  uring enters/op {enters:6.3f}  "
      f"iou-wrk {iou_wrk}  errors {r['errors']}")
EOF
}

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $DURATION per run, 4 clients x QD32, routed"
for round in $(seq "$ROUNDS"); do
  # Alternate which mode goes first, so that neither always meets the machine's same minute.
  if [ $((round % 2)) = 1 ]; then modes="epoll uring"; else modes="uring epoll"; fi
  for mode in $modes; do
    "$B" serve --store memory --memory-capacity 1GiB --cores 1 --cpus 1 --idle adaptive \
      --listen "$LISTEN" --tcp-io "$mode" >"$OUT/serve-$mode.log" 2>&1 &
    server=$!
    touch "$OUT/serve-$mode.log"
    for _ in $(seq 100); do grep -q "serving on" "$OUT/serve-$mode.log" && break; sleep 0.1; done
    grep -q "serving on" "$OUT/serve-$mode.log" || { cat "$OUT/serve-$mode.log"; exit 1; }
    if grep -q "falling back to epoll" "$OUT/serve-$mode.log"; then
      echo "io_uring refused here; the uring runs would be epoll" >&2; exit 1
    fi
    reactor=$(grep -l carmine-core-0 /proc/"$server"/task/*/comm | head -1 | cut -d/ -f5)
    # Bounded, and logged: a generator that fails or hangs stops the script with its reason.
    timeout 120 "$B" load "${shape[@]}" --op randwrite --prefill --duration 1s >/dev/null 2>"$OUT/warmup.err" ||
      { echo "prefill failed ($?): $(tail -3 "$OUT/warmup.err")" >&2; exit 1; }
    # Every block read once, so that the store keeps its crcs (as the timed runs will find).
    timeout 120 "$B" load "${shape[@]}" --op randread --duration 3s >/dev/null 2>"$OUT/warmup.err" ||
      { echo "warm-up failed ($?): $(tail -3 "$OUT/warmup.err")" >&2; exit 1; }
    run "$mode" randread
    run "$mode" randwrite
    stop_server; server=""
  done
done
echo "# end $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
