#!/usr/bin/env bash
# Builds the CI guest for the NVMe tests from scratch: a Debian kernel, its VFIO modules, and a
# busybox initramfs that binds the emulated NVMe controller to vfio-pci, runs the given test
# binaries and prints one result line. Downloads are cached in ci/vm/cache/ (gitignored).
#
# Usage: ci/vm/build.sh OUT_DIR BINARY...
#   OUT_DIR gets `kernel` and `initrd.gz`. Each BINARY (with its shared libraries, found by ldd)
#   is copied to /tests/ in the guest and run there in order; see init.sh for how. BINARY::FILTER
#   passes FILTER to a test binary (only the tests whose names contain it run).
#   CARMINE_VM_TOOLS: more executables (space separated) for the guest's /bin, not run as tests.
#   CARMINE_VM_EXTRA_FILES: files copied to the same absolute path in the guest (valgrind's tools).
# Needs: Debian 12 (apt-get), root to install missing packages (qemu-system-x86, busybox-static,
# cpio, xz-utils, kmod).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CARMINE_VM_CACHE:-$here/cache}
out=${1:?usage: ci/vm/build.sh OUT_DIR BINARY...}
shift
mkdir -p "$cache" "$out"

log() { printf '[vm/build] %s\n' "$*" >&2; }

# 1. Host packages, installed only when missing.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v depmod >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ci/vm/build.sh: missing ${need[*]}: run as root or install them" >&2; exit 1
  fi
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# 2. The kernel package: the version linux-image-amd64 depends on, downloaded once.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "ci/vm/build.sh: cannot find the kernel package behind linux-image-amd64" >&2; exit 1; }
kdir=$cache/$kpkg
if [ ! -f "$kdir/.unpacked" ]; then
  log "downloading $kpkg"
  rm -rf "$kdir" && mkdir -p "$kdir"
  (cd "$cache" && rm -f "$kpkg"_*.deb && apt-get download "$kpkg" >&2)
  dpkg-deb -x "$cache/$kpkg"_*.deb "$kdir"
  # The package ships no modules.dep (its postinst runs depmod): make one for this tree.
  depmod -b "$kdir" "$(ls "$kdir/lib/modules" | head -n1)"
  # Keep the kernel and the module directories the guest can use (VFIO, irqbypass, nvme):
  # the cache shrinks from ~470 MB to a few.
  find "$kdir/lib/modules" -name '*.ko*' | grep -v -e /drivers/vfio/ -e /virt/lib/ -e /drivers/nvme/ |
    xargs rm -f
  rm -f "$cache/$kpkg"_*.deb
  touch "$kdir/.unpacked"
fi
kver=$(ls "$kdir/lib/modules" | head -n1)
moddir=$kdir/lib/modules/$kver
cp "$kdir/boot/vmlinuz-$kver" "$out/kernel"

# 3. The initramfs tree.
root=$out/root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,tests,modules,lib64,lib/x86_64-linux-gnu,etc}
busybox=$(command -v busybox || echo /bin/busybox)
cp "$busybox" "$root/bin/busybox"
for applet in sh mount mkdir cat echo ls sleep poweroff insmod grep sed tr seq dd cmp head tail \
  basename ip kill ps wc cut readlink printf modprobe; do
  ln -sf busybox "$root/bin/$applet"
done

# Modules in load order: each one's dependencies (modules.dep) before it. vfio_pci pulls in
# vfio_pci_core, vfio, irqbypass; vfio_iommu_type1 is the container's IOMMU driver.
declare -A seen=()
order=()
add_module() {
  local name=$1 line path dep
  # Module names treat - and _ alike (vfio_pci is vfio-pci.ko).
  line=$(grep -E "(^|/)${name//[-_]/[-_]}\.ko(\.xz|\.zst|\.gz)?:" "$moddir/modules.dep" || true)
  [ -n "$line" ] || { echo "ci/vm/build.sh: module $name not in $kpkg" >&2; exit 1; }
  path=${line%%:*}
  [ -z "${seen[$path]:-}" ] || return 0
  seen[$path]=1
  for dep in ${line#*:}; do
    dep=$(basename "$dep"); dep=${dep%%.ko*}; dep=${dep//-/_}
    add_module "$dep"
  done
  order+=("$path")
}
for module in vfio vfio_iommu_type1 irqbypass vfio_pci_core vfio_pci; do add_module "$module"; done
: > "$root/modules/order"
for path in "${order[@]}"; do
  name=$(basename "$path"); name=${name%%.ko*}; name=${name//-/_}.ko
  case "$path" in
    *.xz) xz -dc "$moddir/$path" > "$root/modules/$name" ;;
    *.zst) zstd -dcq "$moddir/$path" > "$root/modules/$name" ;;
    *.gz) gzip -dc "$moddir/$path" > "$root/modules/$name" ;;
    *) cp "$moddir/$path" "$root/modules/$name" ;;
  esac
  echo "$name" >> "$root/modules/order"
done
log "modules: $(tr '\n' ' ' < "$root/modules/order")"

# Test binaries and tools, and the shared libraries they need (glibc, libgcc_s), at the same
# paths as on the host.
copy_libraries() {
  { ldd "$1" 2>/dev/null || true; } | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
: > "$root/tests/order"
for spec in "$@"; do
  # BINARY::FILTER runs only the tests whose names contain FILTER.
  binary=${spec%%::*}
  filter=
  [ "$binary" = "$spec" ] || filter=${spec#*::}
  name=$(basename "$binary")
  cp "$binary" "$root/tests/$name"
  echo "$name $filter" >> "$root/tests/order"
  copy_libraries "$binary"
done
for tool in ${CARMINE_VM_TOOLS:-}; do
  cp "$tool" "$root/bin/"
  copy_libraries "$tool"
done
for file in ${CARMINE_VM_EXTRA_FILES:-}; do
  mkdir -p "$root$(dirname "$file")"
  cp -L "$file" "$root$file"
  copy_libraries "$file"
done
[ -f /lib64/ld-linux-x86-64.so.2 ] && cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
cp "$here/init.sh" "$root/init"
cp "$here/../../scripts/setup.sh" "$root/bin/setup.sh"
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.gz"
log "guest: $out/kernel ($kver), $out/initrd.gz ($(du -h "$out/initrd.gz" | cut -f1))"
