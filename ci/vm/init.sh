#!/bin/sh
# The guest's init (busybox sh): loads the VFIO modules, binds every NVMe controller to vfio-pci,
# runs /tests/* in order with CARMINE_NVME_PCI set to the first controller's PCI address, prints
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

device=
for path in /sys/bus/pci/devices/*; do
  # PCI class 01 08 02: mass storage, non-volatile memory, NVM Express.
  [ "$(cat "$path/class")" = 0x010802 ] || continue
  address=$(basename "$path")
  if [ -e "$path/driver" ]; then echo "$address" > "$path/driver/unbind"; fi
  echo vfio-pci > "$path/driver_override"
  echo "$address" > /sys/bus/pci/drivers_probe
  group=$(basename "$(readlink "$path/iommu_group")")
  echo "CARMINE-VM: $address bound to $(basename "$(readlink "$path/driver")"), iommu group $group"
  [ -n "$device" ] || device=$address
done
[ -n "$device" ] || echo "CARMINE-VM: no NVMe controller found"
ls /dev/vfio

export CARMINE_NVME_PCI=$device RUST_BACKTRACE=1 HOME=/tmp
cd /tmp
pass=0
fail=0
for test in $(cat /tests/order); do
  echo "CARMINE-VM: running $test"
  if "/tests/$test" --test-threads=1; then
    pass=$((pass + 1))
  else
    echo "CARMINE-VM: $test FAILED (exit $?)"
    fail=$((fail + 1))
  fi
done
echo "CARMINE-VM-RESULT pass=$pass fail=$fail device=${device:-none}"
poweroff -f
