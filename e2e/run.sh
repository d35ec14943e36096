#!/usr/bin/env bash
# ivring real-VM suite. Usage: e2e/run.sh [--guest-bin PATH] [--host-bin PATH] [CASE...]
# Env: GUEST_BIN, HOST_BIN (the ivring binaries; built from this checkout when unset),
# E2E_CASES (space-separated case list), those of lib.sh (E2E_ACCEL, E2E_KEEP, E2E_LOGS..).
# Last line: `N passed, M failed`; exit 0 only when M is 0.
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
ALL_CASES=(plain doorbell ivring_doorbell ivring_plain ivring_host_restart ivring_guest_reboot ivring_bench)
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

# ---------------------------------------------------------------- ivring cases
# The real binaries: `$HOST_BIN serve` is the ivshmem server every doorbell case's QEMU
# joins; the host side of the link is `$HOST_BIN peer` (services) or the hidden
# `$HOST_BIN check` (services plus the checks against the guest's services); the guest runs
# cases/ivring.init: `$GUEST_BIN probe`, then `$GUEST_BIN ARGS`, reporting PASS/FAIL lines.

# Expected result lines of the exchange (tools/src/checks.rs), on either side.
EXCHANGE=(link-up echo-data eof-after-shutdown send-checksum receive-pattern eof-after-peer-close broken-pipe refused parallel-sessions latency peer-done)
RESTART=(old-link-up old-session-reset old-session-write-reset old-session-stays-reset new-peer-up new-peer-id new-session-checksum new-session-echo new-session-receive)

# need_bins CASE: 0 when both binaries are there, else SKIP the case.
need_bins() {
    if [ -x "${GUEST_BIN:-}" ] && [ -x "${HOST_BIN:-}" ]; then return 0; fi
    e2e_skip "$1" "GUEST_BIN/HOST_BIN not built"; return 1
}

# ivring_initrd OUT: the initramfs of the ivring cases (the guest binary, stripped).
ivring_initrd() {
    local bin=$E2E_TMP/bin/ivring-guest
    if [ ! -x "$bin" ]; then
        mkdir -p "$E2E_TMP/bin"
        strip -o "$bin" "$GUEST_BIN" 2>/dev/null || cp "$GUEST_BIN" "$bin"
    fi
    [ -s "$1" ] || build_initramfs "$1" "$bin" "$E2E_DIR/cases/ivring.init"
}

# start_host_server NAME SOCK: `$HOST_BIN serve` as helper NAME; waits for its socket.
start_host_server() {
    rm -f "$2"
    e2e_spawn "$1" "$HOST_BIN" serve --socket "$2" --size "$SIZE" --vectors 2
    wait_for_file "$2" 10 || { e2e_fail "$1/listens" "no socket: $(cat "$E2E_TMP/$1.log")"; return 1; }
}

# wait_helper NAME TIMEOUT [VM]: waits for helper NAME to exit by itself; its exit status
# (124 when it had to be stopped). With VM: gives up 10 s after that VM has stopped.
wait_helper() {
    local f=$E2E_TMP/pids/$1.pid pid i rc=0 vmf=${3:+$E2E_TMP/vm/$3.pid} grace=100
    [ -e "$f" ] || return 0
    pid=$(cat "$f")
    for ((i = 0; i < $2 * 10 && grace > 0; i++)); do
        _alive "$pid" || break
        if [ -n "$vmf" ] && ! { [ -e "$vmf" ] && _alive "$(cat "$vmf")"; }; then grace=$((grace - 1)); fi
        sleep 0.1
    done
    if _alive "$pid"; then e2e_stop "$1"; return 124; fi
    wait "$pid" || rc=$?
    rm -f "$f"
    return $rc
}

# show_info LABEL FILE: the INFO lines (figures) and probe output of a log, for the record.
show_info() {
    sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$2" 2>/dev/null | tr -d '\r' \
        | grep -aE '^(INFO|probe\|)' | sed "s|^|  $1: |" || true
}

# (1) ivshmem-doorbell with VFIO: the exchange run from both sides at once (sessions
# opened by each side), the guest's readers blocking (--block) so only an MSI-X interrupt
# wakes them quickly; MSI-X deliveries counted in the guest.
case_ivring_doorbell() {
    need_bins ivring_doorbell || return 0
    local sock=$E2E_TMP/ivd.sock initrd=$E2E_TMP/ivring.cpio.gz rc=0
    start_host_server ivd-server "$sock" || return 0
    e2e_spawn ivd-host "$HOST_BIN" check --join "$sock" --timeout 120
    ivring_initrd "$initrd"
    boot_vm ivd doorbell "$initrd" --sock "$sock" -- e2e.vfio=1 e2e.args=check,--block >/dev/null
    if wait_vm ivd 150; then e2e_pass ivd/poweroff; else e2e_fail ivd/poweroff timeout; fi
    collect_results ivd vfio-modules probe probe-interrupts probe-header "${EXCHANGE[@]}" blocked-reader-woken guest-run msix-delivered
    wait_helper ivd-host 30 || rc=$?
    collect_file ivd-host "$E2E_TMP/ivd-host.log" "${EXCHANGE[@]}"
    e2e_check ivd-host/exit-status [ "$rc" = 0 ]
    show_info ivd "$(vm_serial ivd)"; show_info ivd-host "$E2E_TMP/ivd-host.log"
    e2e_stop ivd-server
}

# (2) ivshmem-plain: the same exchange, both sides polling; the host maps /dev/shm/NAME.
case_ivring_plain() {
    need_bins ivring_plain || return 0
    local shm=/dev/shm/ivring-e2e-$$ initrd=$E2E_TMP/ivring.cpio.gz rc=0
    echo "$shm" >> "$E2E_TMP/shm-files"
    rm -f "$shm"; truncate -s "$SIZE" "$shm"
    e2e_spawn ivp-host "$HOST_BIN" check --plain "$shm" --timeout 120
    ivring_initrd "$initrd"
    boot_vm ivp plain "$initrd" --shm "$shm" --size "$SIZE" -- e2e.vfio=0 e2e.args=check >/dev/null
    if wait_vm ivp 150; then e2e_pass ivp/poweroff; else e2e_fail ivp/poweroff timeout; fi
    collect_results ivp probe probe-polling probe-header "${EXCHANGE[@]}" guest-run
    wait_helper ivp-host 30 || rc=$?
    collect_file ivp-host "$E2E_TMP/ivp-host.log" "${EXCHANGE[@]}"
    e2e_check ivp-host/exit-status [ "$rc" = 0 ]
    show_info ivp "$(vm_serial ivp)"; show_info ivp-host "$E2E_TMP/ivp-host.log"
}

# (3) The host program killed (SIGKILL) and restarted while the guest runs, the server
# and QEMU staying up: the guest's sessions fail with ConnectionReset, it finds the new
# host peer, new sessions carry only new bytes.
case_ivring_host_restart() {
    need_bins ivring_host_restart || return 0
    local sock=$E2E_TMP/ivh.sock initrd=$E2E_TMP/ivring.cpio.gz
    start_host_server ivh-server "$sock" || return 0
    e2e_spawn ivh-host1 "$HOST_BIN" peer --role host --join "$sock"
    ivring_initrd "$initrd"
    boot_vm ivh doorbell "$initrd" --sock "$sock" -- e2e.vfio=1 e2e.args=check,--scenario,peer-restart >/dev/null
    if wait_for_line "$(vm_serial ivh)" '^READY peer-restart' 120 ivh; then
        kill -KILL "$(cat "$E2E_TMP/pids/ivh-host1.pid")"; e2e_stop ivh-host1
        e2e_pass ivh/host-killed
        sleep 1
        e2e_spawn ivh-host2 "$HOST_BIN" peer --role host --join "$sock"
    else
        e2e_fail ivh/host-killed "the guest never said READY"
    fi
    if wait_vm ivh 120; then e2e_pass ivh/poweroff; else e2e_fail ivh/poweroff timeout; fi
    collect_results ivh probe probe-interrupts probe-header "${RESTART[@]}" guest-run msix-delivered
    show_info ivh "$(vm_serial ivh)"
    e2e_stop ivh-host2; e2e_stop ivh-server
}

# (4) The guest rebooted (QEMU killed, a second QEMU boot on the same server) while the
# host program runs: the host's sessions fail with ConnectionReset, it finds the new
# guest, new sessions carry only new bytes.
case_ivring_guest_reboot() {
    need_bins ivring_guest_reboot || return 0
    local sock=$E2E_TMP/ivg.sock initrd=$E2E_TMP/ivring.cpio.gz rc=0 boot
    start_host_server ivg-server "$sock" || return 0
    e2e_spawn ivg-host "$HOST_BIN" check --join "$sock" --scenario peer-restart --timeout 120
    ivring_initrd "$initrd"
    boot_vm ivg1 doorbell "$initrd" --sock "$sock" -- e2e.vfio=1 e2e.args=serve >/dev/null
    if wait_for_line "$E2E_TMP/ivg-host.log" '^READY peer-restart' 120 ivg1; then
        kill_vm ivg1; e2e_pass ivg/first-guest-killed
    else
        e2e_fail ivg/first-guest-killed "the host never said READY"; kill_vm ivg1
    fi
    boot_vm ivg2 doorbell "$initrd" --sock "$sock" -- e2e.vfio=1 e2e.args=serve >/dev/null
    wait_helper ivg-host 150 ivg2 || rc=$?
    kill_vm ivg2
    for boot in ivg1 ivg2; do
        if grep -aq 'ivring-guest: serving ports 1-4 and 6; .*interrupts: MSI-X through VFIO' "$(vm_serial $boot)"; then
            e2e_pass "$boot/serving-with-interrupts"
        else
            e2e_fail "$boot/serving-with-interrupts" "$(grep -a 'ivring-guest' "$(vm_serial $boot)" | tail -3)"
        fi
    done
    collect_results ivg1 vfio-modules probe probe-interrupts probe-header
    collect_results ivg2 vfio-modules probe probe-interrupts probe-header
    collect_file ivg-host "$E2E_TMP/ivg-host.log" "${RESTART[@]}"
    e2e_check ivg-host/exit-status [ "$rc" = 0 ]
    show_info ivg-host "$E2E_TMP/ivg-host.log"
    e2e_stop ivg-server
}

# (5) Throughput (64 B, 4 KiB, 64 KiB writes) and 64 B round-trip latency, guest to host,
# printed (under TCG the guest's figures say little about real hardware).
case_ivring_bench() {
    need_bins ivring_bench || return 0
    local sock=$E2E_TMP/ivb.sock initrd=$E2E_TMP/ivring.cpio.gz
    start_host_server ivb-server "$sock" || return 0
    e2e_spawn ivb-host "$HOST_BIN" peer --role host --join "$sock"
    ivring_initrd "$initrd"
    boot_vm ivb doorbell "$initrd" --sock "$sock" -- e2e.vfio=1 e2e.args=check,--scenario,bench,--seconds,2 >/dev/null
    if wait_vm ivb 120; then e2e_pass ivb/poweroff; else e2e_fail ivb/poweroff timeout; fi
    collect_results ivb probe probe-interrupts bench guest-run msix-delivered
    show_info ivb "$(vm_serial ivb)"
    e2e_stop ivb-host; e2e_stop ivb-server
}

# build_bins: HOST_BIN and GUEST_BIN (static, for the initramfs) from this checkout,
# unless given.
build_bins() {
    local root target
    root=$(cd "$E2E_DIR/.." && pwd); target=${CARGO_TARGET_DIR:-$root/target}
    if [ -z "$HOST_BIN" ]; then
        echo "e2e: building ivring-host"
        (cd "$root" && cargo build --release -q -p ivring-host) || { e2e_fail build/ivring-host "cargo build failed"; return 0; }
        HOST_BIN=$target/release/ivring-host
    fi
    if [ -z "$GUEST_BIN" ]; then
        echo "e2e: building ivring-guest (static)"
        (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -q \
            -p ivring-guest --target x86_64-unknown-linux-gnu) || { e2e_fail build/ivring-guest "cargo build failed"; return 0; }
        GUEST_BIN=$target/x86_64-unknown-linux-gnu/release/ivring-guest
    fi
}

# ---------------------------------------------------------------- main
e2e_init
t0=$SECONDS
kvm_works || true
case " ${cases[*]} " in *" ivring_"*) build_bins ;; esac
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
