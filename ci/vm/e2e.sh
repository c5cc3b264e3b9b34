#!/bin/sh
# Runs in the ci/vm guest (busybox sh), after the driver tests: the whole server on the emulated
# NVMe controller, the way tests/segment.rs runs it on a file, with 2 cores (two I/O queue pairs
# on one controller, one per reactor).
#  1. carmine mkfs --device nvme:ADDRESS; serve (both shards register their buffers for DMA);
#     load --prefill --verify (every block written, every read checked); stop.
#  2. serve again (mount replays the log from the device): every object is there, and a
#     randread --verify finds every block (no unwritten reads, no verify failures).
#  3. kill -9 the server in the middle of a write load; serve again: the same, nothing lost.
#  4. stop; carmine fsck --device nvme:ADDRESS is clean.
# Exit status 0 only if every step succeeded. Emulation is slow: a functional test, not a
# benchmark (the load numbers it prints mean nothing).
set -eu
export RUST_LOG_STYLE=never
device="nvme:${CARMINE_NVME_PCI:?CARMINE_NVME_PCI not set}"
shape="--objects 8 --object-size 64KiB --clients 2 --qd 4"
ip link set lo up

ready() {
  # The server binds before its cores mount: wait for both (port 6800 = 0x1A90 in state LISTEN).
  grep -q ':1A90 00000000:0000 0A' /proc/net/tcp && [ "$(grep -c "mounted shard" "$1")" = 2 ]
}

serve() {
  RUST_LOG=info carmine serve --device "$device" --cores 2 --idle adaptive \
    --listen 127.0.0.1:6800 --queue-depth 64 > "/tmp/serve-$1.log" 2>&1 &
  server=$!
  tries=0
  until ready "/tmp/serve-$1.log"; do
    tries=$((tries + 1))
    if [ $tries -gt 600 ] || ! kill -0 $server 2>/dev/null; then
      echo "e2e: server did not start"; cat "/tmp/serve-$1.log"; exit 1
    fi
    sleep 0.1
  done
  grep "mounted shard" "/tmp/serve-$1.log"
}

stop() {
  kill -TERM $server
  wait $server || { echo "e2e: server exited with $?"; cat "/tmp/serve-$1.log"; exit 1; }
}

# check NAME FIELD=VALUE...: the load report /tmp/load-NAME.json has each field at that value.
check() {
  name=$1
  shift
  for want in "$@"; do
    grep -q "\"${want%%=*}\":${want#*=}[,}]" "/tmp/load-$name.json" ||
      { echo "e2e: load $name: want $want"; cat "/tmp/load-$name.json"; exit 1; }
  done
  echo "e2e: load $name: $*"
}

# shellcheck disable=SC2086
read_back() {
  carmine load --op randread --verify --duration 2s $shape --json > "/tmp/load-$1.json"
  check "$1" errors=0 verify_failures=0 unwritten_reads=0
}

echo "e2e: carmine mkfs --device $device"
carmine mkfs --device "$device" --cores 2 --segment-size 4MiB
serve first
# Each shard's store maps its block pool and journal buffers for DMA (4 KiB blocks move
# without a bounce copy).
[ "$(grep -c "registered for DMA" /tmp/serve-first.log)" = 2 ] ||
  { echo "e2e: the shards did not register their buffers for DMA"; cat /tmp/serve-first.log; exit 1; }
# shellcheck disable=SC2086
carmine load --prefill --verify --duration 2s $shape --json > /tmp/load-write.json
check write errors=0 verify_failures=0 store_objects=8
stop first

echo "e2e: clean restart on the same device"
serve second
objects() {
  # The objects the shards' mount lines report, summed.
  sed -n 's/.*mounted shard [0-9]* of [^ ]*: \([0-9]*\) objects.*/\1/p' "$1" |
    { sum=0; while read -r n; do sum=$((sum + n)); done; echo $sum; }
}
[ "$(objects /tmp/serve-second.log)" = 8 ] ||
  { echo "e2e: remount did not find the 8 objects"; exit 1; }
read_back after-restart

echo "e2e: kill -9 in the middle of writes"
# shellcheck disable=SC2086
carmine load --duration 6s $shape --json > /tmp/load-killed.json 2>&1 &
writer=$!
sleep 3
kill -KILL $server
wait $server 2>/dev/null || true
wait $writer 2>/dev/null || true
serve third
[ "$(objects /tmp/serve-third.log)" = 8 ] ||
  { echo "e2e: remount after kill did not find the 8 objects"; exit 1; }
read_back after-kill
stop third

echo "e2e: carmine fsck --device $device"
carmine fsck --device "$device"
echo "e2e: ok"
