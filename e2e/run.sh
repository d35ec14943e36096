#!/usr/bin/env bash
# ivring real-VM suite. Usage: e2e/run.sh [--guest-bin PATH] [--host-bin PATH] [CASE...]
# Env: GUEST_BIN, HOST_BIN (the ivring binaries; cases needing them are skipped while
# unset), E2E_CASES (space-separated case list), and those of lib.sh (E2E_ACCEL, E2E_KEEP,
# E2E_LOGS, ...). Last line: `N passed, M failed`; exit 0 only when M is 0.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$E2E_DIR/lib.sh"

GUEST_BIN=${GUEST_BIN:-}
HOST_BIN=${HOST_BIN:-}
cases=()
while [ $# -gt 0 ]; do
    case $1 in
        --guest-bin) GUEST_BIN=$2; shift 2 ;;
        --host-bin) HOST_BIN=$2; shift 2 ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) cases+=("$1"); shift ;;
    esac
done
# Cases run in this order; add ivring cases here (and a case_NAME function below).
ALL_CASES=(plain doorbell ivring_example)
[ ${#cases[@]} -gt 0 ] || read -r -a cases <<< "${E2E_CASES:-${ALL_CASES[*]}}"
E2E_SKIPPED=0
e2e_skip() { E2E_SKIPPED=$((E2E_SKIPPED + 1)); echo "SKIP $1: $2"; }

MAGIC0=0x47525649   # 'IVRG'
MAGIC1=0x21453245   # 'E2E!'
DONE=0x454e4f44     # 'DONE'
SIZE=$((4 << 20))

# ---------------------------------------------------------------- infrastructure cases
# (a) ivshmem-plain: host marker -> guest reads it (mmap resource2 and devmem) -> guest
# replies -> host checks after poweroff; qemu-ga over virtio-serial answers a ping, then
# the host signals the guest through the shared memory.
case_plain() {
    local name=e2e-plain-$$ shm nonce initrd qsock
    shm=/dev/shm/$name; nonce=$(rand32); initrd=$E2E_TMP/plain.cpio.gz; qsock=$E2E_TMP/plain.qga.sock
    echo "$shm" >> "$E2E_TMP/shm-files"
    rm -f "$shm"; truncate -s "$SIZE" "$shm"
    mem_put32 "$shm" 0 $MAGIC0; mem_put32 "$shm" 4 $MAGIC1; mem_put32 "$shm" 8 "$nonce"
    build_initramfs "$initrd" "${GUEST_BIN:--}" "$E2E_DIR/cases/plain.init"
    boot_vm plain plain "$initrd" --shm "$shm" --size "$SIZE" --vserial "$qsock" \
        -- e2e.nonce="$nonce" e2e.size="$SIZE" e2e.qga=1 >/dev/null
    if qga_ping "$qsock" 60; then e2e_pass plain/host-qga-ping
    else e2e_fail plain/host-qga-ping "no guest-ping reply from qemu-ga in the guest"; fi
    mem_put32 "$shm" 16 1   # go: the guest powers off
    if wait_vm plain 90; then e2e_pass plain/poweroff; else e2e_fail plain/poweroff "timeout"; fi
    collect_results plain pci-device bar2-size read-marker-resource2 read-marker-devmem \
        write-readback qga-start host-go-seen
    local r1 r2 r3
    r1=$(mem_get32 "$shm" 4096); r2=$(mem_get32 "$shm" 4100); r3=$(mem_get32 "$shm" $((SIZE - 4)))
    if [ "$r1 $r2 $r3" = "$(printf '0x%08x 0x%08x 0x%08x' $DONE $((nonce ^ 0xffffffff)) "$nonce")" ]; then
        e2e_pass plain/host-reads-reply
    else e2e_fail plain/host-reads-reply "got '$r1 $r2 $r3' for nonce $nonce"; fi
}

# start_ivshmem_server NAME SOCK SIZE [ARGS...]: the temporary Python server (stand-in for
# `ivring-host serve --socket SOCK --size N`), tracked as helper NAME; waits until it listens.
start_ivshmem_server() {
    local name=$1 sock=$2 size=$3; shift 3
    rm -f "$E2E_TMP/$name.ready"
    e2e_spawn "$name" python3 -u "$E2E_DIR/ivshmem_server.py" --socket "$sock" --size "$size" \
        --ready-file "$E2E_TMP/$name.ready" "$@"
    wait_for_file "$E2E_TMP/$name.ready" 10
}

# (b) ivshmem-doorbell: server (memfd + eventfds over SCM_RIGHTS) -> QEMU realizes the
# device -> guest reads the marker and IVPosition, rings the host peer, loads VFIO and
# binds the device -> host checks the server saw the connect and the doorbell, and the
# guest's reply in the memory dump.
case_doorbell() {
    local sock=$E2E_TMP/doorbell.sock init=$E2E_TMP/doorbell.init.bin dump=$E2E_TMP/doorbell.dump
    local nonce initrd=$E2E_TMP/doorbell.cpio.gz vec=1
    nonce=$(rand32)
    truncate -s 4096 "$init"
    mem_put32 "$init" 0 $MAGIC0; mem_put32 "$init" 4 $MAGIC1; mem_put32 "$init" 8 "$nonce"
    mem_put32 "$init" 12 0xffffffff   # the server must overwrite it with its host peer id
    if ! start_ivshmem_server ivserver "$sock" "$SIZE" --vectors 2 --host-peer --host-id-offset 12 \
            --init-file "$init" --dump "$dump"; then
        e2e_fail doorbell/server-listens "$(cat "$E2E_TMP/ivserver.log")"; return
    fi
    build_initramfs "$initrd" "${GUEST_BIN:--}" "$E2E_DIR/cases/doorbell.init"
    boot_vm doorbell doorbell "$initrd" --sock "$sock" --vectors 2 \
        -- e2e.nonce="$nonce" e2e.size="$SIZE" e2e.host_id=0 e2e.vector=$vec >/dev/null
    if wait_vm doorbell 120; then e2e_pass doorbell/poweroff; else e2e_fail doorbell/poweroff "timeout"; fi
    collect_results doorbell pci-device bar2-size msix-bar1 read-marker-memfd ivposition-readable \
        host-id-published doorbell-written vfio-modules iommu-group vfio-bind vfio-group-node \
        vfio-container-node
    e2e_stop ivserver
    local slog=$E2E_TMP/ivserver.log peer pos
    peer=$(sed -n 's/^CONNECT peer=\([0-9]*\)$/\1/p' "$slog" | head -1)
    if [ -n "$peer" ] && grep -qx "DISCONNECT peer=$peer" "$slog"; then e2e_pass doorbell/server-saw-qemu
    else e2e_fail doorbell/server-saw-qemu "server log: $(tr '\n' ';' < "$slog")"; fi
    if grep -q "^RING peer=0 vector=$vec " "$slog"; then e2e_pass doorbell/host-got-doorbell
    else e2e_fail doorbell/host-got-doorbell "no RING in server log: $(tr '\n' ';' < "$slog")"; fi
    if [ -s "$dump" ]; then
        pos=$(mem_get32 "$dump" 4104)
        if [ "$(mem_get32 "$dump" 4096) $(mem_get32 "$dump" 4100)" = "$(printf '0x%08x 0x%08x' $DONE $((nonce ^ 0xffffffff)))" ]; then
            e2e_pass doorbell/host-reads-reply
        else e2e_fail doorbell/host-reads-reply "reply words wrong"; fi
        if [ -n "$peer" ] && [ "$((pos))" = "$peer" ]; then e2e_pass doorbell/ivposition-is-peer-id
        else e2e_fail doorbell/ivposition-is-peer-id "guest IVPosition $pos, server gave peer ${peer:-none}"; fi
    else
        e2e_fail doorbell/host-reads-reply "no memory dump from the server"
    fi
}

# ---------------------------------------------------------------- ivring cases (hook)
# Template for the real cases: `$HOST_BIN serve` is the ivshmem server (and the host side);
# the guest binary runs from a per-case /init (cases/NAME.init, which finds $GUEST_BIN via
# /lib/e2e.sh and reports PASS/FAIL lines). Host-side checks use e2e_pass/e2e_fail.
# IVRING_GUEST_ARGS: arguments for the guest binary (no spaces inside one argument).
case_ivring_example() {
    if [ -z "$GUEST_BIN" ] || [ -z "$HOST_BIN" ]; then
        e2e_skip ivring_example "GUEST_BIN/HOST_BIN not given"; return
    fi
    local sock=$E2E_TMP/ivring.sock initrd=$E2E_TMP/ivring.cpio.gz
    rm -f "$sock"
    e2e_spawn ivring-host "$HOST_BIN" serve --socket "$sock" --size "$SIZE"
    wait_for_file "$sock" 10 || { e2e_fail ivring_example/host-serve "no socket: $(cat "$E2E_TMP/ivring-host.log")"; return; }
    build_initramfs "$initrd" "$GUEST_BIN" "$E2E_DIR/cases/ivring_example.init"
    local gargs=${IVRING_GUEST_ARGS:-}
    boot_vm ivring doorbell "$initrd" --sock "$sock" -- e2e.size="$SIZE" "e2e.args=${gargs// /,}" >/dev/null
    if wait_vm ivring 180; then e2e_pass ivring_example/poweroff; else e2e_fail ivring_example/poweroff timeout; fi
    collect_results ivring guest-run
    e2e_stop ivring-host
}

# ---------------------------------------------------------------- main
e2e_init
t0=$SECONDS
kvm_works || true
echo "e2e: accel=$E2E_ACCEL qemu=$("$QEMU" --version | head -1) kernel=$(cat "$E2E_BUILD/kernel/.stamp" 2>/dev/null)"
echo "e2e: GUEST_BIN=${GUEST_BIN:-<none>} HOST_BIN=${HOST_BIN:-<none>}"
for c in "${cases[@]}"; do
    declare -F "case_$c" >/dev/null || { e2e_fail "$c" "no such case"; continue; }
    ct=$SECONDS
    echo "== $c"
    "case_$c"
    echo "== $c: $((SECONDS - ct)) s"
done
echo "e2e: total $((SECONDS - t0)) s"
if [ "$E2E_SKIPPED" -gt 0 ]; then
    echo "$E2E_PASSED passed, $E2E_FAILED failed, $E2E_SKIPPED skipped"
    [ "$E2E_FAILED" -eq 0 ]
else
    e2e_summary
fi
