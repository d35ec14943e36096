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
# the VM is added and booted again, to show a name is reusable. Last, the daemon runs with
# --fd-store under a stand-in for systemd's fd store (e2e/fdstore_sim.py), is killed and
# started again while the VM runs, and the same QEMU's agent answers through the new
# daemon (QEMU never reconnects its ivshmem chardev: this works only because the store
# kept the memory, the eventfds and QEMU's connection).
# Env: GUEST_BIN, HOST_BIN (default: built here; the guest one static), and lib.sh's
# (E2E_BUILD, E2E_ACCEL, E2E_KEEP, ...). Last line: `N passed, M failed`.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$E2E_DIR/lib.sh"
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
build_binaries

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

boot() { # the VM on the daemon's socket, one vector (the daemon's default); extra args
          # go to boot_vm (--master: master=on, which needs peer id 0 from the daemon)
    boot_vm "$name" doorbell "$initrd" --size 4M --sock "$ivs" --vectors 1 --vserial "$vs" "$@" \
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
    # The second VM has master=on (migratable): QEMU refuses to start unless the daemon
    # gives it peer id 0.
    if [ "$round" = 2 ]; then boot --master; else boot; fi
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

# A daemon restart while the VM runs, with the fd store.
store_status=$E2E_TMP/fdstore.status
e2e_spawn daemon-fdstore python3 "$E2E_DIR/fdstore_sim.py" "$E2E_TMP/notify.sock" "$store_status" \
    -- "$HOST_BIN" daemon --dir "$RUN" --fd-store
for _i in $(seq 1 100); do vmctl list >/dev/null 2>&1 && break; sleep 0.1; done
out=$(vmctl add "$name" --size 4M 2>&1) && e2e_pass daemon/fdstore-vm-add || e2e_fail daemon/fdstore-vm-add "$out"
boot
if client check "$qga" 120 > "$E2E_TMP/check-3.log" 2>&1; then e2e_pass daemon/fdstore-agent-before-restart
else e2e_fail daemon/fdstore-agent-before-restart "$(tr '\n' ';' < "$E2E_TMP/check-3.log")"; fi
echo "  store before the restart: $(cat "$store_status")"
qemu_pid=$VM_PID
kill -HUP "$(cat "$E2E_TMP/pids/daemon-fdstore.pid")"   # the daemon is killed and started again
for _i in $(seq 1 50); do grep -q 'restarts=1' "$store_status" && vmctl list >/dev/null 2>&1 && break; sleep 0.1; done
echo "  store after the restart: $(cat "$store_status")"
if client check "$qga" 60 > "$E2E_TMP/check-4.log" 2>&1 && kill -0 "$qemu_pid"; then
    e2e_pass daemon/fdstore-agent-after-daemon-restart-same-qemu
else
    e2e_fail daemon/fdstore-agent-after-daemon-restart-same-qemu "$(tr '\n' ';' < "$E2E_TMP/check-4.log")"
fi
sed 's/^/  /' "$E2E_TMP/check-4.log"
peers=$(list_field peers) up=$(list_field link_up) nr=$(list_field needs_recover)
[ "$peers" = 1 ] && [ "$up" = true ] && [ "$nr" = false ] && e2e_pass daemon/fdstore-qemu-still-peer \
    || e2e_fail daemon/fdstore-qemu-still-peer "peers=$peers link_up=$up needs_recover=$nr"
grep -q "taken up again from the fd store" "$E2E_TMP/daemon-fdstore.log" \
    && e2e_pass daemon/fdstore-log || e2e_fail daemon/fdstore-log "$(tail -n 5 "$E2E_TMP/daemon-fdstore.log")"
kill_vm "$name"
out=$(vmctl remove "$name" 2>&1) && e2e_pass daemon/fdstore-vm-remove || e2e_fail daemon/fdstore-vm-remove "$out"
sed 's/^/  daemon: /' "$E2E_TMP/daemon-fdstore.log" | tail -n 8
e2e_stop daemon-fdstore
echo "e2e: daemon total $((SECONDS - t0)) s"
e2e_summary
