#!/usr/bin/env bash
# What a disk really sees of a read benchmark: records every block request's issue and
# completion (tracefs block_rq_issue / block_rq_complete, in a trace instance of its own) on the
# disk under FILE while COMMAND runs, keeps the requests inside FILE's extents (filefrag), and
# prints, over the last seconds of the run:
#   - request count, sizes and kinds (one 4 KiB read per op? metadata reads? writes?),
#   - requests in flight at the disk, time-weighted (is the queue depth really there?),
#   - cycles: on a disk that completes a queue's requests together (this project's VM: its
#     virtio disk completes the 32 reads of a batch in one interrupt), the time from a batch of
#     completions to the first and the last new request, and from those to the next batch.
#     The first is the time the device waits for the benchmark.
#
# Usage: scripts/block-cycles.sh FILE COMMAND [ARGS...]
#   e.g. scripts/block-cycles.sh d.img target/release/carmine store-bench --device d.img \
#          --op randread --no-verify --duration 3s
#        scripts/block-cycles.sh d.img fio --name=r --filename=d.img --ioengine=io_uring \
#          --direct=1 --bs=4k --iodepth=32 --rw=randread --time_based --runtime=3
# Environment: WINDOW seconds analysed, at the end of the run (default 2); TRACE=PATH keeps
# the raw trace there. Needs root and tracefs (/sys/kernel/tracing); FILE on a local disk.
set -euo pipefail

die() { printf 'block-cycles: %s\n' "$*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 FILE COMMAND [ARGS...]"
FILE=$1; shift
[ -f "$FILE" ] || die "$FILE: not a file (create it first, e.g. with a store-bench run)"
[ "$(id -u)" = 0 ] || die "needs root (tracefs)"
TRACEFS=/sys/kernel/tracing
[ -d "$TRACEFS/events/block" ] || die "no block tracepoints under $TRACEFS (mount tracefs)"
command -v filefrag >/dev/null || die "filefrag (e2fsprogs) is needed to map FILE to disk sectors"
command -v python3 >/dev/null || die "python3 is needed"

# The disk holding FILE, as the dev_t the block tracepoints report (major << 20 | minor).
dev_hex=$(stat -c %d "$FILE")
major=$(( dev_hex >> 8 & 0xfff )); minor=$(( (dev_hex & 0xff) | (dev_hex >> 12 & 0xfff00) ))
# A partition's requests are traced on its whole disk, with disk sectors: filefrag's physical
# blocks are relative to the partition, so add its start.
sysdev=/sys/dev/block/$major:$minor
part_start=0
if [ -f "$sysdev/partition" ]; then
  part_start=$(cat "$sysdev/start")
  disk=$(basename "$(dirname "$(readlink -f "$sysdev")")")
  IFS=: read -r major minor < "/sys/block/$disk/dev"
fi
dev=$(( major << 20 | minor ))

instance=$TRACEFS/instances/block-cycles-$$
mkdir "$instance"
raw=${TRACE:-$(mktemp)}
extents=$(mktemp)
cleanup() {
  echo 0 > "$instance/tracing_on" 2>/dev/null || true
  for event in block_rq_issue block_rq_complete; do
    echo 0 > "$instance/events/block/$event/enable" 2>/dev/null || true
  done
  rmdir "$instance" 2>/dev/null || true
  [ -n "${TRACE:-}" ] || rm -f "$raw"
  rm -f "$extents"
}
trap cleanup EXIT
echo 131072 > "$instance/buffer_size_kb"
for event in block_rq_issue block_rq_complete; do
  echo "dev == $dev" > "$instance/events/block/$event/filter"
  echo 1 > "$instance/events/block/$event/enable"
done
echo 1 > "$instance/tracing_on"
"$@"
echo 0 > "$instance/tracing_on"
cat "$instance/trace" > "$raw"

filefrag -v "$FILE" > "$extents"
python3 - "$raw" "$extents" "$part_start" "${WINDOW:-2}" <<'EOF'
import collections, re, statistics, sys

raw, extent_list, part_start, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
# FILE's extents in 512-byte disk sectors (filefrag -v: logical and physical 4 KiB blocks).
extents = []
for line in open(extent_list):
    m = re.match(r'\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):', line)
    if m:
        extents.append((part_start + int(m[1]) * 8, part_start + (int(m[2]) + 1) * 8))
if not extents:
    sys.exit("block-cycles: filefrag listed no extents")
def in_file(sector):
    return any(lo <= sector < hi for lo, hi in extents)

pattern = re.compile(r'\s([\d.]+): block_rq_(issue|complete): \S+ (\S+) (?:(\d+) )?\(\) (\d+) \+ (\d+)')
events = []
for line in open(raw):
    m = pattern.search(line)
    if m and in_file(int(m[5])):
        events.append((float(m[1]) * 1e6, m[2] == 'issue', m[3], int(m[5]), int(m[6])))
if not events:
    sys.exit("block-cycles: no request reached FILE's extents (page cache? another disk?)")
end = events[-1][0]
start = end - window * 1e6

sizes, kinds, pending, intervals = collections.Counter(), collections.Counter(), {}, []
for t, issue, rwbs, sector, count in events:
    if issue:
        pending[(sector, count)] = t
        if t >= start:
            sizes[count * 512] += 1
            kinds[rwbs] += 1
    elif (sector, count) in pending:
        intervals.append((pending.pop((sector, count)), t))
issued = sum(sizes.values())
print(f"last {window:g} s: {issued} requests ({issued / window:.0f}/s); bytes: {dict(sizes)}; kinds: {dict(kinds)}")

points = sorted([(s, 1) for s, c in intervals if c >= start] + [(c, -1) for s, c in intervals if c >= start])
depth, last, weight = 0, None, collections.Counter()
for t, step in points:
    if last is not None and t > start:
        weight[depth] += t - max(last, start)
    last, depth = t, depth + step
total = sum(weight.values()) or 1
mean = sum(d * w for d, w in weight.items()) / total
print(f"in flight at the disk: mean {mean:.1f}; idle (0 in flight) {weight[0] / total:.0%} of the time; "
      + "most common: " + ", ".join(f"{d}: {w / total:.0%}" for d, w in weight.most_common(4)))

# Runs of consecutive issues and of consecutive completions.
runs = []
for t, issue, *_ in (e for e in events if e[0] >= start):
    if runs and runs[-1][0] == issue:
        runs[-1][2] = t
        runs[-1][3] += 1
    else:
        runs.append([issue, t, t, 1])
cycles = [(b[1] - a[2], b[2] - a[2], c[1] - b[1], c[1] - a[2])
          for a, b, c in zip(runs, runs[1:], runs[2:])
          if not a[0] and b[0] and not c[0] and b[3] >= 2]
if len(cycles) < 10:
    print("cycles: too few batches of completions (the disk completes requests one by one?)")
    sys.exit()
names = ["completions -> first new request", "completions -> last new request",
         "first new request -> next completions", "cycle (completions to completions)"]
print(f"{len(cycles)} cycles, median (p10-p90) us:")
for i, name in enumerate(names):
    values = sorted(c[i] for c in cycles)
    print(f"  {name:40s} {statistics.median(values):6.0f}  ({values[len(values) // 10]:.0f}-{values[9 * len(values) // 10]:.0f})")
EOF
