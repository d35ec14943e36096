#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2046  # e2e_pass/e2e_fail never fail; $(qmp_opts X) is split on purpose
# Live migration, snapshots and pauses of a VM with ivring, in real VMs.
# Usage: e2e/migrate.sh [--guest-bin P] [--host-bin P] [CASE...]
#
# Cases (default all, in this order):
#   blockers  QEMU's own rule, checked: an ivshmem device without master=on (plain or
#             doorbell) blocks migration; `serve --vm-socket` gives the VM id 0, so a
#             doorbell device with master=on is accepted (QEMU refuses master=on otherwise)
#   sessions  two QEMUs, each with its own `ivring-host serve --vm-socket` and host
#             program (as two hosts would have), migrating over a UNIX socket while the
#             guest's sessions carry data both ways (`check --scenario migrate`): every
#             session fails with ConnectionReset on both sides with every byte before it
#             intact, the link re-forms with the destination's host program, whose
#             checks reach the guest's listeners; the guest program is not restarted
#   qga       the same with the host and guest bridges and qemu-ga: a client busy through
#             the source's bridge during the migration only ever gets its own replies; the
#             first client of the destination's bridge gets exactly its own replies
#   savevm    `savevm`, the host program replaced, `loadvm`: the restored sessions reset,
#             the link re-forms with the new host program
#   stopcont  `stop` for 3 s (past the 1 s peer timeout), then `cont`: both sides reset,
#             the link re-forms with the same host program
#   plain     ivshmem-plain (memory-backend-file, share=on, master=on): a live migration
#             of a running VM (QEMU 10.0 under TCG aborts the source: a QEMU bug, seen
#             without ivring), then stop, migrate, cont to a destination with its own file
#             and polling host program: the same checks as `sessions`
# Each prints PASS/FAIL lines; the times from the end of the migration (or loadvm, or
# cont) to the first session on the new link are printed as `e2e: migrate TIME ...`.
# Env: GUEST_BIN, HOST_BIN (built here when unset), MIG_CASES, and lib.sh's.
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
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) cases+=("$1"); shift ;;
    esac
done
ALL_CASES=(blockers sessions qga savevm stopcont plain)
[ ${#cases[@]} -gt 0 ] || read -r -a cases <<< "${MIG_CASES:-${ALL_CASES[*]}}"

build_binaries

SIZE=4M
TIMEOUT=150   # of the guest's and host programs' checks, in s
helper() { python3 "$E2E_DIR/migrate_helper.py" "$@"; }
now() { date +%s.%N; }
ms_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

# ---------------------------------------------------------------- helpers
# serve NAME: `ivring-host serve` as helper NAME, host programs on $E2E_TMP/NAME.sock and
# the VM on $E2E_TMP/NAME.vm.sock (id 0); waits for both sockets.
serve() {
    rm -f "$E2E_TMP/$1.sock" "$E2E_TMP/$1.vm.sock"
    e2e_spawn "$1" "$HOST_BIN" serve --socket "$E2E_TMP/$1.sock" --vm-socket "$E2E_TMP/$1.vm.sock" \
        --size "$SIZE" --vectors 2
    wait_for_file "$E2E_TMP/$1.vm.sock" 10 || { e2e_fail "$1/listens" "$(cat "$E2E_TMP/$1.log")"; return 1; }
}

# ivring_initrd OUT: the guest binary (stripped) and cases/ivring.init, built once.
ivring_initrd() {
    local bin=$E2E_TMP/bin/ivring-guest
    if [ ! -x "$bin" ]; then
        mkdir -p "$E2E_TMP/bin"
        strip -o "$bin" "$GUEST_BIN" 2>/dev/null || cp "$GUEST_BIN" "$bin"
    fi
    [ -s "$1" ] || build_initramfs "$1" "$bin" "$E2E_DIR/cases/ivring.init"
}

# qmp_opts NAME: the boot_vm options of a QMP socket at $E2E_TMP/NAME.qmp
qmp_opts() { echo --qemu -qmp --qemu "unix:$E2E_TMP/$1.qmp,server=on,wait=off"; }

# wait_helper NAME TIMEOUT: waits for helper NAME to exit by itself; its exit status
# (124 when it had to be stopped).
wait_helper() {
    local f=$E2E_TMP/pids/$1.pid pid i rc=0
    [ -e "$f" ] || return 0
    pid=$(cat "$f")
    for ((i = 0; i < $2 * 10; i++)); do _alive "$pid" || break; sleep 0.1; done
    if _alive "$pid"; then e2e_stop "$1"; return 124; fi
    wait "$pid" || rc=$?
    rm -f "$f"
    return $rc
}

# ms_until FILE REGEX T0 TIMEOUT [OFFSET]: milliseconds from T0 (a `now`) to when a line
# of FILE (past byte OFFSET) matching REGEX is first seen (polled every 20 ms), or "none".
ms_until() {
    local i
    for ((i = 0; i < $4 * 50; i++)); do
        if tail -c +"$((${5:-0} + 1))" "$1" 2>/dev/null | grep -aqE "$2"; then ms_since "$3"; return; fi
        sleep 0.02
    done
    echo none
}

# migrate_vm SRC DST: migrates VM SRC to VM DST (started with -incoming unix:$E2E_TMP/DST.mig),
# then quits SRC (as libvirt does). Sets MIG_END (a `now` when the source saw it complete)
# and prints QEMU's figures. 1 when it did not complete.
migrate_vm() {
    local out
    out=$(helper migrate "$E2E_TMP/$1.qmp" "unix:$E2E_TMP/$2.mig" 120 2>&1 || true)
    echo "  $1 -> $2: $out"
    MIG_END=$(sed -n 's/.* end=\([0-9.]*\).*/\1/p' <<< "$out")
    [[ "$out" == "MIGRATED status=completed "* ]] || { MIG_END=$(now); return 1; }
    helper qmp "$E2E_TMP/$1.qmp" quit >/dev/null 2>&1 || true
    wait_vm "$1" 10 || true
}

# collect_after LABEL FILE OFFSET EXPECTED...: collect_file on the part of FILE past OFFSET
collect_after() {
    local label=$1 file=$2 off=$3; shift 3
    # The MSI-X count is sampled in the guest every 0.5 s over one run: a timeline cut by
    # loadvm may miss it. Shown, not counted.
    tail -c +"$((off + 1))" "$file" | sed 's/^FAIL msix-delivered/INFO (not counted after loadvm) FAIL msix-delivered/' > "$file.after"
    collect_file "$label" "$file.after" "$@"
}

show_info() {
    sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$2" 2>/dev/null | tr -d '\r' \
        | grep -aE '^(INFO (old session|first session|stats|peer says|link up)|MIGRATED)' | sed "s|^|  $1: |" || true
}

# The guest's results after the reset (PROTOCOL.md §3), in every case.
AFTER=(old-data-intact old-sessions-reset old-sessions-stay-reset new-link-up new-session-checksum new-session-echo new-session-receive)
# The destination host program's exchange (tools/src/checks.rs), without the latency figure.
DEST_EXCHANGE=(link-up echo-data eof-after-shutdown send-checksum receive-pattern eof-after-peer-close broken-pipe refused parallel-sessions peer-done)
TIMES=()

# ---------------------------------------------------------------- cases
# QEMU's migration blockers: devices started paused (-S), nothing boots.
case_blockers() {
    local shm=/dev/shm/ivring-mig-blk-$$ out initrd=$E2E_TMP/ivring.cpio.gz
    echo "$shm" >> "$E2E_TMP/shm-files"
    ivring_initrd "$initrd"
    serve blk || return 0
    # peer mode (master=off, QEMU's default): migration refused
    boot_vm blk-plain plain "$initrd" --shm "$shm" --size "$SIZE" $(qmp_opts blk-plain) --qemu -S >/dev/null
    out=$(helper migrate "$E2E_TMP/blk-plain.qmp" "unix:$E2E_TMP/blk-nowhere.mig" 10 2>&1 || true)
    [[ "$out" == *"peer mode"* ]] && e2e_pass blockers/plain-master-off-blocked \
        || e2e_fail blockers/plain-master-off-blocked "migrate said: $out"
    kill_vm blk-plain
    boot_vm blk-db doorbell "$initrd" --sock "$E2E_TMP/blk.sock" $(qmp_opts blk-db) --qemu -S >/dev/null
    out=$(helper migrate "$E2E_TMP/blk-db.qmp" "unix:$E2E_TMP/blk-nowhere.mig" 10 2>&1 || true)
    [[ "$out" == *"peer mode"* ]] && e2e_pass blockers/doorbell-master-off-blocked \
        || e2e_fail blockers/doorbell-master-off-blocked "migrate said: $out"
    kill_vm blk-db
    # master=on on the main socket (an id from 1): QEMU refuses to start
    boot_vm blk-main doorbell "$initrd" --sock "$E2E_TMP/blk.sock" --master --qemu -S >/dev/null
    wait_vm blk-main 20 || true
    grep -q "master must connect to the server before any peers" "$E2E_TMP/blk-main.qemu.log" \
        && e2e_pass blockers/master-on-main-socket-refused-by-qemu \
        || e2e_fail blockers/master-on-main-socket-refused-by-qemu "$(tail -2 "$E2E_TMP/blk-main.qemu.log")"
    # master=on on the VM socket (id 0): QEMU starts, and a second VM there is refused
    boot_vm blk-vm doorbell "$initrd" --sock "$E2E_TMP/blk.vm.sock" --master $(qmp_opts blk-vm) --qemu -S >/dev/null
    if helper qmp "$E2E_TMP/blk-vm.qmp" query-status > "$E2E_TMP/blk-vm.status" 2>&1; then
        e2e_pass blockers/master-on-vm-socket-accepted
    else
        e2e_fail blockers/master-on-vm-socket-accepted "$(cat "$E2E_TMP/blk-vm.status"; tail -2 "$E2E_TMP/blk-vm.qemu.log")"
    fi
    boot_vm blk-vm2 doorbell "$initrd" --sock "$E2E_TMP/blk.vm.sock" --master --qemu -S >/dev/null
    if ! wait_vm blk-vm2 20; then e2e_fail blockers/second-vm-refused "the second QEMU runs"
    else e2e_pass blockers/second-vm-refused; fi
    grep -q "refusing a second VM" "$E2E_TMP/blk.log" && e2e_pass blockers/second-vm-logged \
        || e2e_fail blockers/second-vm-logged "$(tail -3 "$E2E_TMP/blk.log")"
    kill_vm blk-vm
    e2e_stop blk
}

# Live migration with sessions open and data flowing both ways.
case_sessions() {
    local initrd=$E2E_TMP/ivring.cpio.gz rc=0 kargs t1 t2
    serve srcA || return 0
    serve dstB || return 0
    e2e_spawn hostA "$HOST_BIN" check --role host --join "$E2E_TMP/srcA.sock" --scenario migrate \
        --no-return --timeout $TIMEOUT
    ivring_initrd "$initrd"
    kargs=(e2e.vfio=1 "e2e.args=check,--scenario,migrate,--timeout,$TIMEOUT")
    boot_vm sesA doorbell "$initrd" --sock "$E2E_TMP/srcA.vm.sock" --master $(qmp_opts sesA) \
        -- "${kargs[@]}" >/dev/null
    if ! wait_for_line "$(vm_serial sesA)" '^READY migrate' 120 sesA; then
        e2e_fail sessions/ready "the guest never said READY"; collect_results sesA probe
        kill_vm sesA; e2e_stop hostA; e2e_stop srcA; e2e_stop dstB; return 0
    fi
    grep -aq 'own peer id (IVPosition): 0' "$(vm_serial sesA)" && e2e_pass sessions/vm-id-0 \
        || e2e_fail sessions/vm-id-0 "$(grep -a 'IVPosition' "$(vm_serial sesA)")"
    # The destination: its own server and host program, as another host would have.
    e2e_spawn hostB "$HOST_BIN" check --role host --join "$E2E_TMP/dstB.sock" --scenario exchange \
        --latency 0 --bytes 262144 --timeout $TIMEOUT
    boot_vm sesB doorbell "$initrd" --sock "$E2E_TMP/dstB.vm.sock" --master $(qmp_opts sesB) \
        --qemu -incoming --qemu "unix:$E2E_TMP/sesB.mig" -- "${kargs[@]}" >/dev/null
    sleep 1
    if migrate_vm sesA sesB; then e2e_pass sessions/migrated; else e2e_fail sessions/migrated "see above"; fi
    t1=$(ms_until "$E2E_TMP/hostB.log" '^PASS link-up' "$MIG_END" 60)
    t2=$(ms_until "$(vm_serial sesB)" '^PASS new-link-up' "$MIG_END" 60)
    TIMES+=("sessions: destination host's first session ${t1} ms, guest's ${t2} ms")
    if wait_vm sesB 150; then e2e_pass sessions/poweroff; else e2e_fail sessions/poweroff timeout; fi
    collect_results sesA probe probe-interrupts probe-header old-link-up
    collect_results sesB "${AFTER[@]}" peer-done guest-run
    wait_helper hostA 30 || rc=$?
    collect_file hostA "$E2E_TMP/hostA.log" old-link-up old-data-intact old-sessions-reset old-sessions-stay-reset
    e2e_check hostA/exit-status [ "$rc" = 0 ]
    rc=0; wait_helper hostB 30 || rc=$?
    collect_file hostB "$E2E_TMP/hostB.log" "${DEST_EXCHANGE[@]}"
    e2e_check hostB/exit-status [ "$rc" = 0 ]
    show_info sesB "$(vm_serial sesB)"; show_info hostA "$E2E_TMP/hostA.log"
    e2e_stop srcA; e2e_stop dstB
}

# Migration during a qemu-ga exchange through the bridges.
case_qga() {
    local initrd=$E2E_TMP/qga.cpio.gz out rc=0
    serve qsrc || return 0
    serve qdst || return 0
    e2e_spawn qbrA "$HOST_BIN" bridge --listen "$E2E_TMP/qbrA.sock" --join "$E2E_TMP/qsrc.sock"
    e2e_spawn qbrB "$HOST_BIN" bridge --listen "$E2E_TMP/qbrB.sock" --join "$E2E_TMP/qdst.sock"
    build_initramfs "$initrd" "$GUEST_BIN" "$E2E_DIR/cases/qga.init"
    boot_vm qgaA doorbell "$initrd" --sock "$E2E_TMP/qsrc.vm.sock" --master $(qmp_opts qgaA) \
        --vserial "$E2E_TMP/qgaA.vs" -- e2e.mode=doorbell >/dev/null
    if python3 "$E2E_DIR/qga_client.py" check "$E2E_TMP/qbrA.sock" 120 > "$E2E_TMP/qga-before.log" 2>&1; then
        e2e_pass qga/source-bridge-answers
    else
        e2e_fail qga/source-bridge-answers "$(tr '\n' ';' < "$E2E_TMP/qga-before.log")"
    fi
    boot_vm qgaB doorbell "$initrd" --sock "$E2E_TMP/qdst.vm.sock" --master $(qmp_opts qgaB) \
        --vserial "$E2E_TMP/qgaB.vs" --qemu -incoming --qemu "unix:$E2E_TMP/qgaB.mig" \
        -- e2e.mode=doorbell >/dev/null
    # A client busy through the source's bridge while the VM goes.
    helper busy "$E2E_TMP/qbrA.sock" 90 > "$E2E_TMP/qga-busy.log" 2>&1 &
    local busy=$!
    echo "$busy" > "$E2E_TMP/pids/qga-busy.pid"
    sleep 1
    if migrate_vm qgaA qgaB; then e2e_pass qga/migrated; else e2e_fail qga/migrated "see above"; fi
    out=$(helper first "$E2E_TMP/qbrB.sock" "$MIG_END" 60 2>&1 | tail -n 1 || true)
    echo "  destination bridge: $out"
    [[ "$out" == "RESULT first ok=1 "* ]] && e2e_pass qga/destination-first-reply-own \
        || e2e_fail qga/destination-first-reply-own "$out"
    TIMES+=("qga: first correct reply through the destination's bridge $(sed -n 's/.* reply=\([^ ]*\).*/\1/p' <<< "$out")")
    wait "$busy" || rc=$?
    rm -f "$E2E_TMP/pids/qga-busy.pid"
    out=$(tail -n 1 "$E2E_TMP/qga-busy.log")
    echo "  source bridge, busy client: $out"
    [ "$rc" = 0 ] && [[ "$out" == "RESULT busy ok=1 "* ]] && [[ "$out" != *" replies=0 "* ]] \
        && e2e_pass qga/busy-client-only-own-replies || e2e_fail qga/busy-client-only-own-replies "$out"
    if python3 "$E2E_DIR/qga_client.py" check "$E2E_TMP/qbrB.sock" 30 > "$E2E_TMP/qga-after.log" 2>&1; then
        e2e_pass qga/destination-bridge-answers
    else
        e2e_fail qga/destination-bridge-answers "$(tr '\n' ';' < "$E2E_TMP/qga-after.log")"
    fi
    kill_vm qgaB
    collect_results qgaA pci-device vfio-bind qga-unix-start guest-bridge-start
    e2e_stop qbrA; e2e_stop qbrB; e2e_stop qsrc; e2e_stop qdst
}

# savevm, the host program replaced, loadvm.
case_savevm() {
    local initrd=$E2E_TMP/ivring.cpio.gz disk=$E2E_TMP/snap.qcow2 out off t1 serial
    qemu-img create -q -f qcow2 "$disk" 64M
    serve snap || return 0
    e2e_spawn snapH1 "$HOST_BIN" peer --role host --join "$E2E_TMP/snap.sock"
    ivring_initrd "$initrd"
    boot_vm snapvm doorbell "$initrd" --sock "$E2E_TMP/snap.vm.sock" --master $(qmp_opts snapvm) \
        --qemu -drive --qemu "if=none,id=snapstore,format=qcow2,file=$disk" \
        -- e2e.vfio=1 e2e.hold=1 "e2e.args=check,--scenario,migrate,--timeout,$TIMEOUT" >/dev/null
    serial=$(vm_serial snapvm)
    if ! wait_for_line "$serial" '^READY migrate' 120 snapvm; then
        e2e_fail savevm/ready "the guest never said READY"; kill_vm snapvm; e2e_stop snapH1; e2e_stop snap; return 0
    fi
    sleep 1
    out=$(helper hmp "$E2E_TMP/snapvm.qmp" "savevm s1" 2>&1) && e2e_pass savevm/savevm \
        || e2e_fail savevm/savevm "$out"
    # The host program moves on: killed, and a new one (a new epoch) takes its place.
    kill -KILL "$(cat "$E2E_TMP/pids/snapH1.pid")"; e2e_stop snapH1
    e2e_spawn snapH2 "$HOST_BIN" peer --role host --join "$E2E_TMP/snap.sock"
    # The guest of the first timeline finds the new host program and finishes its checks.
    wait_for_line "$serial" '^E2E-HOLD' 120 snapvm || true
    off=$(stat -c %s "$serial")
    local t0; t0=$(now)
    out=$(helper hmp "$E2E_TMP/snapvm.qmp" "loadvm s1" 2>&1) && e2e_pass savevm/loadvm \
        || e2e_fail savevm/loadvm "$out"
    t1=$(ms_until "$serial" '^PASS new-link-up' "$t0" 60 "$off")
    TIMES+=("savevm: from the start of loadvm to the restored guest's first session ${t1} ms (loadvm took part of it)")
    [ "$(ms_until "$serial" '^E2E-HOLD' "$t0" 120 "$off")" != none ] || true
    kill_vm snapvm
    # The restored guest: after loadvm only
    collect_after snapvm-restored "$serial" "$off" "${AFTER[@]}" guest-run
    show_info snapvm-restored "$serial.after"
    e2e_stop snapH2; e2e_stop snap
}

# stop for longer than the peer timeout, then cont.
case_stopcont() {
    local initrd=$E2E_TMP/ivring.cpio.gz rc=0 t0 t1 t2
    serve sc || return 0
    e2e_spawn schost "$HOST_BIN" check --role host --join "$E2E_TMP/sc.sock" --scenario migrate --timeout $TIMEOUT
    ivring_initrd "$initrd"
    boot_vm scvm doorbell "$initrd" --sock "$E2E_TMP/sc.vm.sock" --master $(qmp_opts scvm) \
        -- e2e.vfio=1 "e2e.args=check,--scenario,migrate,--timeout,$TIMEOUT" >/dev/null
    if ! wait_for_line "$(vm_serial scvm)" '^READY migrate' 120 scvm; then
        e2e_fail stopcont/ready "the guest never said READY"; kill_vm scvm; e2e_stop schost; e2e_stop sc; return 0
    fi
    sleep 1
    helper qmp "$E2E_TMP/scvm.qmp" stop >/dev/null && e2e_pass stopcont/stop || e2e_fail stopcont/stop "QMP stop failed"
    sleep 3
    t0=$(now)
    helper qmp "$E2E_TMP/scvm.qmp" cont >/dev/null && e2e_pass stopcont/cont || e2e_fail stopcont/cont "QMP cont failed"
    t1=$(ms_until "$E2E_TMP/schost.log" '^PASS new-link-up' "$t0" 60)
    t2=$(ms_until "$(vm_serial scvm)" '^PASS new-link-up' "$t0" 60)
    TIMES+=("stopcont: from cont to the host's first new session ${t1} ms, the guest's ${t2} ms")
    if wait_vm scvm 150; then e2e_pass stopcont/poweroff; else e2e_fail stopcont/poweroff timeout; fi
    collect_results scvm old-link-up "${AFTER[@]}" peer-done guest-run
    wait_helper schost 30 || rc=$?
    collect_file schost "$E2E_TMP/schost.log" old-link-up "${AFTER[@]}" peer-done
    e2e_check schost/exit-status [ "$rc" = 0 ]
    show_info scvm "$(vm_serial scvm)"; show_info schost "$E2E_TMP/schost.log"
    e2e_stop sc
}

# ivshmem-plain, master=on, each side its own file and polling host program.
# QEMU 10.0 under TCG aborts the source of a live migration of a running VM with an
# ivshmem-plain device (physmem.c tlb_reset_dirty_range_all assertion; seen with a bare
# kernel and no ivring at all), and migrates a stopped one: so first the live attempt on
# two bare VMs, its outcome checked to be one of the two known ones, then the ivring
# case as `stop` on the source, `migrate`, `cont` on the destination.
case_plain() {
    local initrd=$E2E_TMP/ivring.cpio.gz fa=/dev/shm/ivring-mig-a-$$ fb=/dev/shm/ivring-mig-b-$$ rc=0 kargs t1 t2 out
    echo "$fa" >> "$E2E_TMP/shm-files"; echo "$fb" >> "$E2E_TMP/shm-files"
    rm -f "$fa" "$fb"; truncate -s "$SIZE" "$fa"; truncate -s "$SIZE" "$fb"
    ivring_initrd "$initrd"
    # The live attempt: guests that just run their kernel (no /init: it panics and halts).
    boot_vm plbareA plain "$initrd" --shm "$fa" --size "$SIZE" --master $(qmp_opts plbareA) \
        --qemu -no-shutdown -- rdinit=/nonexistent panic=0 >/dev/null
    boot_vm plbareB plain "$initrd" --shm "$fb" --size "$SIZE" --master $(qmp_opts plbareB) \
        --qemu -no-shutdown --qemu -incoming --qemu "unix:$E2E_TMP/plbareB.mig" -- rdinit=/nonexistent panic=0 >/dev/null
    sleep 4
    out=$(helper migrate "$E2E_TMP/plbareA.qmp" "unix:$E2E_TMP/plbareB.mig" 60 2>&1 || true)
    sleep 0.5
    if grep -q "tlb_reset_dirty_range_all: Assertion" "$E2E_TMP/plbareA.qemu.log"; then
        echo "  live migration of a running VM with ivshmem-plain: the source QEMU aborted ($(grep -o 'tlb_reset_dirty_range_all: Assertion.*' "$E2E_TMP/plbareA.qemu.log"))"
        e2e_pass plain/live-migration-outcome-known
    elif [[ "$out" == "MIGRATED status=completed "* ]]; then
        echo "  live migration of a running VM with ivshmem-plain completed (this QEMU does not abort)"
        e2e_pass plain/live-migration-outcome-known
    else
        e2e_fail plain/live-migration-outcome-known "$out; $(tail -2 "$E2E_TMP/plbareA.qemu.log")"
    fi
    kill_vm plbareA; kill_vm plbareB
    truncate -s 0 "$fa" "$fb"; truncate -s "$SIZE" "$fa"; truncate -s "$SIZE" "$fb"

    e2e_spawn plA "$HOST_BIN" check --role host --plain "$fa" --scenario migrate --no-return --timeout $TIMEOUT
    kargs=(e2e.vfio=0 "e2e.args=check,--scenario,migrate,--timeout,$TIMEOUT")
    boot_vm plvmA plain "$initrd" --shm "$fa" --size "$SIZE" --master $(qmp_opts plvmA) -- "${kargs[@]}" >/dev/null
    if ! wait_for_line "$(vm_serial plvmA)" '^READY migrate' 120 plvmA; then
        e2e_fail plain/ready "the guest never said READY"; kill_vm plvmA; e2e_stop plA; return 0
    fi
    e2e_spawn plB "$HOST_BIN" check --role host --plain "$fb" --scenario exchange --latency 0 \
        --bytes 262144 --timeout $TIMEOUT
    boot_vm plvmB plain "$initrd" --shm "$fb" --size "$SIZE" --master $(qmp_opts plvmB) \
        --qemu -incoming --qemu "unix:$E2E_TMP/plvmB.mig" -- "${kargs[@]}" >/dev/null
    sleep 1
    helper qmp "$E2E_TMP/plvmA.qmp" stop >/dev/null || e2e_fail plain/stop "QMP stop failed"
    if migrate_vm plvmA plvmB; then e2e_pass plain/migrated-stopped; else e2e_fail plain/migrated-stopped "see above"; fi
    helper qmp "$E2E_TMP/plvmB.qmp" cont >/dev/null && e2e_pass plain/cont-on-destination \
        || e2e_fail plain/cont-on-destination "QMP cont failed"
    MIG_END=$(now)
    t1=$(ms_until "$E2E_TMP/plB.log" '^PASS link-up' "$MIG_END" 60)
    t2=$(ms_until "$(vm_serial plvmB)" '^PASS new-link-up' "$MIG_END" 60)
    TIMES+=("plain (stop, migrate, cont): from cont on the destination to its host's first session ${t1} ms, the guest's ${t2} ms")
    if wait_vm plvmB 150; then e2e_pass plain/poweroff; else e2e_fail plain/poweroff timeout; fi
    collect_results plvmA probe probe-polling old-link-up
    collect_results plvmB "${AFTER[@]}" peer-done guest-run
    wait_helper plA 30 || rc=$?
    collect_file plA "$E2E_TMP/plA.log" old-link-up old-data-intact old-sessions-reset old-sessions-stay-reset
    e2e_check plA/exit-status [ "$rc" = 0 ]
    rc=0; wait_helper plB 30 || rc=$?
    collect_file plB "$E2E_TMP/plB.log" "${DEST_EXCHANGE[@]}"
    e2e_check plB/exit-status [ "$rc" = 0 ]
    show_info plvmB "$(vm_serial plvmB)"; show_info plA "$E2E_TMP/plA.log"
}

# ---------------------------------------------------------------- main
e2e_init
t0=$SECONDS
kvm_works || true
echo "e2e: migrate accel=$E2E_ACCEL qemu=$("$QEMU" --version | head -1)"
for c in "${cases[@]}"; do
    declare -F "case_$c" >/dev/null || { e2e_fail "$c" "no such case"; continue; }
    ct=$SECONDS
    echo "== $c"
    "case_$c"
    echo "== $c: $((SECONDS - ct)) s"
done
for t in "${TIMES[@]}"; do echo "e2e: migrate TIME $t ($E2E_ACCEL)"; done
echo "e2e: migrate total $((SECONDS - t0)) s"
e2e_summary
