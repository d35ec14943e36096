#!/usr/bin/env bash
# Install what the real-VM suite needs, from Debian packages only. Idempotent.
#  - QEMU 10 (qemu-system-x86) from bookworm-backports through a private apt source
#    list (nothing under /etc/apt changes), busybox-static, cpio, qemu-guest-agent;
#  - the guest kernel (vmlinuz + the vfio and virtio-serial modules) into e2e/build/kernel.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${E2E_BUILD:-$E2E_DIR/build}
APT_DIR=$BUILD/apt
KDIR=$BUILD/kernel
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup: $*"; }
[ "$(id -u)" = 0 ] || { echo "setup: must run as root" >&2; exit 1; }
mkdir -p "$BUILD"

# ---------------------------------------------------------------- private apt source
# The deb822 file may list several URIs/suites per stanza; keep URIs + Signed-By, and
# generate one-line entries for the stanza's suites plus bookworm-backports.
make_sources() {
    local src=/etc/apt/sources.list.d/debian.sources out=$1
    [ -r "$src" ] || { echo "setup: $src missing" >&2; exit 1; }
    awk '
    function flush(   i, j, nu, ns, u, s, opt) {
        if (uris == "") return
        nu = split(uris, u, " "); ns = split(suites, s, " ")
        opt = (key != "") ? " [signed-by=" key "]" : ""
        for (i = 1; i <= nu; i++) {
            for (j = 1; j <= ns; j++) print "deb" opt " " u[i] " " s[j] " " comps
            # backports lives beside the main archive (the one that carries "bookworm")
            for (j = 1; j <= ns; j++) if (s[j] == "bookworm") print "deb" opt " " u[i] " bookworm-backports " comps
        }
        uris = ""; suites = ""; comps = ""; key = ""
    }
    /^[[:space:]]*$/ { flush(); next }
    /^[[:space:]]*#/ { next }
    /^URIs:/       { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
    /^Suites:/     { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
    /^Components:/ { sub(/^Components:[[:space:]]*/, ""); comps = $0 }
    /^Signed-By:/  { sub(/^Signed-By:[[:space:]]*/, ""); key = $0 }
    END { flush() }' "$src" | sort -u > "$out.tmp"
    grep -q ' bookworm-backports ' "$out.tmp" || { echo "setup: no bookworm suite in $src" >&2; exit 1; }
    mv "$out.tmp" "$out"
}

APT_OPTS=()
apt_private() {
    mkdir -p "$APT_DIR/lists/partial"
    make_sources "$APT_DIR/sources.list"
    APT_OPTS=(-o "Dir::Etc::sourcelist=$APT_DIR/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::lists=$APT_DIR/lists"
              -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
    # refresh the private lists at most once a day
    if [ -z "$(find "$APT_DIR/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ] \
       || [ "$APT_DIR/sources.list" -nt "$APT_DIR/lists/.stamp" ]; then
        log "apt-get update (private list: $(wc -l < "$APT_DIR/sources.list") entries incl. bookworm-backports)"
        apt-get "${APT_OPTS[@]}" -qq update
        touch "$APT_DIR/lists/.stamp"
    fi
}

# ---------------------------------------------------------------- packages
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
need=()
[ "$(qemu_major)" -ge 10 ] 2>/dev/null || need+=(qemu-system-x86)
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
installed busybox-static || need+=(busybox-static)
installed cpio || need+=(cpio)
installed qemu-guest-agent || need+=(qemu-guest-agent)
# socat: the agent client in docs/QGA.md, run as written by qga.sh
installed socat || need+=(socat)

if [ ${#need[@]} -gt 0 ] || [ ! -s "$KDIR/.stamp" ]; then
    apt_private
fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing: ${need[*]} (bookworm-backports preferred)"
    # -t bookworm-backports: QEMU 10 (matches the preinstalled qemu-utils 10 from backports);
    # packages without a backports version come from bookworm.
    apt-get "${APT_OPTS[@]}" -y -qq --no-install-recommends -t bookworm-backports \
        -o Dpkg::Use-Pty=0 install "${need[@]}" >"$BUILD/apt-install.log" 2>&1 \
        || { tail -30 "$BUILD/apt-install.log" >&2; exit 1; }
else
    log "packages present: $(qemu-system-x86_64 --version | head -1), busybox-static, cpio, qemu-ga, socat"
fi

# ---------------------------------------------------------------- guest kernel
# Modules in insmod order (no modules.dep in the package). vfio_virqfd is a separate
# module in 6.1 (folded into vfio.ko from 6.2 on); missing ones are skipped here and in
# the guest.
KMODS="irqbypass vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console"
if [ -s "$KDIR/.stamp" ] && [ -s "$KDIR/vmlinuz" ]; then
    log "kernel cached: $(cat "$KDIR/.stamp")"
else
    pkg=$(apt-cache "${APT_OPTS[@]}" depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
    [ -n "$pkg" ] || { echo "setup: cannot resolve linux-image-amd64's dependency" >&2; exit 1; }
    log "downloading $pkg"
    dl=$BUILD/dl; rm -rf "$dl"; mkdir -p "$dl"
    (cd "$dl" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root -qq download "$pkg")
    deb=$(ls "$dl"/*.deb)
    rm -rf "$KDIR.tmp"; mkdir -p "$KDIR.tmp/x"
    pats=('./boot/vmlinuz-*')
    for m in $KMODS; do pats+=("*/$m.ko" "*/$m.ko.xz" "*/${m//-/_}.ko" "*/${m//-/_}.ko.xz"); done
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$KDIR.tmp/x" --wildcards "${pats[@]}" 2>/dev/null || true
    cp "$KDIR.tmp"/x/boot/vmlinuz-* "$KDIR.tmp/vmlinuz"
    mkdir -p "$KDIR.tmp/modules"; : > "$KDIR.tmp/modules.order"
    for m in $KMODS; do
        f=$(find "$KDIR.tmp/x/lib/modules" \( -name "$m.ko*" -o -name "${m//-/_}.ko*" \) | head -1)
        if [ -z "$f" ]; then log "module $m: not in package (built in or merged), skipped"; continue; fi
        case $f in *.xz) xz -dc "$f" > "$KDIR.tmp/modules/$m.ko" ;; *) cp "$f" "$KDIR.tmp/modules/$m.ko" ;; esac
        echo "$m" >> "$KDIR.tmp/modules.order"
    done
    kver=$(basename "$KDIR.tmp"/x/boot/vmlinuz-*); kver=${kver#vmlinuz-}
    rm -rf "$KDIR.tmp/x" "$dl"
    echo "$kver ($(wc -l < "$KDIR.tmp/modules.order") modules)" > "$KDIR.tmp/.stamp"
    rm -rf "$KDIR"; mv "$KDIR.tmp" "$KDIR"
    log "kernel $kver: vmlinuz + $(tr '\n' ' ' < "$KDIR/modules.order")"
fi
log "done"
