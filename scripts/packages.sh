#!/usr/bin/env bash
# The Debian packages as an operator meets them: builds ivring-host and ivring-guest with
# cargo-deb (man pages and completions made by xtask first), installs them, checks the
# binaries in /usr/bin, the man pages, that systemd accepts the units, that every file a
# unit or a doc names is installed; then removes and purges them and checks nothing is
# left. Installs what it needs (cargo-deb, man-db, systemd, dpkg-dev). Run as root.
# One PASS/FAIL line per check; last line: N passed, M failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/packages.sh installs packages: run it as root" >&2
  exit 2
fi

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# check NAME CMD...: PASS if CMD succeeds, else FAIL with the end of its output.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(tail -n 5 <<< "$out" | tr '\n' ' ')"; fi
}
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit
}

# --- tools
need=()
command -v man > /dev/null || need+=(man-db)
command -v systemd-analyze > /dev/null || need+=(systemd)
command -v dpkg-shlibdeps > /dev/null || need+=(dpkg-dev) # the packages' library depends
if [ "${#need[@]}" != 0 ]; then
  check "apt-get install ${need[*]}" bash -c "apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${need[*]}"
fi
if ! command -v cargo-deb > /dev/null; then
  check "cargo install cargo-deb" cargo install cargo-deb --locked
fi
command -v cargo-deb > /dev/null || finish

# --- build
check "man pages and completions (xtask)" cargo run --release -q -p xtask -- docs target/packaging
debs=()
for pkg in ivring-host ivring-guest; do
  if out=$(cargo deb -p "$pkg" 2>&1); then
    deb=$(tail -n 1 <<< "$out")
    if [ -f "$deb" ]; then pass "cargo deb -p $pkg ($(basename "$deb"))"; debs+=("$deb")
    else fail "cargo deb -p $pkg" "no package at '$deb'"; fi
  else
    fail "cargo deb -p $pkg" "$(tail -n 5 <<< "$out" | tr '\n' ' ')"
  fi
done
[ "${#debs[@]}" = 2 ] || finish

# --- install (man pages and docs even where dpkg is told to leave them out, as in
# minimal images)
dpkg -r ivring-host ivring-guest > /dev/null 2>&1
check "dpkg -i" dpkg -i --path-include='/usr/share/man/man1/ivring-*' \
  --path-include='/usr/share/doc/ivring-*' "${debs[@]}"
listed=$(dpkg -L ivring-host ivring-guest 2> /dev/null | sort -u)

for bin in ivring-host ivring-guest; do
  check "/usr/bin/$bin --version" bash -c "/usr/bin/$bin --version | grep -qx '$bin [0-9.]*'"
done
for page in ivring-host ivring-host-serve ivring-host-bridge ivring-host-status ivring-guest \
  ivring-guest-bridge ivring-guest-status; do
  check "man $page renders" bash -c "man -P cat $page 2> /dev/null | grep -q 'SYNOPSIS' &&
    man -P cat $page 2> /dev/null | grep -q '$page'"
done
check "man ivring-host lists the subcommands" bash -c \
  "man -P cat ivring-host 2> /dev/null | grep -q 'ivring-host-serve(1)'"
for f in /usr/share/bash-completion/completions/ivring-host \
  /usr/share/zsh/vendor-completions/_ivring-guest /usr/share/fish/vendor_completions.d/ivring-host.fish; do
  check "completion $f" test -s "$f"
done

units=(/usr/lib/systemd/system/ivring-host-serve.service
  /usr/lib/systemd/system/ivring-host-bridge.service
  /usr/lib/systemd/system/ivring-daemon.service
  /usr/lib/systemd/system/ivring-guest-bridge.service)
for u in "${units[@]}"; do
  # Units it names but the package does not ship (libvirt, qemu-guest-agent) are fine.
  check "systemd-analyze verify $(basename "$u")" bash -c "
    out=\$(systemd-analyze verify '$u' 2>&1); rc=\$?
    out=\$(grep -v -e 'qemu-guest-agent.service' -e 'libvirtd.service' -e 'virtqemud.service' <<< \"\$out\")
    echo \"\$out\"; [ \$rc = 0 ] && [ -z \"\$out\" ]"
done

# Every file a unit or an installed doc names: binaries, man pages, documentation.
named=()
for u in "${units[@]}"; do
  named+=($(grep -oE '/usr/[A-Za-z0-9_./-]+' "$u" | sort -u))
  for m in $(grep -oE 'man:[a-z-]+\([0-9]\)' "$u"); do
    named+=("/usr/share/man/man1/$(sed -E 's/man:([a-z-]+)\(([0-9])\)/\1.\2/' <<< "$m")")
  done
done
missing=()
for f in "${named[@]}"; do
  [ -e "$f" ] || [ -e "$f.gz" ] || missing+=("$f")
done
if [ "${#missing[@]}" = 0 ]; then pass "every file the units name is installed (${#named[@]})"
else fail "every file the units name is installed" "missing: ${missing[*]}"; fi
check "the libvirt hook is installed, executable" test -x /usr/share/ivring-host/libvirt/qemu
check "the units point at /usr/bin" bash -c "! grep -n '/usr/local' ${units[*]}"

# --- remove, purge, nothing left
check "dpkg -r" dpkg -r ivring-host ivring-guest
check "dpkg --purge" dpkg --purge ivring-host ivring-guest
left=()
while IFS= read -r f; do
  [ -n "$f" ] && [ ! -d "$f" ] && [ -e "$f" ] && left+=("$f")
done <<< "$listed"
for d in /usr/share/doc/ivring-host /usr/share/doc/ivring-guest; do
  [ -e "$d" ] && left+=("$d")
done
if [ "${#left[@]}" = 0 ]; then pass "nothing left after purge ($(wc -l <<< "$listed") paths checked)"
else fail "nothing left after purge" "${left[*]}"; fi
check "dpkg forgot them" bash -c "! dpkg -s ivring-host > /dev/null 2>&1 && ! dpkg -s ivring-guest > /dev/null 2>&1"

finish
