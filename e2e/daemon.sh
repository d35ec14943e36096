#!/usr/bin/env bash
# shellcheck disable=SC2015  # e2e_pass/e2e_fail never fail
# A real QEMU guest's agent reached through `ivring-host daemon`.
# Usage: e2e/daemon.sh [--guest-bin P] [--host-bin P]
#
# The daemon runs on a private runtime directory; `ivring-host vm add` serves the VM
# before QEMU boots; QEMU's ivshmem-doorbell device joins DIR/NAME.ivshmem.sock; in the
# guest, `ivring-guest bridge` relays to qemu-ga (e2e/cases/qga.init). On the host an
# agent client on DIR/NAME.qga.sock gets its guest-ping, guest-info and guest-sync replies
# (e2e/qga_client.py check), `vm list` shows QEMU as the VM's peer with the link up; the
# VM is shut down (QEMU leaves: no peer), then `vm remove` takes its sockets away. Then
# the VM is added and booted again, to show a name is reusable.
# Env: GUEST_BIN, HOST_BIN (default: built here; the guest one static), and lib.sh's
# (E2E_BUILD, E2E_ACCEL, E2E_KEEP, ...). Last line: `N passed, M failed`.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$E2E_DIR/lib.sh"
ROOT=$(cd "$E2E_DIR/.." && pwd)
GUEST_BIN=${GUEST_BIN:-}
HOST_BIN=${HOST_BIN:-}
while [ $# -gt 0 ]; do
    case $1 in
        --guest-bin) GUEST_BIN=$2; shift 2 ;;
        --host-bin) HOST_BIN=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$GUEST_BIN" ]; then
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        -p ivring-guest --target x86_64-unknown-linux-gnu)
    GUEST_BIN=$ROOT/target/x86_64-unknown-linux-gnu/release/ivring-guest
fi
if [ -z "$HOST_BIN" ]; then
    (cd "$ROOT" && cargo build --quiet --release -p ivring-host)
    HOST_BIN=$ROOT/target/release/ivring-host
fi

e2e_init
t0=$SECONDS
kvm_works || true
echo "e2e: daemon accel=$E2E_ACCEL qemu=$("$QEMU" --version | head -1)"
client() { python3 "$E2E_DIR/qga_client.py" "$@"; }
vmctl() { "$HOST_BIN" vm "$@" --dir "$RUN"; }

RUN=$E2E_TMP/run
name=dvm$$
ivs=$RUN/$name.ivshmem.sock
qga=$RUN/$name.qga.sock
vs=$E2E_TMP/daemon-vserial.sock
ctl=$E2E_TMP/daemon-ctl.sock
initrd=$E2E_TMP/daemon.cpio.gz

e2e_spawn daemon "$HOST_BIN" daemon --dir "$RUN"
wait_for_file "$RUN/control.sock" 10 && e2e_pass daemon/control-socket \
    || { e2e_fail daemon/control-socket "$(cat "$E2E_TMP/daemon.log")"; e2e_summary; exit 1; }

build_initramfs "$initrd" "$GUEST_BIN" "$E2E_DIR/cases/qga.init"

boot() { # the VM on the daemon's socket, one vector (the daemon's default)
    boot_vm "$name" doorbell "$initrd" --size 4M --sock "$ivs" --vectors 1 --vserial "$vs" \
        --qemu -chardev --qemu "socket,path=$ctl,server=on,wait=off,id=ctl0" \
        --qemu -device --qemu virtserialport,chardev=ctl0,name=e2e.ctl \
        -- e2e.mode=doorbell >/dev/null
}

# list_field FIELD: the VM's FIELD in `vm list --json`
list_field() {
    vmctl list --json | python3 -c 'import json,sys; d=json.load(sys.stdin); v=[x for x in d["vms"] if x["name"]==sys.argv[1]]; print(json.dumps(v[0][sys.argv[2]]) if v else "none")' "$name" "$1"
}

for round in 1 2; do
    out=$(vmctl add "$name" --size 4M 2>&1) && e2e_pass "daemon/vm-add-$round" \
        || e2e_fail "daemon/vm-add-$round" "$out"
    echo "  $out"
    mode=$(stat -c %a "$qga" 2>/dev/null || echo none)
    [ "$mode" = 600 ] && e2e_pass "daemon/agent-socket-0600-$round" \
        || e2e_fail "daemon/agent-socket-0600-$round" "mode $mode"
    boot
    if client check "$qga" 120 > "$E2E_TMP/check-$round.log" 2>&1; then
        e2e_pass "daemon/agent-ping-info-sync-$round"
    else
        e2e_fail "daemon/agent-ping-info-sync-$round" "$(tr '\n' ';' < "$E2E_TMP/check-$round.log")"
    fi
    sed 's/^/  /' "$E2E_TMP/check-$round.log"
    peers=$(list_field peers) up=$(list_field link_up)
    [ "$peers" = 1 ] && [ "$up" = true ] && e2e_pass "daemon/vm-list-qemu-peer-link-up-$round" \
        || e2e_fail "daemon/vm-list-qemu-peer-link-up-$round" "peers=$peers link_up=$up"
    vmctl list
    kill_vm "$name"
    for _i in $(seq 1 50); do [ "$(list_field peers)" = 0 ] && break; sleep 0.1; done
    peers=$(list_field peers)
    [ "$peers" = 0 ] && e2e_pass "daemon/qemu-left-$round" || e2e_fail "daemon/qemu-left-$round" "peers=$peers"
    collect_results "$name" pci-device qga-unix-start guest-bridge-start
    out=$(vmctl remove "$name" 2>&1) && [ ! -e "$ivs" ] && [ ! -e "$qga" ] \
        && e2e_pass "daemon/vm-remove-$round" || e2e_fail "daemon/vm-remove-$round" "$out; $(ls "$RUN")"
done
if grep -E "panicked|ERROR" "$E2E_TMP/daemon.log"; then e2e_fail daemon/log-clean "see above"
else e2e_pass daemon/log-clean; fi
sed 's/^/  daemon: /' "$E2E_TMP/daemon.log" | tail -n 12
e2e_stop daemon
echo "e2e: daemon total $((SECONDS - t0)) s"
e2e_summary
