#!/usr/bin/env bash
# shellcheck disable=SC2015  # e2e_pass/e2e_fail never fail
# The guest agent over ivring in a real VM, side by side with virtio-serial.
# Usage: e2e/qga.sh [--mode doorbell|join|plain] [--guest-bin P] [--host-bin P] [--reps N]
#
# One VM runs qemu-ga twice: on the virtio-serial port org.qemu.guest_agent.0 (as libvirt
# wires it), and on a UNIX socket behind `ivring-guest bridge` on the ivshmem device. On
# the host, `ivring-host bridge` offers the agent's socket: ivshmem-doorbell with the
# server embedded (doorbell) or run apart by `ivring-host serve` (join), or ivshmem-plain
# (plain). In join and plain modes the host bridge is also restarted mid-run. Checks: guest-ping, guest-info,
# guest-sync through ivring; then the reset scenarios (a) half a command + disconnect,
# (b) guest-info + disconnect before the reply, each also with the reconnect at once,
# REPS times each, over both transports. Asserts: ivring never hands a client anything
# but its own reply; virtio-serial does (the stale reply arrives) in (b), and in (a).
# Then a guest that scribbled one word of the shared memory and left, once per word in
# SCRIBBLES: the guest stops its bridge, writes the word, starts a fresh bridge, and the
# next client through the host bridge must get exactly its own guest-ping and guest-sync
# replies within 30 s; the time from the fresh bridge's start to that first reply is printed.
# The operator commands of the docs run as written (e2e/doc_commands.py; paths and the
# binaries substituted): the host bridge (doorbell) or server (join) is the docs' command,
# the VM's ivshmem options must include the docs' (doorbell: docs/QGA.md's quick start;
# join and plain: the README's), and at the end the guest runs the README's probe and
# docs/QGA.md's guest commands in place of its own and the docs' agent client must answer.
# Env: GUEST_BIN, HOST_BIN (default: built here; the guest one static), QGA_REPS (50),
# QGA_SCRIBBLES (the names of the scribble cases to run; default all),
# and lib.sh's (E2E_BUILD, E2E_ACCEL, E2E_KEEP, ...). Last line: `N passed, M failed`.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$E2E_DIR/lib.sh"

MODE=doorbell
REPS=${QGA_REPS:-50}
GUEST_BIN=${GUEST_BIN:-}
HOST_BIN=${HOST_BIN:-}
while [ $# -gt 0 ]; do
    case $1 in
        --mode) MODE=$2; shift 2 ;;
        --guest-bin) GUEST_BIN=$2; shift 2 ;;
        --host-bin) HOST_BIN=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case $MODE in doorbell|join|plain) ;; *) echo "--mode doorbell|join|plain" >&2; exit 2 ;; esac

build_binaries
command -v qemu-ga >/dev/null || [ -x /usr/sbin/qemu-ga ] || {
    echo "qemu-ga missing: run e2e/setup.sh (installs qemu-guest-agent)" >&2; exit 2; }

e2e_init
t0=$SECONDS
kvm_works || true
echo "e2e: qga mode=$MODE accel=$E2E_ACCEL reps=$REPS qemu=$("$QEMU" --version | head -1)"

SIZE=4M
name=qga-$$
br=$E2E_TMP/qga-ivring.sock      # what clients of the agent over ivring connect to
vs=$E2E_TMP/qga-vserial.sock     # the virtio-serial chardev (QEMU is the server)
ctl=$E2E_TMP/qga-ctl.sock        # commands to the guest's /init (virtio-serial port e2e.ctl)
initrd=$E2E_TMP/qga.cpio.gz
client() { python3 "$E2E_DIR/qga_client.py" "$@"; }
doc() { python3 "$E2E_DIR/doc_commands.py" "$@"; }
# The docs' /run/ivring, here (the programs create only /run/ivring itself)
docrun=$E2E_TMP/run/ivring
mkdir -p "$docrun"
docsub=(--sub ivring-host="$HOST_BIN" --sub /run/ivring="$docrun")
if out=$(doc check); then e2e_pass qga/doc-blocks-marked; else e2e_fail qga/doc-blocks-marked "$out"; fi

case $MODE in
    doorbell)
        # docs/QGA.md's quick start: the bridge embeds the server
        ivs=$docrun/vm1.ivshmem.sock br=$docrun/vm1.qga.sock
        cmd=$(doc lines qga-host-bridge --program ivring-host "${docsub[@]}")
        echo "  doc qga-host-bridge: $cmd"
        e2e_spawn host-bridge bash -c "exec $cmd"
        wait_for_file "$ivs" 10 || { e2e_fail qga/doc-qga-host-bridge "$(cat "$E2E_TMP/host-bridge.log")"; e2e_summary; exit 1; }
        e2e_pass qga/doc-qga-host-bridge
        vmargs=(--sock "$ivs" --vectors 2) ;;
    join)
        # the README's server
        ivs=$docrun/ivshmem.sock
        cmd=$(doc lines serve --program ivring-host "${docsub[@]}")
        echo "  doc serve: $cmd"
        e2e_spawn ivshmem-server bash -c "exec $cmd"
        wait_for_file "$ivs" 10 || { e2e_fail qga/doc-serve "$(cat "$E2E_TMP/ivshmem-server.log")"; e2e_summary; exit 1; }
        e2e_pass qga/doc-serve
        e2e_spawn host-bridge "$HOST_BIN" bridge --listen "$br" --join "$ivs"
        # as the README's QEMU command, for its server (one vector by default)
        vmargs=(--sock "$ivs" --vectors 1) ;;
    plain)
        shm=/dev/shm/$name
        echo "$shm" >> "$E2E_TMP/shm-files"
        rm -f "$shm"
        e2e_spawn host-bridge "$HOST_BIN" bridge --listen "$br" --plain "$shm" --size "$SIZE"
        vmargs=(--shm "$shm") ;;
esac
wait_for_file "$br" 10 && e2e_pass qga/host-bridge-listens \
    || e2e_fail qga/host-bridge-listens "$(cat "$E2E_TMP/host-bridge.log")"
mode=$(stat -c %a "$br" 2>/dev/null || echo none)
[ "$mode" = 600 ] && e2e_pass qga/socket-0600 || e2e_fail qga/socket-0600 "mode $mode"

doc lines qga-guest > "$E2E_TMP/doc-qga-guest.sh"
doc lines guest-probe > "$E2E_TMP/doc-guest-probe.sh"
build_initramfs "$initrd" "$GUEST_BIN" "$E2E_DIR/cases/qga.init" \
    "$E2E_TMP/doc-qga-guest.sh:/doc/qga-guest.sh" "$E2E_TMP/doc-guest-probe.sh:/doc/guest-probe.sh"
vmmode=$MODE; [ "$MODE" = join ] && vmmode=doorbell
boot_vm "$name" "$vmmode" "$initrd" --size "$SIZE" "${vmargs[@]}" --vserial "$vs" \
    --qemu -chardev --qemu "socket,path=$ctl,server=on,wait=off,id=ctl0" \
    --qemu -device --qemu virtserialport,chardev=ctl0,name=e2e.ctl \
    -- e2e.mode="$vmmode" >/dev/null

# The checks over ivring (the first one waits for the guest to boot).
if client check "$br" 120 > "$E2E_TMP/check-ivring.log" 2>&1; then e2e_pass qga/ivring-ping-info-sync
else e2e_fail qga/ivring-ping-info-sync "$(tr '\n' ';' < "$E2E_TMP/check-ivring.log")"; fi
sed 's/^/  ivring /' "$E2E_TMP/check-ivring.log"
if client check "$vs" 60 > "$E2E_TMP/check-vserial.log" 2>&1; then e2e_pass qga/vserial-ping-info-sync
else e2e_fail qga/vserial-ping-info-sync "$(tr '\n' ';' < "$E2E_TMP/check-vserial.log")"; fi

# The docs' QEMU device options (doorbell: docs/QGA.md's; join: the README's, with its
# server; plain: the README's), each one among the suite's (its -machine may add options,
# as kernel-irqchip=split under KVM). Read once QEMU runs: the guest answered.
case $MODE in
    doorbell) qemu_doc=qga-host-bridge ;;
    join) qemu_doc=qemu-doorbell ;;
    plain) qemu_doc=qemu-plain ;;
esac
mapfile -d '' qemu_args < "/proc/$VM_PID/cmdline"
missing=()
while read -r opt val; do
    found=0
    for ((i = 0; i + 1 < ${#qemu_args[@]}; i++)); do
        a=${qemu_args[i]} v=${qemu_args[i + 1]}
        case $opt in
            append) [ "$a" = -append ] && [[ " $v " == *" $val "* ]] && found=1 ;;
            -machine) [ "$a" = "$opt" ] && [[ "$v" == "$val" || "$v" == "$val",* ]] && found=1 ;;
            *) [ "$a" = "$opt" ] && [ "$v" = "$val" ] && found=1 ;;
        esac
    done
    [ "$found" = 1 ] || missing+=("$opt $val")
done < <(doc qemu-options "$qemu_doc" --sub /dev/shm/ivring="${shm:-}" "${docsub[@]}")
[ ${#missing[@]} -eq 0 ] && e2e_pass "qga/doc-$qemu_doc-qemu-options" \
    || e2e_fail "qga/doc-$qemu_doc-qemu-options" "not in the suite's QEMU command: ${missing[*]}"

# result LINE KEY: the value of KEY=... in a RESULT line
result() { sed -n "s/.* $2=\([0-9]*\).*/\1/p" <<< "$1"; }

run_scenario() { # TRANSPORT SOCK KIND FAST
    local tr=$1 sock=$2 kind=$3 fast=$4 label out ok
    label=$tr-$kind
    [ "$fast" = 1 ] && label+=-fast
    out=$(client scenario "$sock" "$label" "$kind" "$fast" "$REPS" --resync 2>&1 | grep '^RESULT' || true)
    echo "  $out"
    ok=$(result "$out" ok)
    [ -n "$ok" ] || { e2e_fail "qga/$label" "no result: $out"; return; }
    if [ "$tr" = ivring ]; then
        [ "$ok" -eq "$REPS" ] && e2e_pass "qga/$label-clean" \
            || e2e_fail "qga/$label-clean" "$((REPS - ok)) of $REPS first replies were not the client's own"
    else
        LEAKS[$label]=$((REPS - ok))
        STALE_INFO[$label]=$(result "$out" stale_info)
    fi
}
declare -A LEAKS STALE_INFO
for fast in 0 1; do
    for kind in a b; do
        run_scenario ivring "$br" "$kind" "$fast"
        run_scenario vserial "$vs" "$kind" "$fast"
    done
done
# virtio-serial must show the problem, or this comparison proves nothing.
sb=$(( ${STALE_INFO[vserial-b]:-0} + ${STALE_INFO[vserial-b-fast]:-0} ))
[ "$sb" -gt 0 ] && e2e_pass qga/vserial-b-leaks-stale-guest-info \
    || e2e_fail qga/vserial-b-leaks-stale-guest-info "no stale guest-info reply over virtio-serial in $((2 * REPS)) runs"
sa=$(( ${LEAKS[vserial-a]:-0} + ${LEAKS[vserial-a-fast]:-0} ))
[ "$sa" -gt 0 ] && e2e_pass qga/vserial-a-leaks \
    || e2e_fail qga/vserial-a-leaks "no wrong first reply over virtio-serial in $((2 * REPS)) runs"

# The host bridge restarts (join and plain: the link outlives it); the guest side follows.
if [ "$MODE" != doorbell ]; then
    e2e_stop host-bridge
    case $MODE in
        join) e2e_spawn host-bridge "$HOST_BIN" bridge --listen "$br" --join "$ivs" ;;
        plain) e2e_spawn host-bridge "$HOST_BIN" bridge --listen "$br" --plain "$shm" --size "$SIZE" ;;
    esac
    if client check "$br" 60 > "$E2E_TMP/check-restart.log" 2>&1; then e2e_pass qga/ivring-after-host-bridge-restart
    else e2e_fail qga/ivring-after-host-bridge-restart "$(tr '\n' ';' < "$E2E_TMP/check-restart.log")"; fi
fi

# A guest that wrote one word of the shared memory and left (PROTOCOL.md §1: header at 0,
# host side block at 512, guest side block at 1024): the host re-lays what it owns, and
# the next guest bridge is served cleanly. NAME OFFSET VALUE (u64).
SCRIBBLES=(
    "header-magic-garbage 0 0xff"
    "header-magic-zero 0 0"
    "host-epoch 512 0x400001"
    "host-ack 536 0x400001"
    "host-tx-head 640 0x1000"
    "guest-epoch 1024 0xffffffffffffffff"
)
SCRIBBLE_TIMEOUT=30
serial=$(vm_serial "$name")
times=()
ts=$SECONDS
prev_ok=1
for sc in "${SCRIBBLES[@]}"; do
    read -r sname soff sval <<< "$sc"
    case " ${QGA_SCRIBBLES:-$sname} " in *" $sname "*) ;; *) continue ;; esac
    out=$(client scribble "$ctl" "$serial" "$br" "$sname" "$soff" "$sval" "$SCRIBBLE_TIMEOUT" 2>&1 | tail -n 1 || true)
    echo "  $out"
    case $out in
        "RESULT $sname ok=1 "*) e2e_pass "qga/scribble-$sname"; prev_ok=1 ;;
        *) e2e_fail "qga/scribble-$sname" "${out#RESULT "$sname" }$([ "$prev_ok" = 1 ] || echo " (after a failed case)")"
           SCRIBBLE_FAILED=1; prev_ok=0 ;;
    esac
    t=$(sed -n 's/.* reply=\([^ ]*\).*/\1/p' <<< "$out")
    times+=("$sname=${t:-?}")
done
echo "e2e: qga scribble: from the fresh guest bridge's start to the first correct reply ($E2E_ACCEL, mode $MODE): ${times[*]}; all cases $((SECONDS - ts)) s"
python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"done\n"); s.recv(1)' "$ctl" &
wait_for_line "$serial" '^CTL done' 10 "$name" || true
kill $! 2>/dev/null; wait $! 2>/dev/null || true
if [ -n "${SCRIBBLE_FAILED:-}" ]; then
    echo "---- guest: scribble cases ----"
    tr -d '\r' < "$serial" | grep -aE '^(INFO (scribble|bridge-)|SCRIBBLE )' || true
    echo "---- host bridge log (tail) ----"
    tail -n 10 "$E2E_TMP/host-bridge.log"
fi

# Still answering after all that, and nothing in the guest died.
if client check "$br" 30 > "$E2E_TMP/check2.log" 2>&1; then e2e_pass qga/ivring-after-scenarios
else e2e_fail qga/ivring-after-scenarios "$(tr '\n' ';' < "$E2E_TMP/check2.log")"; fi
sleep 5.5
status=$(tr -d '\r' < "$(vm_serial "$name")" | grep -a '^STATUS' | tail -n 1)
[ "$status" = "STATUS qga-unix=up bridge=up qga-vserial=up" ] && e2e_pass qga/guest-processes-alive \
    || e2e_fail qga/guest-processes-alive "${status:-no STATUS line}"

# The README's `ivring-guest probe` and docs/QGA.md's guest commands, then its agent
# client through the host bridge.
td=$SECONDS
python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"doc\n"); s.recv(1)' "$ctl" &
wait_for_line "$serial" '^DOC started' 20 "$name" || true
kill $! 2>/dev/null; wait $! 2>/dev/null || true
cmd=$(doc lines qga-client --sub /run/ivring/vm1.qga.sock="$br" "${docsub[@]}")
echo "  doc qga-client: $cmd"
for _try in 1 2 3 4 5 6; do
    out=$(bash -c "$cmd" 2>&1 || true)
    [[ "$out" == *'"return"'*'"version"'* ]] && break
    sleep 2
done
[[ "$out" == *'"return"'*'"version"'* ]] && e2e_pass qga/doc-qga-guest-and-client \
    || e2e_fail qga/doc-qga-guest-and-client "reply: ${out:-none}; guest: $(tr -d '\r' < "$serial" | grep -a -A3 '^DOC\|doc-qga' | tr '\n' ';')"
echo "e2e: qga doc commands $((SECONDS - td)) s"
kill_vm "$name"
collect_results "$name" pci-device qga-vserial-start qga-unix-start guest-bridge-start doc-guest-probe doc-qga-guest-running
if grep -q "no session" "$E2E_TMP/host-bridge.log"; then
    echo "---- host bridge log (sessions refused or failed) ----"
    grep "no session" "$E2E_TMP/host-bridge.log" | tail -5
fi
e2e_stop host-bridge
e2e_stop ivshmem-server
echo "e2e: qga total $((SECONDS - t0)) s"
e2e_summary
