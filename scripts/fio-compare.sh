#!/usr/bin/env bash
# fio vs `carmine store-bench` on the same filesystem: what the device gives (fio, io_uring,
# O_DIRECT, 4 KiB, QD32, one job) against what one segment-store shard makes of it (store-bench,
# same bs and queue depth, no network).
#
# Usage: scripts/fio-compare.sh                 20 s per run, files in target/fio-compare
#        DURATION=5 scripts/fio-compare.sh      shorter runs (seconds)
# Environment:
#   DURATION  seconds per run (default 20)
#   DIR       scratch directory, on a filesystem with O_DIRECT (ext4, xfs, btrfs; not tmpfs)
#             (default target/fio-compare; its two 2 GiB files are removed at the end)
#   SIZE      size of the fio file (default 2g, fio syntax: k/m/g)
#   CARMINE_SIZE  size of the carmine device file (default: SIZE); the store's cleaner
#             reclaims what the randwrite run overwrites (its cost shows as write amplification)
#   CARMINE   carmine binary (default target/release/carmine, built if missing)
#   CPU       pin fio and carmine to this CPU list (taskset -c), e.g. 1; default: not pinned
#   KEEP=1    keep the scratch files
#   VERIFY=1  store-bench randread also compares every byte read (fio does not; see below)
#
# Reading randread: both keep 32 reads in flight, and both refill one at a time: fio submits
# each replacement as soon as it has reaped, store-bench's randread takes one completion per poll
# (--completions-per-poll, default 1 for randread) and so hands each replacement to the device
# after one op's work. On this project's VM the virtio disk completes a queue's reads together,
# so reads go in cycles; taking a whole batch of 32 before refilling left the disk idle ~90 us
# a cycle (0.6-0.7x fio, against 0.9-1.0x now; ARCHITECTURE.md, "Reads against fio", and
# scripts/block-cycles.sh to see it). The two files differ (fio.img laid out by fio; carmine.img the store's log, its live
# blocks scattered by the randwrite run), but fio replaying carmine's exact offsets on
# carmine.img was as fast as fio on fio.img: the layout does not cost reads here. Both runs
# share the machine with whatever else runs: compare several runs, not one.
#
# Reading the result: fio's randwrite issues plain O_DIRECT writes and never flushes; the
# segment store acknowledges a write only once its journal record is durable (a record write,
# then a flush, at most two records in flight). So carmine's write IOPS are expected to be well below
# fio's: the ratio measures the cost of that durability, honestly.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
DIR=${DIR:-target/fio-compare}
SIZE=${SIZE:-2g}
CARMINE_SIZE=${CARMINE_SIZE:-$SIZE}
CARMINE=${CARMINE:-target/release/carmine}
BS=4k
QD=32

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'fio-compare: %s\n' "$*" >&2; exit 1; }

if ! command -v fio >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing fio"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio >/dev/null
  else
    die "fio is not installed: install it (apt-get install fio) or run as root on Debian/Ubuntu"
  fi
fi
command -v python3 >/dev/null || die "python3 is needed to read the JSON reports"
if [ ! -x "$CARMINE" ]; then
  log "building carmine (release)"
  cargo build --release --quiet
fi
[ -x "$CARMINE" ] || die "$CARMINE not found"

# fio does not compare what it reads with what it wrote: by default neither does store-bench's
# timed randread (--no-verify; the store still checks every block's crc32c). VERIFY=1 keeps
# store-bench's byte-for-byte comparison (about a fifth more CPU per read for the benchmark).
NO_VERIFY=(--no-verify)
[ -n "${VERIFY:-}" ] && NO_VERIFY=()
pin=()
if [ -n "${CPU:-}" ]; then
  pin=(taskset -c "$CPU")
fi

mkdir -p "$DIR"
FIO_FILE="$DIR/fio.img"
DEVICE="$DIR/carmine.img"
cleanup() {
  if [ -z "${KEEP:-}" ]; then
    rm -f "$FIO_FILE" "$DEVICE"
  fi
}
trap cleanup EXIT

# A fresh log each time; like fio's file, it is written whole before the first run
# (store-bench --preallocate), so both measure overwrites, not block allocation.
rm -f "$DEVICE"

# fio lays the file out (writes it whole) before its first run, so randread reads real data.
fio_run() { # rw -> IOPS
  local rw=$1 out="$DIR/fio-$1.json"
  log "fio $rw: bs=$BS iodepth=$QD ${DURATION}s on $FIO_FILE ($SIZE)"
  ${pin[@]+"${pin[@]}"} fio --name="$rw" --filename="$FIO_FILE" --size="$SIZE" --ioengine=io_uring \
    --direct=1 --bs="$BS" --iodepth="$QD" --rw="$rw" --numjobs=1 --time_based \
    --runtime="$DURATION" --group_reporting --output-format=json >"$out" \
    || die "fio $rw failed (see $out)"
  python3 - "$out" "$rw" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
# fio may print notes before the JSON document.
report = json.loads(text[text.index("{"):])
job = report["jobs"][0]
side = "write" if "write" in sys.argv[2] else "read"
print(f'{job[side]["iops"]:.0f} {job[side]["clat_ns"]["percentile"].get("99.000000", 0) / 1000:.0f}')
EOF
}

carmine_run() { # op -> IOPS
  local op=$1 out="$DIR/carmine-$1.json"
  log "carmine store-bench $op: bs=$BS qd=$QD ${DURATION}s on $DEVICE ($CARMINE_SIZE)"
  ${pin[@]+"${pin[@]}"} "$CARMINE" store-bench --device "$DEVICE" --device-size "$CARMINE_SIZE" --preallocate --op "$op" \
    --bs "$BS" --qd "$QD" --duration "${DURATION}s" ${NO_VERIFY[@]+"${NO_VERIFY[@]}"} --json >"$out" 2>"$DIR/carmine-$op.log" \
    || die "carmine store-bench $op failed: $(tail -3 "$DIR/carmine-$op.log")"
  python3 - "$out" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
if report["verify_failures"]:
    sys.exit(f"carmine: {report['verify_failures']} verify failures: {sys.argv[1]}")
# IOPS of successful ops only: failed ops (no_space when the log is full) complete at once.
ok = report["ops"] - report["errors"]
iops = ok / report["duration_s"] if report["duration_s"] else 0
wa = report["write_amplification"]
errors = ",".join(f"{k}={v}" for k, v in report["errors_by_status"].items()) or "none"
print(f'{iops:.0f} {report["latency_us"]["p99"]:.0f} {f"{wa:.3f}" if wa is not None else "-"} {errors}')
EOF
}

# Each result is captured whole first, so that a failing run stops the script (set -e).
result=$(fio_run randwrite); read -r fio_w fio_w_p99 <<<"$result"
result=$(fio_run randread); read -r fio_r fio_r_p99 <<<"$result"
result=$(carmine_run randwrite); read -r car_w car_w_p99 car_w_wa car_w_errors <<<"$result"
result=$(carmine_run randread); read -r car_r car_r_p99 _ car_r_errors <<<"$result"

ratio() { python3 -c "import sys; f, c = float(sys.argv[1]), float(sys.argv[2]); print(f'{c / f:.3f}' if f else '-')" "$1" "$2"; }

echo
echo "bs=$BS qd=$QD ${DURATION}s per run, $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}')), $(nproc) CPU(s)${CPU:+, pinned to CPU $CPU}"
printf '%-10s %12s %14s %8s %14s %16s\n' op "fio IOPS" "carmine IOPS" ratio "fio p99 us" "carmine p99 us"
printf '%-10s %12s %14s %8s %14s %16s\n' randwrite "$fio_w" "$car_w" "$(ratio "$fio_w" "$car_w")" "$fio_w_p99" "$car_w_p99"
printf '%-10s %12s %14s %8s %14s %16s\n' randread "$fio_r" "$car_r" "$(ratio "$fio_r" "$car_r")" "$fio_r_p99" "$car_r_p99"
echo "carmine randwrite write amplification: $car_w_wa (journal bytes / bytes of acknowledged writes)"
echo "carmine errors: randwrite $car_w_errors, randread $car_r_errors (IOPS above count successful ops only)"
echo "note: fio randwrite never flushes; carmine acknowledges a write only after its journal record is flushed."
echo "JSON reports: $DIR/fio-*.json $DIR/carmine-*.json"
