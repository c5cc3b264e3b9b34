#!/usr/bin/env bash
# Boots the CI guest (ci/vm/build.sh) on QEMU TCG with an emulated NVMe controller behind an
# emulated Intel IOMMU, and exits 0 only if the guest reports every test binary passed.
#
# Usage: ci/vm/run.sh BINARY...          (test binaries to run inside the guest, in order)
# Env:   CARMINE_VM_TIMEOUT   seconds before the guest is killed (default 600)
#        CARMINE_VM_DIR       work directory (default target/vm): kernel, initrd, disk, serial log
# The kernel has no VFIO no-IOMMU mode, hence intel-iommu; KVM cannot boot guests here, hence TCG.
# no_timer_check: on a loaded host TCG can be too slow for the kernel's early check that the
# timer interrupt works through the remapped IO-APIC, which then panics at boot.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${CARMINE_VM_DIR:-$here/../../target/vm}
timeout_s=${CARMINE_VM_TIMEOUT:-600}
[ $# -gt 0 ] || { echo "usage: ci/vm/run.sh BINARY..." >&2; exit 2; }
mkdir -p "$work"
start=$(date +%s)
"$here/build.sh" "$work" "$@"
built=$(date +%s)

# A fresh, zeroed 256 MiB namespace each run, at PCI 0000:00:04.0 (the address in issue 6). Its
# address, serial and size reach the guest's init (and the tests) as environment variables: the
# kernel hands unknown key=value parameters to init.
disk_bytes=$((256 << 20))
serial=deadbeef
rm -f "$work/disk.img" "$work/faulty.img"
truncate -s "$disk_bytes" "$work/disk.img"
# A second controller whose reads of sector 2048 (byte 1 MiB) fail with EIO (QEMU's blkdebug):
# the driver must report the medium error as its NVMe status.
truncate -s 16M "$work/faulty.img"
cat > "$work/blkdebug.conf" <<'CONF'
[inject-error]
event = "read_aio"
errno = "5"
sector = "2048"
iotype = "read"
CONF

log=$work/serial.log
boot() {
  set +e
  timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
    -machine q35,accel=tcg,kernel-irqchip=split -cpu max -smp 2 -m 1024 \
    -device intel-iommu,intremap=on,caching-mode=on \
    -kernel "$work/kernel" -initrd "$work/initrd.gz" \
    -append "console=ttyS0 intel_iommu=on panic=-1 quiet no_timer_check CARMINE_NVME_PCI=0000:00:04.0 CARMINE_NVME_EXPECT_SERIAL=$serial CARMINE_NVME_EXPECT_BYTES=$disk_bytes CARMINE_NVME_FAULTY_PCI=0000:00:05.0" \
    -drive file="$work/disk.img",if=none,id=d0,format=raw,discard=unmap \
    -device nvme,serial=$serial,drive=d0,addr=4 \
    -drive file="blkdebug:$work/blkdebug.conf:$work/faulty.img",if=none,id=d1,format=raw \
    -device nvme,serial=faulty,drive=d1,addr=5 \
    -nodefaults -serial stdio -display none -no-reboot </dev/null | tee "$log"
  qemu_status=${PIPESTATUS[0]}
  set -e
}
boot
# A guest that died before its init printed anything (a kernel panic at boot under a loaded
# host) is an infrastructure failure, not a test result: boot once more.
if ! grep -aq '^CARMINE-VM' "$log" && [ "$qemu_status" != 124 ]; then
  echo "[vm/run] the guest died before its init ran (qemu exit $qemu_status): booting once more" >&2
  cp "$log" "$log.first"
  rm -f "$work/disk.img" && truncate -s "$disk_bytes" "$work/disk.img"
  boot
fi
end=$(date +%s)
echo "[vm/run] build $((built - start)) s, boot+tests $((end - built)) s, qemu exit $qemu_status"

result=$(grep -a '^CARMINE-VM-RESULT ' "$log" | tail -n1 | tr -d '\r')
if [ -z "$result" ]; then
  if [ "$qemu_status" = 124 ]; then
    echo "[vm/run] FAIL: guest timed out after ${timeout_s} s (serial log: $log)" >&2
  else
    echo "[vm/run] FAIL: guest gave no result line (qemu exit $qemu_status; serial log: $log)" >&2
  fi
  exit 1
fi
echo "[vm/run] $result"
case "$result" in
  *" fail=0 "*) ;;
  *) echo "[vm/run] FAIL: guest tests failed (serial log: $log)" >&2; exit 1 ;;
esac
case "$result" in
  *" pass=0 "*) echo "[vm/run] FAIL: no test ran in the guest" >&2; exit 1 ;;
esac
case "$result" in
  *"device=none"*) echo "[vm/run] FAIL: the guest found no NVMe controller" >&2; exit 1 ;;
esac
echo "[vm/run] ok"
