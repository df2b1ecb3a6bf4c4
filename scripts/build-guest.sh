#!/usr/bin/env bash
# Builds the test guest from Debian packages into target/guest/:
#   kernel      the Debian cloud kernel's bzImage (linux-image-cloud-amd64)
#   vmlinux     the uncompressed ELF inside it (PVH boot for QEMU microvm, and Firecracker)
#   initrd.img  a busybox initramfs whose /init prints METALD-GUEST-READY on the serial console
# The build is cached: when the outputs are newer than their inputs, a second run does nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="${METALD_GUEST_DIR:-$root/target/guest}"
mkdir -p "$out"

need_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Packages on the host: busybox-static for the initramfs, and the tools used to unpack the kernel.
missing=()
for p in busybox-static cpio lz4 python3; do need_pkg "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-guest: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The kernel is unpacked from the package archive rather than installed, so the host's /boot and its
# initramfs hooks are left alone. A host that already has the cloud kernel installed is used as is.
kroot="$out/kernel-pkg"
vmlinuz=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)
# METALD_KERNEL_FROM_PACKAGE=1 ignores an installed kernel (as on a fresh machine).
[ "${METALD_KERNEL_FROM_PACKAGE:-0}" = 1 ] && vmlinuz=""
if [ -n "$vmlinuz" ]; then
  kver=${vmlinuz#/boot/vmlinuz-}
  moddir="/lib/modules/$kver"
else
  vmlinuz=$(ls "$kroot"/boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$vmlinuz" ]; then
    echo "build-guest: downloading linux-image-cloud-amd64" >&2
    apt-get update -qq
    dep=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$dep" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$dep")
    rm -rf "$kroot" && mkdir -p "$kroot"
    dpkg-deb -x "$tmp"/*.deb "$kroot"
    rm -rf "$tmp"
    vmlinuz=$(ls "$kroot"/boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n 1)
  fi
  kver=$(basename "$vmlinuz"); kver=${kver#vmlinuz-}
  moddir="$kroot/lib/modules/$kver"
fi

init_src="$root/guest/init"
stamp="$out/.stamp"
want="$vmlinuz $(cat "$init_src" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && [ -s "$out/kernel" ] && [ -s "$out/vmlinux" ] && [ -s "$out/initrd.img" ]; then
  exit 0
fi

# Every output is written beside its final name and renamed into place, so a VM starting
# while the image is rebuilt never reads a half-written file.
cp "$vmlinuz" "$out/kernel.tmp" && mv "$out/kernel.tmp" "$out/kernel"

# Extract the ELF vmlinux: the bzImage carries an LZ4 payload. Find the LZ4 legacy frame magic
# (02 21 4c 18) and decompress from there; lz4 stops at the end of the frame and the trailing
# bytes are ignored.
python3 - "$out/kernel" "$out/vmlinux.tmp" <<'PY'
import subprocess, sys
data = open(sys.argv[1], "rb").read()
magic = b"\x02\x21\x4c\x18"
pos = data.find(magic)
while pos != -1:
    r = subprocess.run(["lz4", "-dc"], input=data[pos:], capture_output=True)
    if r.stdout[:4] == b"\x7fELF":
        open(sys.argv[2], "wb").write(r.stdout)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("build-guest: no LZ4-compressed ELF found in " + sys.argv[1])
PY
mv "$out/vmlinux.tmp" "$out/vmlinux"

# The initramfs: busybox, the virtio and ACPI-button modules (they are modules in this kernel),
# and /init.
ir=$(mktemp -d)
trap 'rm -rf "$ir"' EXIT
mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc/acpi/PWRF}
cp /bin/busybox "$ir/bin/busybox"
for m in virtio virtio_ring virtio_mmio virtio_blk net_failover failover virtio_net button evdev; do
  f=$(find "$moddir/kernel" -name "$m.ko*" | head -n 1 || true)
  [ -n "$f" ] && cp "$f" "$ir/lib/modules/"
done
cp "$init_src" "$ir/init"
chmod 0755 "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initrd.img.tmp")
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$want" > "$stamp"
echo "build-guest: kernel, vmlinux and initrd.img written to $out" >&2
