#!/bin/sh
# Runs in the ci/vm guest (busybox sh), after the driver tests: the whole server on the emulated
# NVMe controller. carmine mkfs --device nvme:ADDRESS, serve on it, load --verify (mixed, every
# read checked), stop; serve again (mount replays the log from the device: every object the
# first server held must be there), load --verify again, stop, carmine fsck (exit 0: clean).
# Exit status 0 only if every step succeeded. Emulation is slow: a functional test, not a
# benchmark (the load numbers it prints mean nothing).
set -eu
export RUST_LOG_STYLE=never
device="nvme:${CARMINE_NVME_PCI:?CARMINE_NVME_PCI not set}"
ip link set lo up

ready() {
  # The server binds before its cores mount: wait for both (port 6800 = 0x1A90 in state LISTEN).
  grep -q ':1A90 00000000:0000 0A' /proc/net/tcp && grep -q "mounted shard" "$1"
}

serve() {
  RUST_LOG=info carmine serve --device "$device" --cores 1 --idle adaptive --listen 127.0.0.1:6800 \
    --queue-depth 64 > "/tmp/serve-$1.log" 2>&1 &
  server=$!
  tries=0
  until ready "/tmp/serve-$1.log"; do
    tries=$((tries + 1))
    if [ $tries -gt 600 ] || ! kill -0 $server 2>/dev/null; then
      echo "e2e: server did not start"; cat "/tmp/serve-$1.log"; exit 1
    fi
    sleep 0.1
  done
}

stop() {
  kill -TERM $server
  wait $server || { echo "e2e: server exited with $?"; cat "/tmp/serve-$1.log"; exit 1; }
}

load() {
  carmine load --op mixed --verify --objects 16 --object-size 1MiB --clients 2 --qd 8 \
    --duration 3s --seed "$1" --json > "/tmp/load-$1.json"
  cat "/tmp/load-$1.json"
  grep -q '"verify_failures":0' "/tmp/load-$1.json" || { echo "e2e: verify failures"; exit 1; }
}

echo "e2e: carmine mkfs --device $device"
carmine mkfs --device "$device" --cores 1 --segment-size 4MiB
serve first
load 1
stop first
echo "e2e: restart on the same device"
objects=$(sed -n 's/.*"store_objects":\([0-9]*\).*/\1/p' /tmp/load-1.json)
[ "${objects:-0}" -gt 0 ] || { echo "e2e: the first run stored no objects"; exit 1; }
serve second
grep "mounted shard 0 of $device: $objects objects" /tmp/serve-second.log ||
  { echo "e2e: remount did not find the $objects objects"; cat /tmp/serve-second.log; exit 1; }
load 2
stop second
echo "e2e: carmine fsck --device $device"
carmine fsck --device "$device"
echo "e2e: ok"
