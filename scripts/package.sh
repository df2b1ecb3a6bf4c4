#!/usr/bin/env bash
# Builds the Debian package "metald" with cargo-deb and checks it; prints the .deb's path last.
#
#   scripts/package.sh          # -> target/debian/metald_<version>-1_<arch>.deb
#
# The package holds /usr/bin/metald and /usr/bin/metalctl (release builds), the systemd unit
# (/lib/systemd/system/metald.service, from deploy/systemd/ with ExecStart on /usr/bin), the
# commented config /etc/metald/metald.toml (a conffile; packaging/metald.toml), the Prometheus
# and Loki rules and the Grafana dashboard under /usr/share/metald/, bash, zsh and fish
# completions and gzipped man pages (both from `metalctl generate`), and the docs under
# /usr/share/doc/metald/. The cargo-deb metadata is [package.metadata.deb] in
# crates/metalctl/Cargo.toml.
#
# After building, the .deb is checked: `dpkg-deb -c` must list every file above, and the package
# is unpacked with `dpkg -x` into a scratch directory, where metald and metalctl must run, the
# config and unit must be there, and the unpacked metald must start with the packaged config
# (state in the scratch directory) and answer `metalctl list` before it is stopped with SIGTERM.
# Any missing piece exits non-zero.
#
# Installs what it needs: cargo-deb (`cargo install`, once) and, as root, dpkg-dev if missing.
# CARGO_BUILD_JOBS sets cargo's parallelism (default: every core).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
started=$SECONDS
jobs="${CARGO_BUILD_JOBS:-$(nproc)}"
cargo_deb_version="3.8.0"

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'package.sh: %s\n' "$*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------------------------
if ! command -v dpkg-shlibdeps >/dev/null 2>&1; then
  # cargo-deb computes the package's library dependencies with dpkg-shlibdeps.
  [ "$(id -u)" = 0 ] || die "dpkg-shlibdeps is missing: apt-get install dpkg-dev"
  say "installing dpkg-dev"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dpkg-dev >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
  say "installing cargo-deb $cargo_deb_version (once; a minute or two)"
  cargo install cargo-deb --version "$cargo_deb_version" --locked -j "$jobs"
fi
say "$(cargo deb --version)"

# --- build ------------------------------------------------------------------------------------
say "building metald and metalctl (release)"
cargo build --release --locked -j "$jobs" -p metald -p metalctl
bin="${CARGO_TARGET_DIR:-$root/target}/release"

# Files the package takes from target/generated/ (crates/metalctl/Cargo.toml names them).
gen="$root/target/generated"
rm -rf "$gen"
mkdir -p "$gen/man"
say "generating completions and man pages"
"$bin/metalctl" generate --out "$gen" >/dev/null
for page in "$gen"/*.1; do
  gzip -9 -n -c "$page" >"$gen/man/$(basename "$page").gz"
done
# The repository's unit runs a hand-installed /usr/local/bin/metald; the package's is /usr/bin.
sed 's|^ExecStart=/usr/local/bin/metald |ExecStart=/usr/bin/metald |' \
  deploy/systemd/metald.service >"$gen/metald.service"
grep -q '^ExecStart=/usr/bin/metald --config /etc/metald/metald.toml$' "$gen/metald.service" \
  || die "deploy/systemd/metald.service: its ExecStart line is not the expected /usr/local/bin/metald --config /etc/metald/metald.toml"

say "building the .deb"
mkdir -p "$root/target/debian"
rm -f "$root"/target/debian/metald_*.deb
# cargo-deb warns about each source outside target/release/ ("will not be built"); those from
# target/generated/ are meant (written above), so only their warnings are dropped.
if ! cargo deb -p metalctl --no-build --output "$root/target/debian/" \
  >"$gen/cargo-deb.out" 2>"$gen/cargo-deb.err"; then
  cat "$gen/cargo-deb.err" >&2
  die "cargo deb failed"
fi
grep -v -F "'../../target/generated/" "$gen/cargo-deb.err" >&2 || true
deb="$(tail -n 1 "$gen/cargo-deb.out")"
[ -f "$deb" ] || die "cargo deb printed no .deb path (got: $deb)"

# --- check ------------------------------------------------------------------------------------
say "checking $deb"
missing=()
need() { missing+=("$*"); printf '   MISSING: %s\n' "$*" >&2; }

listing="$(dpkg-deb -c "$deb")"
expect=(
  usr/bin/metald
  usr/bin/metalctl
  lib/systemd/system/metald.service
  etc/metald/metald.toml
  usr/share/metald/prometheus/alerts.yml
  usr/share/metald/loki/metald-log-alerts.yml
  usr/share/metald/grafana/metald-dashboard.json
  usr/share/bash-completion/completions/metalctl
  usr/share/zsh/vendor-completions/_metalctl
  usr/share/fish/vendor_completions.d/metalctl.fish
  usr/share/doc/metald/README.md
  usr/share/doc/metald/copyright
)
for page in "$gen"/man/*.1.gz; do
  expect+=("usr/share/man/man1/$(basename "$page")")
done
for f in "${expect[@]}"; do
  grep -q -E " \./$f\$" <<<"$listing" || need "dpkg-deb -c lists no /$f"
done
grep -q -E ' \./usr/share/man/man1/metalctl-create\.1\.gz$' <<<"$listing" \
  || need "no man page for metalctl create"

[ "$(dpkg-deb -f "$deb" Package)" = metald ] || need "the package is not named metald"
grep -q qemu-system-x86 <<<"$(dpkg-deb -f "$deb" Recommends)" || need "no Recommends: qemu-system-x86"
grep -q microVM <<<"$(dpkg-deb -f "$deb" Description | head -n 1)" \
  || need "the Description's summary does not say what it is"
grep -qx /etc/metald/metald.toml <<<"$(dpkg-deb -I "$deb" conffiles 2>/dev/null)" \
  || need "/etc/metald/metald.toml is not a conffile"

scratch="$(mktemp -d /tmp/metald-pkg.XXXXXX)"
metald_pid=""
# A child that exited is a zombie until waited for, and kill -0 still reaches it.
alive() {
  local st
  st="$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
cleanup() {
  if [ -n "$metald_pid" ] && alive "$metald_pid"; then
    kill -KILL "$metald_pid" 2>/dev/null || true
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT
# Installed with dpkg, as on a host, but into a scratch root with its own (empty) dpkg database:
# dpkg records the files and the conffile. The scratch root has no libc package, hence
# --force-depends; the binaries run with this host's.
r="$scratch/root"
mkdir -p "$r/var/lib/dpkg/info" "$r/var/lib/dpkg/updates"
: >"$r/var/lib/dpkg/status"
dpkg --root="$r" --force-depends -i "$deb" >"$scratch/dpkg.log" 2>&1 \
  || { need "dpkg -i into a scratch root failed:"; sed 's/^/     | /' "$scratch/dpkg.log" >&2; }
grep -qx 'Status: install ok installed' <<<"$(dpkg --root="$r" -s metald 2>/dev/null)" \
  || need "dpkg does not record metald as installed"
grep -qx /etc/metald/metald.toml <<<"$(dpkg --root="$r" -L metald 2>/dev/null)" \
  || need "dpkg does not list /etc/metald/metald.toml as metald's"

for f in "${expect[@]}"; do
  [ -e "$r/$f" ] || need "/$f is not in the unpacked package"
done
"$r/usr/bin/metald" --help >/dev/null || need "usr/bin/metald --help fails"
"$r/usr/bin/metalctl" --help >/dev/null || need "usr/bin/metalctl --help fails"
grep -q '^metalctl ' <<<"$("$r/usr/bin/metalctl" --version)" || need "usr/bin/metalctl --version fails"
for b in metald metalctl; do
  [ -x "$r/usr/bin/$b" ] || need "usr/bin/$b is not executable"
done
unit="$r/lib/systemd/system/metald.service"
if [ -f "$unit" ]; then
  grep -qx 'ExecStart=/usr/bin/metald --config /etc/metald/metald.toml' "$unit" \
    || need "the unit does not start /usr/bin/metald with /etc/metald/metald.toml"
  grep -qx 'KillMode=process' "$unit" || need "the unit lost KillMode=process"
fi
[ -s "$r/etc/metald/metald.toml" ] || need "the config is empty"
for page in "$r"/usr/share/man/man1/*.1.gz; do
  [ -e "$page" ] || break
  head -c 3 < <(gzip -dc "$page") | grep -q -E '^(\.ie|\.TH)' || need "$(basename "$page") is not a gzipped roff page"
done
grep -q 'create' "$r/usr/share/bash-completion/completions/metalctl" 2>/dev/null \
  || need "the bash completion does not know metalctl create"

# The unpacked metald starts with the packaged config (which it validates: unknown keys and
# bad values stop it) and serves the API at the config's default socket; only the state dir
# and the metrics port are moved into the scratch directory.
if [ -x "$r/usr/bin/metald" ] && [ -f "$r/etc/metald/metald.toml" ]; then
  state="$scratch/state"
  mkdir -p "$state"
  "$r/usr/bin/metald" --config "$r/etc/metald/metald.toml" --state-dir "$state" \
    --metrics-listen 127.0.0.1:0 --log-format text >"$scratch/metald.log" 2>&1 &
  metald_pid=$!
  ready=""
  for _ in $(seq 1 150); do
    alive "$metald_pid" || break
    if "$r/usr/bin/metalctl" --endpoint "unix:$state/metald.sock" list >/dev/null 2>&1; then
      ready=yes
      break
    fi
    sleep 0.2
  done
  if [ -z "$ready" ]; then
    need "metald did not start with the packaged config; its log:"
    sed 's/^/     | /' "$scratch/metald.log" >&2
  fi
  if alive "$metald_pid"; then
    kill -TERM "$metald_pid"
    for _ in $(seq 1 100); do
      alive "$metald_pid" || break
      sleep 0.1
    done
    if alive "$metald_pid"; then
      need "metald did not stop within 10 s of SIGTERM"
      kill -KILL "$metald_pid" 2>/dev/null || true
    fi
  fi
  status=0
  wait "$metald_pid" || status=$?
  metald_pid=""
  if [ -n "$ready" ] && [ "$status" != 0 ]; then
    need "metald exited with status $status on SIGTERM; its log:"
    sed 's/^/     | /' "$scratch/metald.log" >&2
  fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
  die "${#missing[@]} check(s) failed for $deb"
fi
say "ok: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version), $(grep -c . <<<"$listing") entries, $(du -h "$deb" | cut -f1), $((SECONDS - started)) s"
echo "$deb"
