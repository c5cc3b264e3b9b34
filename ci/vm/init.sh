#!/bin/sh
# The guest's init (busybox sh): loads the VFIO modules, reserves hugepages and binds every NVMe
# controller to vfio-pci (scripts/setup.sh),
# runs /tests/* in order with CARMINE_NVME_PCI set to the controller run.sh names (else the first
# found), prints
# one machine-readable line and powers off:
#   CARMINE-VM-RESULT pass=N fail=M device=ADDRESS
# (ci/vm/run.sh turns it into its exit status). A missing line means the guest died.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages

for module in $(cat /modules/order); do
  insmod "/modules/$module" || echo "CARMINE-VM: insmod $module failed"
done

# Hugepages for the driver's DMA memory, and every NVMe controller to vfio-pci, both through
# scripts/setup.sh (so CI exercises it).
setup.sh hugepages 64
device=
for path in /sys/bus/pci/devices/*; do
  # PCI class 01 08 02: mass storage, non-volatile memory, NVM Express.
  [ "$(cat "$path/class")" = 0x010802 ] || continue
  address=$(basename "$path")
  setup.sh bind "$address" || echo "CARMINE-VM: binding $address failed"
  [ -n "$device" ] || device=${CARMINE_NVME_PCI:-$address}
done
setup.sh status
[ -n "$device" ] || echo "CARMINE-VM: no NVMe controller found"
ls /dev/vfio

export CARMINE_NVME_PCI=$device RUST_BACKTRACE=1 HOME=/tmp
cd /tmp
pass=0
fail=0
while read -r test filter; do
  echo "CARMINE-VM: running $test $filter"
  # shellcheck disable=SC2086
  if "/tests/$test" --test-threads=1 --nocapture $filter < /dev/null; then
    pass=$((pass + 1))
  else
    echo "CARMINE-VM: $test FAILED (exit $?)"
    fail=$((fail + 1))
  fi
done < /tests/order
echo "CARMINE-VM-RESULT pass=$pass fail=$fail device=${device:-none}"
poweroff -f
