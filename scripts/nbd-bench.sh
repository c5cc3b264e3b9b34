#!/usr/bin/env bash
# fio's nbd engine against carmine's NBD frontend and against nbdkit's memory plugin, in one run:
# 4 KiB randwrite then randread, iodepth 32, numjobs 4 (one NBD connection each), fio pinned to
# CPU 0 and the server to CPU 1. Server CPU per op: carmine's busy time from `carmine status`
# (busy_ns / nbd_requests; polling passes without work are idle, not busy), nbdkit's process CPU
# time (utime + stime from /proc) over the same phase.
#
# Usage: scripts/nbd-bench.sh                    10 s per phase
#        DURATION=20 scripts/nbd-bench.sh
# Environment:
#   DURATION   seconds per phase (default 10)
#   SIZE       image size, also the region fio touches (default 1G, fio syntax)
#   STORES     carmine stores to run (default "memory segment")
#   DIR        scratch directory for the segment store's device (default target/nbd-bench)
#   CARMINE    carmine binary (default target/release/carmine, built if missing)
#   OBJECT_SIZE  image object size (default 4MiB)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
SIZE=${SIZE:-1G}
STORES=${STORES:-memory segment}
DIR=${DIR:-target/nbd-bench}
CARMINE=${CARMINE:-target/release/carmine}
OBJECT_SIZE=${OBJECT_SIZE:-4MiB}
NBD_PORT=${NBD_PORT:-10899}
OSD_PORT=${OSD_PORT:-6899}
NBDKIT_PORT=${NBDKIT_PORT:-10898}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'nbd-bench: %s\n' "$*" >&2; exit 1; }

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

# fio phase: prints "iops" to stdout.
fio_phase() { # uri rw
  taskset -c 0 fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=32 \
    --numjobs=4 --group_reporting --time_based --runtime="$DURATION" --size="$SIZE" \
    --output-format=json 2>/dev/null \
    | sed -n '/^{/,$p' | jq -r "(.jobs[0].${3}.iops | floor | tostring) + \" \" + (.jobs[0].${3}.clat_ns.percentile.\"99.000000\" / 1000 | floor | tostring)"
}

prefill() { # uri
  taskset -c 0 fio --name=prefill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 \
    --size="$SIZE" --output-format=json >/dev/null 2>&1 || die "prefill of $1 failed"
}

status_field() { "$CARMINE" status --target "127.0.0.1:$OSD_PORT" --json | jq -r ".totals.$1"; }

proc_cpu_ns() { # pid -> utime+stime in ns
  local ticks
  ticks=$(awk '{print $14 + $15}' "/proc/$1/stat")
  echo $((ticks * 1000000000 / $(getconf CLK_TCK)))
}

results=()
row() { results+=("$(printf '%-16s %-10s %10s %10s %12s' "$@")"); }

for store in $STORES; do
  log "carmine --cores 1 --store $store on CPU 1"
  args=(serve --cores 1 --cpus 1 --store "$store" --listen "127.0.0.1:$OSD_PORT" --nbd "127.0.0.1:$NBD_PORT")
  if [ "$store" = segment ]; then
    rm -f "$DIR/carmine.img"
    args+=(--device "$DIR/carmine.img" --device-size "$((size_bytes * 3 / 1024 / 1024))MiB")
  fi
  RUST_LOG=warn taskset -c 1 "$CARMINE" "${args[@]}" &
  server_pid=$!
  wait_port "$OSD_PORT"; wait_port "$NBD_PORT"
  "$CARMINE" image create bench --size "$SIZE" --object-size "$OBJECT_SIZE" --target "127.0.0.1:$OSD_PORT" >/dev/null
  uri="nbd://127.0.0.1:$NBD_PORT/bench"
  prefill "$uri"
  for rw in randwrite randread; do
    side=${rw#rand}
    busy0=$(status_field busy_ns); req0=$(status_field nbd_requests)
    read -r iops p99 < <(fio_phase "$uri" "$rw" "$side")
    busy1=$(status_field busy_ns); req1=$(status_field nbd_requests)
    ns=$(( (busy1 - busy0) / (req1 - req0 + 1) ))
    row "carmine-$store" "$rw" "$iops" "$p99" "$ns"
  done
  kill -INT "$server_pid"; wait "$server_pid" || true; server_pid=
done

log "nbdkit memory plugin on CPU 1"
taskset -c 1 nbdkit -f -p "$NBDKIT_PORT" -i 127.0.0.1 memory "$SIZE" &
server_pid=$!
wait_port "$NBDKIT_PORT"
uri="nbd://127.0.0.1:$NBDKIT_PORT/"
prefill "$uri"
for rw in randwrite randread; do
  side=${rw#rand}
  cpu0=$(proc_cpu_ns "$server_pid")
  before=$(date +%s%N)
  read -r iops p99 < <(fio_phase "$uri" "$rw" "$side")
  cpu1=$(proc_cpu_ns "$server_pid")
  ops=$(( iops * DURATION ))
  row nbdkit-memory "$rw" "$iops" "$p99" "$(( (cpu1 - cpu0) / (ops + 1) ))"
done
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=

printf '\nfio %s, 4 KiB, iodepth 32, numjobs 4, %s s per phase, fio on CPU 0, server on CPU 1\n' \
  "$(fio --version)" "$DURATION"
printf '%-16s %-10s %10s %10s %12s\n' server phase IOPS p99_us cpu_ns/op
printf '%s\n' "${results[@]}"
echo "cpu_ns/op: carmine busy_ns / NBD requests (status); nbdkit process CPU time / ops"
