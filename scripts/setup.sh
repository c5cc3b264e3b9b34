#!/bin/sh
# Prepares a machine for Carmine's NVMe driver (SPDK's setup.sh role): reserves hugepages and
# binds NVMe controllers to vfio-pci (and back). POSIX sh: the ci/vm guest runs it with busybox.
#
# Usage: scripts/setup.sh [--dry-run] status
#        scripts/setup.sh [--dry-run] hugepages COUNT     reserve COUNT 2 MiB hugepages
#        scripts/setup.sh [--dry-run] bind PCI_ADDRESS    give the controller to vfio-pci
#        scripts/setup.sh [--dry-run] unbind PCI_ADDRESS  give it back to the kernel's nvme driver
#
# bind refuses a controller with a namespace (or partition) that is mounted, used as swap, or
# held by another block device (LVM, md, dm-crypt): its data would be pulled from under it.
# --dry-run prints each write it would make instead of making it. Needs root (except status
# and --dry-run). CARMINE_SETUP_SYSFS / CARMINE_SETUP_PROC replace /sys and /proc (tests).
set -eu
sysfs=${CARMINE_SETUP_SYSFS:-/sys}
procfs=${CARMINE_SETUP_PROC:-/proc}
dry_run=0

die() { echo "setup.sh: $*" >&2; exit 1; }

# write VALUE FILE: the one way this script changes the system.
write() {
  if [ "$dry_run" = 1 ]; then
    echo "would write '$1' to $2"
  else
    printf '%s\n' "$1" > "$2" || die "cannot write '$1' to $2"
  fi
}

pci_dir() {
  dir=$sysfs/bus/pci/devices/$1
  [ -d "$dir" ] || die "no PCI device $1 ($dir missing)"
  [ "$(cat "$dir/class")" = 0x010802 ] || die "$1 is not an NVMe controller (class $(cat "$dir/class"))"
  echo "$dir"
}

driver_of() {
  if [ -e "$1/driver" ]; then basename "$(readlink "$1/driver")"; else echo none; fi
}

# The block devices (namespaces and their partitions) of the controller at sysfs dir $1.
block_devices() {
  for namespace in "$1"/nvme/nvme*/nvme*n*; do
    [ -d "$namespace" ] || continue
    name=$(basename "$namespace")
    echo "$name"
    for partition in "$namespace"/"$name"p*; do
      [ -d "$partition" ] && basename "$partition"
    done
  done
  return 0
}

# Why the block device $2 (of controller dir $1) is in use, or nothing.
in_use() {
  if grep -q "^/dev/$2 " "$procfs/mounts" 2>/dev/null; then
    echo "/dev/$2 is mounted on $(grep "^/dev/$2 " "$procfs/mounts" | cut -d' ' -f2 | head -n1)"
  elif grep -q "^/dev/$2 " "$procfs/swaps" 2>/dev/null; then
    echo "/dev/$2 is used as swap"
  else
    for holder in "$sysfs/class/block/$2/holders/"*; do
      [ -e "$holder" ] && { echo "/dev/$2 is held by $(basename "$holder")"; return 0; }
    done
  fi
  return 0
}

status() {
  echo "hugepages: $(grep -s HugePages_Total "$procfs/meminfo" | tr -s ' ' | cut -d' ' -f2) reserved, $(grep -s HugePages_Free "$procfs/meminfo" | tr -s ' ' | cut -d' ' -f2) free (2 MiB)"
  found=0
  for dir in "$sysfs"/bus/pci/devices/*; do
    [ -f "$dir/class" ] && [ "$(cat "$dir/class")" = 0x010802 ] || continue
    found=1
    group=none
    [ -e "$dir/iommu_group" ] && group=$(basename "$(readlink "$dir/iommu_group")")
    line="$(basename "$dir"): driver $(driver_of "$dir"), iommu group $group"
    for block in $(block_devices "$dir"); do
      reason=$(in_use "$dir" "$block")
      line="$line, $block${reason:+ (in use: $reason)}"
    done
    echo "$line"
  done
  [ "$found" = 1 ] || echo "no NVMe controllers"
}

bind() {
  dir=$(pci_dir "$1")
  [ "$(driver_of "$dir")" != vfio-pci ] || { echo "$1: already bound to vfio-pci"; return 0; }
  for block in $(block_devices "$dir"); do
    reason=$(in_use "$dir" "$block")
    [ -z "$reason" ] || die "refusing to bind $1: $reason"
  done
  [ -e "$dir/iommu_group" ] || die "$1 has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
  if [ ! -d "$sysfs/bus/pci/drivers/vfio-pci" ] && [ "$dry_run" = 0 ]; then
    modprobe vfio-pci || die "cannot load vfio-pci"
  fi
  write vfio-pci "$dir/driver_override"
  [ ! -e "$dir/driver" ] || write "$1" "$dir/driver/unbind"
  write "$1" "$sysfs/bus/pci/drivers_probe"
  [ "$dry_run" = 1 ] || [ "$(driver_of "$dir")" = vfio-pci ] || die "$1 did not bind to vfio-pci"
  echo "$1: bound to vfio-pci (iommu group $(basename "$(readlink "$dir/iommu_group")")); use --device nvme:$1"
}

unbind() {
  dir=$(pci_dir "$1")
  # An empty override lets the kernel's own match (nvme) claim it again.
  write "" "$dir/driver_override"
  [ ! -e "$dir/driver" ] || write "$1" "$dir/driver/unbind"
  write "$1" "$sysfs/bus/pci/drivers_probe"
  [ "$dry_run" = 1 ] || echo "$1: now bound to $(driver_of "$dir")"
}

hugepages() {
  case "$1" in ''|*[!0-9]*) die "hugepages COUNT: not a number: '$1'" ;; esac
  write "$1" "$procfs/sys/vm/nr_hugepages"
  [ "$dry_run" = 1 ] ||
    echo "hugepages: $(cat "$procfs/sys/vm/nr_hugepages") of $1 reserved (the kernel gives fewer when memory is fragmented)"
}

[ "${1:-}" != --dry-run ] || { dry_run=1; shift; }
case "${1:-}" in
  status) status ;;
  bind) bind "${2:?bind PCI_ADDRESS}" ;;
  unbind) unbind "${2:?unbind PCI_ADDRESS}" ;;
  hugepages) hugepages "${2:-}" ;;
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
