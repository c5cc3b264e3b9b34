#!/bin/sh
# In the ci/vm guest (see ci/vm/cost.sh): the cost rounds of storage/tests/nvme.rs under
# callgrind, collecting only inside NvmeQueuePair's submit_read and poll.
set -eu
ios=$((50 * 32))
for mode in zero_copy bounced; do
  valgrind.bin --tool=callgrind --callgrind-out-file="/tmp/callgrind.$mode" --collect-atstart=no \
    --toggle-collect='*NvmeQueuePair as *QueuePair>::submit_read' \
    --toggle-collect='*NvmeQueuePair as *QueuePair>::poll' \
    nvme-cost "cost_rounds_$mode" --exact --test-threads=1 2>&1 | grep -v '^==' || true
  instructions=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "/tmp/callgrind.$mode")
  echo "CARMINE-COST mode=$mode instructions=$instructions reads=$ios per_read=$((instructions / ios)) (emulated controller)"
done
