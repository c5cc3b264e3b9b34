#!/usr/bin/env bash
# Does `--coalesce auto` (the default) cost a client with one request in flight anything?
# Runs the same QD1 workloads against `carmine serve --coalesce MODE` for each MODE, in
# alternating rounds (so that a shared machine's load drift hits every mode alike):
#   fio's nbd engine, 4 KiB randread, iodepth 1, numjobs 1 (NBD frontend)
#   carmine load --op randread --qd 1 --clients 1 (OSD wire protocol over TCP)
# fio on CPU 0, the server (`--cores 1`) on CPU 1, memory store. Prints IOPS, p50 and p99
# per run and the coalescing counters the server reports (pauses, milliseconds on, failed
# tries): a QD1 client should see at most one paused millisecond a second under auto.
#
# Usage: scripts/coalesce-qd1.sh
# Environment:
#   DURATION  seconds per run (default 10)
#   ROUNDS    rounds over the modes (default 2)
#   MODES     --coalesce values, in order (default "off auto")
#   IDLE      carmine's idle policy (default adaptive, as scripts/nbd-compare.sh)
#   CARMINE   carmine binary (default target/release/carmine, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
MODES=${MODES:-off auto}
IDLE=${IDLE:-adaptive}
CARMINE=${CARMINE:-target/release/carmine}
NBD_PORT=${NBD_PORT:-10897}
OSD_PORT=${OSD_PORT:-6897}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'coalesce-qd1: %s\n' "$*" >&2; exit 1; }
for tool in fio jq; do command -v $tool >/dev/null || die "$tool not installed"; done
[ -x "$CARMINE" ] || { log "building $CARMINE"; cargo build --release --bin carmine --quiet; }

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

counters() {
  "$CARMINE" status --target "127.0.0.1:$OSD_PORT" --json \
    | jq -r '.totals | "\(.coalesce_pauses) \(.coalesce_windows_on) \(.coalesce_tries_failed)"'
}

results=()
row() { results+=("$(printf '%-6s %-5s %-9s %9s %8s %8s %9s %7s %6s' "$@")"); }

measure() { # mode round
  local mode=$1 round=$2 uri iops p50 p99 c0 c1
  log "round $round: carmine --coalesce $mode"
  (RUST_LOG=warn exec taskset -c 1 "$CARMINE" serve --cores 1 --cpus 1 --idle "$IDLE" \
    --coalesce "$mode" --store memory --listen "127.0.0.1:$OSD_PORT" \
    --nbd "127.0.0.1:$NBD_PORT") &
  server_pid=$!
  wait_port "$OSD_PORT"; wait_port "$NBD_PORT"
  "$CARMINE" image create qd1 --size 256MiB --target "127.0.0.1:$OSD_PORT" >/dev/null
  uri="nbd://127.0.0.1:$NBD_PORT/qd1"
  taskset -c 0 fio --name=prefill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 \
    --size=256M --output-format=json >/dev/null 2>&1 || die "prefill failed"

  read -r c0 < <(counters | tr ' ' ',')
  read -r iops p50 p99 < <(taskset -c 0 fio --name=qd1 --ioengine=nbd --uri="$uri" --rw=randread \
    --bs=4k --iodepth=1 --numjobs=1 --time_based --runtime="$DURATION" --size=256M \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p' \
    | jq -r '.jobs[0].read | [(.iops | floor), (.clat_ns.percentile."50.000000" / 1000),
        (.clat_ns.percentile."99.000000" / 1000)] | map(tostring) | join(" ")')
  read -r c1 < <(counters | tr ' ' ',')
  IFS=, read -r pa0 on0 tf0 <<<"$c0"; IFS=, read -r pa1 on1 tf1 <<<"$c1"
  row "$round" "$mode" nbd-fio "$iops" "$p50" "$p99" $((pa1 - pa0)) $((on1 - on0)) $((tf1 - tf0))

  "$CARMINE" load --target "127.0.0.1:$OSD_PORT" --op randwrite --qd 8 --clients 1 \
    --duration 1s --objects 16 --object-size 1MiB --cpus 0 >/dev/null
  read -r c0 < <(counters | tr ' ' ',')
  read -r iops p50 p99 < <("$CARMINE" load --target "127.0.0.1:$OSD_PORT" --op randread \
    --qd 1 --clients 1 --duration "${DURATION}s" --objects 16 --object-size 1MiB --cpus 0 --json \
    | jq -r '[(.iops | floor), .latency_us.p50, .latency_us.p99] | map(tostring) | join(" ")')
  read -r c1 < <(counters | tr ' ' ',')
  IFS=, read -r pa0 on0 tf0 <<<"$c0"; IFS=, read -r pa1 on1 tf1 <<<"$c1"
  row "$round" "$mode" osd-load "$iops" "$p50" "$p99" $((pa1 - pa0)) $((on1 - on0)) $((tf1 - tf0))

  kill -INT "$server_pid"; wait "$server_pid" || true; server_pid=
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do measure "$mode" "$round"; done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
printf '\nQD1 4 KiB randread, %s s per run, idle %s; load average before: %s, after: %s\n' \
  "$DURATION" "$IDLE" "$load_before" "$load_after"
printf '%-6s %-5s %-9s %9s %8s %8s %9s %7s %6s\n' round mode client IOPS p50_us p99_us pauses on_ms failed
printf '%s\n' "${results[@]}"
