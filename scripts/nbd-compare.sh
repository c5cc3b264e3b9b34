#!/usr/bin/env bash
# Issue 8's benchmark: fio's nbd engine against carmine's NBD frontend (memory store, then the
# segment store) and against nbdkit's memory plugin, in one run: 4 KiB randwrite then randread,
# iodepth 32, numjobs 4 (one NBD connection each), fio pinned to CPU 0 and the server to CPU 1
# (`carmine serve --cores 1 --cpus 1`; nbdkit and all its threads under `taskset -c 1`).
#
# Server CPU per op, over the same fio phase:
#   proc_ns/op  process CPU time (utime + stime from /proc/PID/stat) / ops, for both servers.
#               Carmine runs with `--idle adaptive` (IDLE=spin to change it) so that, like
#               nbdkit, it sleeps in the kernel when it has nothing to do and its process time
#               is what it used (a spinning reactor's process time is the wall clock).
#   busy_ns/op  carmine only: its reactor's busy time (`carmine status`: passes with work)
#               / NBD requests.
# ops = fio's total_ios for the phase. The load average is printed before and after: the
# numbers are only comparable within one run on a shared machine.
#
# Usage: scripts/nbd-compare.sh                  10 s per phase
#        DURATION=20 scripts/nbd-compare.sh
# Environment:
#   DURATION     seconds per phase (default 10)
#   SIZE         image size, also the region fio touches (default 1G, fio syntax)
#   SERVERS      what to run, in order (default "carmine-memory:off carmine-memory:auto
#                carmine-memory:20us nbdkit-memory carmine-segment:off carmine-segment:auto");
#                carmine-STORE:MODE runs carmine with `--coalesce MODE` (pass coalescing:
#                off, auto (the server's default, also what plain carmine-STORE runs) or a
#                pause such as 20us). The on_ms column is how many milliseconds of the phase
#                the reactor had coalescing on (`coalesce_windows_on`).
#   IDLE         carmine's idle policy (default adaptive)
#   DIR          scratch directory for the segment store's device (default target/nbd-bench)
#   CARMINE      carmine binary (default target/release/carmine, built if missing)
#   OBJECT_SIZE  image object size (default 4MiB)
#   JSON         also write the table as JSON lines to this file
#   NICE         nice level of fio and of each server (default 0; e.g. -10 as root). Each runs
#                in its own session, so in its own autogroup (kernel.sched_autogroup_enabled),
#                and the level is also set as that autogroup's nice: with autogroups, CPU time
#                is shared between sessions first, and a session's share on one CPU follows
#                its load there, so a one-thread server in the same session as fio (four busy
#                threads on the other CPU) got a third of its CPU where nbdkit's many threads
#                got most of it. The same treatment for every server keeps it fair.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SIZE=${SIZE:-1G}
SERVERS=${SERVERS:-carmine-memory:off carmine-memory:auto carmine-memory:20us nbdkit-memory carmine-segment:off carmine-segment:auto}
IDLE=${IDLE:-adaptive}
DIR=${DIR:-target/nbd-bench}
CARMINE=${CARMINE:-target/release/carmine}
OBJECT_SIZE=${OBJECT_SIZE:-4MiB}
NBD_PORT=${NBD_PORT:-10899}
OSD_PORT=${OSD_PORT:-6899}
NBDKIT_PORT=${NBDKIT_PORT:-10898}
JSON=${JSON:-}
NICE=${NICE:-0}

# Runs a command in its own session (autogroup) at nice $NICE, exec'ing all the way down, so
# that `(exec boosted ...) &` leaves the command's pid in $!.
BOOST='echo "$0" >/proc/self/autogroup 2>/dev/null; exec nice -n "$0" "$@"'
boosted() { setsid bash -c "$BOOST" "$NICE" "$@"; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'nbd-compare: %s\n' "$*" >&2; exit 1; }

for tool in fio nbdkit jq; do
  command -v $tool >/dev/null || die "$tool not installed (apt-get install fio nbdkit jq)"
done
[ -x "$CARMINE" ] || { log "building $CARMINE"; cargo build --release --bin carmine --quiet; }
mkdir -p "$DIR"
size_bytes=$(numfmt --from=iec "${SIZE}")

server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null; true; }
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listens on port $1"
}

# fio phase: prints "iops ops p99_us".
fio_phase() { # uri rw side
  boosted taskset -c 0 fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 \
    --numjobs=4 --group_reporting --time_based --runtime="$DURATION" --size="$SIZE" \
    --output-format=json 2>/dev/null \
    | sed -n '/^{/,$p' \
    | jq -r ".jobs[0].$3 | [(.iops | floor), .total_ios, (.clat_ns.percentile.\"99.000000\" / 1000 | floor)] | map(tostring) | join(\" \")"
}

prefill() { # uri
  boosted taskset -c 0 fio --name=prefill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 \
    --size="$SIZE" --output-format=json >/dev/null 2>&1 || die "prefill of $1 failed"
}

status_field() { "$CARMINE" status --target "127.0.0.1:$OSD_PORT" --json | jq -r ".totals.$1"; }

proc_cpu_ns() { # pid -> utime+stime of the whole process (all threads), in ns
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$1/stat")
  echo $((ticks * 1000000000 / $(getconf CLK_TCK)))
}

results=()
row() { # server phase iops p99 proc_ns busy_ns on_ms
  results+=("$(printf '%-22s %-10s %10s %8s %12s %12s %8s' "$@")")
  if [ -n "$JSON" ]; then
    printf '{"server":"%s","phase":"%s","iops":%s,"p99_us":%s,"proc_ns_per_op":%s,"busy_ns_per_op":%s,"coalesce_on_ms":%s}\n' \
      "$1" "$2" "$3" "$4" "$5" "${6/-/null}" "${7/-/null}" >>"$JSON"
  fi
}

run_phases() { # name uri carmine(0/1)
  local rw side iops ops p99 cpu0 cpu1 busy0 busy1 req0 req1 busy on0 on1 on_ms
  for rw in randwrite randread; do
    side=${rw#rand}
    if [ "$3" = 1 ]; then
      busy0=$(status_field busy_ns); req0=$(status_field nbd_requests)
      on0=$(status_field coalesce_windows_on)
    fi
    cpu0=$(proc_cpu_ns "$server_pid")
    read -r iops ops p99 < <(fio_phase "$2" "$rw" "$side")
    cpu1=$(proc_cpu_ns "$server_pid")
    busy=-; on_ms=-
    if [ "$3" = 1 ]; then
      busy1=$(status_field busy_ns); req1=$(status_field nbd_requests)
      on1=$(status_field coalesce_windows_on)
      busy=$(( (busy1 - busy0) / (req1 - req0 + 1) )); on_ms=$((on1 - on0))
    fi
    row "$1" "$rw" "$iops" "$p99" "$(( (cpu1 - cpu0) / (ops + 1) ))" "$busy" "$on_ms"
  done
}

run_carmine() { # store coalesce
  local store=$1 coalesce=$2
  log "carmine --cores 1 --store $store --idle $IDLE --coalesce $coalesce on CPU 1"
  args=(serve --cores 1 --cpus 1 --idle "$IDLE" --coalesce "$coalesce" --store "$store"
    --listen "127.0.0.1:$OSD_PORT" --nbd "127.0.0.1:$NBD_PORT")
  if [ "$store" = segment ]; then
    rm -f "$DIR/carmine.img"
    "$CARMINE" mkfs --device "$DIR/carmine.img" --size "$((size_bytes * 3 / 1024 / 1024))MiB" \
      --cores 1 --preallocate >/dev/null
    args+=(--device "$DIR/carmine.img")
  fi
  (RUST_LOG=warn exec setsid bash -c "$BOOST" "$NICE" taskset -c 1 "$CARMINE" "${args[@]}") &
  server_pid=$!
  sleep 0.2
  [ "$(cat /proc/$server_pid/comm)" = carmine ] || die "server pid $server_pid is not carmine"
  wait_port "$OSD_PORT"; wait_port "$NBD_PORT"
  "$CARMINE" image create bench --size "$SIZE" --object-size "$OBJECT_SIZE" \
    --target "127.0.0.1:$OSD_PORT" >/dev/null
  local uri="nbd://127.0.0.1:$NBD_PORT/bench"
  prefill "$uri"
  run_phases "carmine-$store:$coalesce" "$uri" 1
  kill -INT "$server_pid"; wait "$server_pid" || true; server_pid=
  [ "$store" = segment ] && rm -f "$DIR/carmine.img"
  true
}

run_nbdkit() {
  log "nbdkit memory plugin on CPU 1"
  (exec setsid bash -c "$BOOST" "$NICE" taskset -c 1 nbdkit -f -p "$NBDKIT_PORT" -i 127.0.0.1 memory "$SIZE") &
  server_pid=$!
  wait_port "$NBDKIT_PORT"
  local uri="nbd://127.0.0.1:$NBDKIT_PORT/"
  prefill "$uri"
  run_phases nbdkit-memory "$uri" 0
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for server in $SERVERS; do
  case $server in
    carmine-memory|carmine-segment) run_carmine "${server#carmine-}" auto ;;
    carmine-memory:*|carmine-segment:*)
      store=${server#carmine-}
      run_carmine "${store%%:*}" "${server#*:}" ;;
    nbdkit-memory) run_nbdkit ;;
    *) die "unknown server $server" ;;
  esac
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

printf '\n%s, nbdkit %s; 4 KiB, iodepth 32, numjobs 4, %s s per phase; fio on CPU 0, server on CPU 1\n' \
  "$(fio --version)" "$(nbdkit --version | awk '{print $2}')" "$DURATION"
printf 'load average before: %s, after: %s; nice %s\n' "$load_before" "$load_after" "$NICE"
printf '%-22s %-10s %10s %8s %12s %12s %8s\n' server phase IOPS p99_us proc_ns/op busy_ns/op on_ms
printf '%s\n' "${results[@]}"
echo "proc_ns/op: server process CPU time / ops; busy_ns/op: carmine reactor busy time / NBD requests"
