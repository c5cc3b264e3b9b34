#!/usr/bin/env bash
# Builds Carmine's SPDK STAND-IN (not SPDK; see README.md) into a prefix:
#   ci/spdk-stub/build.sh [PREFIX]     (default: target/spdk-stub)
# and prints the PKG_CONFIG_PATH to build Carmine's `spdk` feature against it:
#   PKG_CONFIG_PATH=$(ci/spdk-stub/build.sh) cargo test -p carmine-storage --features spdk
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix="${1:-$here/../../target/spdk-stub}"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include/spdk" "$prefix/obj"
prefix="$(cd "$prefix" && pwd)"
cc="${CC:-cc}"
flags=(-std=gnu11 -O2 -g -fPIC -Wall -Wextra -Werror -I"$here/include" -I"$here")
"$cc" "${flags[@]}" -c "$here/env.c" -o "$prefix/obj/env.o"
"$cc" "${flags[@]}" -c "$here/nvme.c" -o "$prefix/obj/nvme.o"
# Static archives: nothing to find at run time (real SPDK is used as shared libraries).
rm -f "$prefix/lib/libspdk_env_dpdk.a" "$prefix/lib/libspdk_nvme.a"
ar rcs "$prefix/lib/libspdk_env_dpdk.a" "$prefix/obj/env.o"
ar rcs "$prefix/lib/libspdk_nvme.a" "$prefix/obj/nvme.o"
cp "$here"/include/spdk/*.h "$prefix/include/spdk/"
for pc in spdk_nvme spdk_env_dpdk; do
  sed "s|@PREFIX@|$prefix|" "$here/$pc.pc.in" > "$prefix/lib/pkgconfig/$pc.pc"
done
echo "$prefix/lib/pkgconfig"
