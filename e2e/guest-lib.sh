# shellcheck shell=sh disable=SC1091,SC2013,SC2015,SC2034,SC2086
# Guest side of the e2e suite: installed as /lib/e2e.sh in every initramfs; /init
# sources it. Results go to the serial console as `PASS case` / `FAIL case: reason`;
# finish powers the VM off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp /run
[ -f /etc/e2e.env ] && . /etc/e2e.env   # GUEST_BIN=/bin/<name> when a guest binary is shipped
E2E_FAILS=0
echo   # the firmware's screen-clearing escapes leave the cursor mid-line

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; E2E_FAILS=$((E2E_FAILS + 1)); }
info() { echo "INFO $*"; }
# check CASE CMD...: PASS when CMD succeeds
check() { _c=$1; shift; if "$@"; then pass "$_c"; else fail "$_c" "$*"; fi; }

# param KEY [DEFAULT]: value of e2e.KEY=VALUE on the kernel command line
param() {
    for _w in $(cat /proc/cmdline); do
        case $_w in "e2e.$1="*) echo "${_w#*=}"; return 0 ;; esac
    done
    echo "${2:-}"
}

# load_modules NAME...: insmod /lib/modules/NAME.ko in the given order; a module the
# kernel package does not ship is skipped, an already loaded one is fine.
load_modules() {
    for _m in "$@"; do
        if [ ! -f "/lib/modules/$_m.ko" ]; then info "module $_m not shipped, skipped"; continue; fi
        if ! insmod "/lib/modules/$_m.ko" 2>/tmp/insmod.err; then
            grep -q 'File exists' /tmp/insmod.err && continue
            echo "insmod $_m: $(cat /tmp/insmod.err)"; return 1
        fi
    done
}
VFIO_MODULES="irqbypass vfio vfio_virqfd vfio_iommu_type1 vfio-pci-core vfio-pci"
VIRTIO_SERIAL_MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console"

# find_pci VENDOR DEVICE: BDFs (one a line) of matching PCI devices, e.g. 0x1af4 0x1110
find_pci() {
    for _d in /sys/bus/pci/devices/*; do
        [ "$(cat "$_d/vendor")" = "$1" ] && [ "$(cat "$_d/device")" = "$2" ] && basename "$_d"
    done
    return 0
}
find_ivshmem() { find_pci 0x1af4 0x1110 | head -n 1; }

# bar_addr BDF N / bar_size BDF N: from sysfs `resource` (line N+1: start end flags)
bar_addr() { sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource" | cut -d' ' -f1; }
bar_size() {
    _l=$(sed -n "$(($2 + 1))p" "/sys/bus/pci/devices/$1/resource")
    set -- $_l
    [ "$(($1))" -eq 0 ] && { echo 0; return; }
    echo $(($2 - $1 + 1))
}
# rd32 ADDR / wr32 ADDR VALUE: physical 32-bit access (busybox devmem, /dev/mem);
# rd32 prints 0x%08x
rd32() { printf '0x%08x\n' "$(devmem "$(printf '0x%x' $(($1)))" 32)"; }
wr32() { devmem "$(printf '0x%x' $(($1)))" 32 "$(printf '0x%x' $(($2)))"; }

# iommu_group BDF: the device's IOMMU group number (empty without an IOMMU)
iommu_group() { [ -e "/sys/bus/pci/devices/$1/iommu_group" ] && basename "$(readlink "/sys/bus/pci/devices/$1/iommu_group")"; }
# bind_vfio BDF: hand the device to vfio-pci (driver_override + drivers_probe)
bind_vfio() {
    [ -e "/sys/bus/pci/devices/$1/driver" ] && echo "$1" > "/sys/bus/pci/devices/$1/driver/unbind"
    echo vfio-pci > "/sys/bus/pci/devices/$1/driver_override" &&
    echo "$1" > /sys/bus/pci/drivers_probe &&
    [ "$(basename "$(readlink "/sys/bus/pci/devices/$1/driver")")" = vfio-pci ]
}

# start_qga: load virtio-serial, start qemu-ga on the agent port in the background
# (allow-list of harmless commands, private state dir)
start_qga() {
    load_modules $VIRTIO_SERIAL_MODULES || return 1
    _p=
    for _i in $(seq 1 50); do
        for _n in /sys/class/virtio-ports/*; do
            [ "$(cat "$_n/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && _p=/dev/$(basename "$_n")
        done
        [ -n "$_p" ] && [ -e "$_p" ] && break
        sleep 0.1
    done
    [ -n "$_p" ] && [ -e "$_p" ] || { echo "no virtio port org.qemu.guest_agent.0"; return 1; }
    mkdir -p /tmp/qga
    qemu-ga -m virtio-serial -p "$_p" -t /tmp/qga -a guest-sync,guest-sync-delimited,guest-ping,guest-info \
        > /tmp/qga.log 2>&1 &
    QGA_PID=$!
    sleep 0.2
    kill -0 "$QGA_PID" 2>/dev/null || { echo "qemu-ga exited: $(cat /tmp/qga.log)"; return 1; }
}

# finish: end of /init: report and power off
finish() {
    echo "E2E-DONE failures=$E2E_FAILS"
    sync
    poweroff -f
}
