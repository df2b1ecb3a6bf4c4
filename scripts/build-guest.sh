#!/usr/bin/env bash
# Builds the test guest from Debian packages into target/guest/:
#   kernel      the Debian cloud kernel's bzImage (linux-image-cloud-amd64)
#   vmlinux     the uncompressed ELF inside it (PVH boot for QEMU microvm, and Firecracker)
#   initrd.img  a busybox initramfs whose /init starts qemu-ga on the virtio-serial port
#               org.qemu.guest_agent.0 and prints METALD-GUEST-READY on the serial console
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

# The guest agent: the real qemu-ga from Debian's qemu-guest-agent package, unpacked (not installed)
# like the kernel, with the shared libraries it links against. Libraries come from the host; a
# dependency package that is not installed on the host is downloaded and unpacked beside it.
qroot="$out/qga-pkg"
download_pkgs() { # download_pkgs DIR PKG...: apt-get download PKGs and unpack them into DIR
  local dir=$1 tmp; shift
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "$@")
  for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$dir"; done
  rm -rf "$tmp"
}
if [ ! -x "$qroot/usr/sbin/qemu-ga" ]; then
  echo "build-guest: downloading qemu-guest-agent" >&2
  apt-get update -qq
  rm -rf "$qroot" && mkdir -p "$qroot/deps"
  download_pkgs "$qroot" qemu-guest-agent
  # Walk the Depends of qemu-ga and, transitively, of any package unpacked here; only packages
  # missing on the host are fetched.
  queue=$(apt-cache depends qemu-guest-agent | awk '$1 ~ /^[|]?(Pre)?Depends:$/ {print $2}')
  seen=" "
  while [ -n "$queue" ]; do
    next=""
    for p in $queue; do
      case "$p" in \<*) continue ;; esac
      case "$seen" in *" $p "*) continue ;; esac
      seen="$seen$p "
      need_pkg "$p" && continue
      echo "build-guest: $p is not on the host, unpacking it for qemu-ga" >&2
      download_pkgs "$qroot/deps" "$p"
      next="$next $(apt-cache depends "$p" | awk '$1 ~ /^[|]?(Pre)?Depends:$/ {print $2}')"
    done
    queue=$next
  done
fi
qga="$qroot/usr/sbin/qemu-ga"
qga_libpath="$qroot/deps/lib/x86_64-linux-gnu:$qroot/deps/usr/lib/x86_64-linux-gnu"
# The libraries ldd resolves (absolute paths, the dynamic loader included), one a line.
qga_libs=$(LD_LIBRARY_PATH="$qga_libpath" ldd "$qga" | awk '
  /not found/ {print "MISSING:" $1; next}
  $2 == "=>" && $3 ~ /^\// {print $3; next}
  $1 ~ /^\// {print $1}')
if grep -q '^MISSING:' <<<"$qga_libs"; then
  echo "build-guest: qemu-ga needs libraries that were not found: $(grep '^MISSING:' <<<"$qga_libs" | cut -d: -f2 | xargs)" >&2
  exit 1
fi

# The modules the guest loads (virtio-mmio transport, block, net, virtio-serial for the agent,
# the pvpanic panic device, the ACPI power button). They are all modules in the cloud kernel.
modules="virtio virtio_ring virtio_mmio virtio_blk net_failover failover virtio_net virtio_console pvpanic pvpanic-mmio button evdev"

init_src="$root/guest/init"
stamp="$out/.stamp"
# The stamp covers every input: the kernel, init, this script, busybox, qemu-ga and its libraries.
want="$vmlinuz $(cat "$init_src" "$0" /bin/busybox "$qga" $qga_libs | sha256sum | cut -d' ' -f1)"
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

# The initramfs: busybox, the modules above, qemu-ga with its libraries, and /init.
ir=$(mktemp -d)
trap 'rm -rf "$ir"' EXIT
mkdir -p "$ir"/{bin,sbin,usr/sbin,dev,proc,sys,tmp,run,lib/modules,etc/acpi/PWRF}
cp /bin/busybox "$ir/bin/busybox"
for m in $modules; do
  f=$(find "$moddir/kernel" -name "$m.ko*" | head -n 1 || true)
  [ -n "$f" ] && cp "$f" "$ir/lib/modules/"
done
# Each library goes to the path ldd printed (the loader to /lib64/ld-linux-x86-64.so.2, the
# ELF interpreter); a library taken from the unpacked dependencies goes to the path under /.
cp "$qga" "$ir/usr/sbin/qemu-ga"
for l in $qga_libs; do
  dst=${l#"$qroot/deps"}
  mkdir -p "$ir$(dirname "$dst")"
  cp -L "$l" "$ir$dst"
done
cat > "$ir/etc/os-release" <<'EOF'
NAME="metald test guest"
ID=metald-guest
VERSION_ID=1
PRETTY_NAME="metald test guest 1"
EOF
# qemu-ga 7.2's guest-shutdown runs `/sbin/shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"`
# (powerdown|halt|reboot) with stdio on /dev/null, and waits for it. The guest has no init system, so it reboots at once for -r and powers
# off at once otherwise (a halted guest would only hang a test).
cat > "$ir/sbin/shutdown" <<'EOF'
#!/bin/sh
# Called by qemu-ga with its stdio on /dev/null, so the console line goes to /dev/console.
mode=poweroff
for a in "$@"; do
  [ "$a" = -r ] && mode=reboot
done
echo "METALD-GUEST-SHUTDOWN mode=$mode args=$*" >/dev/console 2>/dev/null
sync
if [ "$mode" = reboot ]; then exec /bin/busybox reboot -f; fi
exec /bin/busybox poweroff -f
EOF
chmod 0755 "$ir/sbin/shutdown"
cp "$init_src" "$ir/init"
chmod 0755 "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 > "$out/initrd.img.tmp")
mv "$out/initrd.img.tmp" "$out/initrd.img"
echo "$want" > "$stamp"
echo "build-guest: kernel, vmlinux and initrd.img written to $out" >&2
