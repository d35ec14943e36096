# shellcheck shell=bash disable=SC2054,SC2059,SC2086
# Library for the ivring real-VM test suite. Source it, then call e2e_init.
#
# Env vars (all optional):
#   E2E_BUILD        build/cache dir (default e2e/build), made by setup.sh
#   E2E_KERNEL       guest kernel (default $E2E_BUILD/kernel/vmlinuz)
#   E2E_MODULES      dir of guest .ko files (default $E2E_BUILD/kernel/modules)
#   QEMU             QEMU binary (default qemu-system-x86_64)
#   E2E_ACCEL        kvm|tcg: skip the KVM probe and use this
#   E2E_KVM_PROBE_TIMEOUT  seconds for the KVM probe boot (default 6)
#   E2E_KERNEL_ARGS  extra guest kernel args for every VM (default loglevel=4)
#   E2E_VM_MEM       guest memory (default 256M)
#   E2E_KEEP         if set, keep the temp dir (logs, initramfs) and print its path
#   E2E_LOGS         if set, copy every VM's serial/QEMU log into this dir
#   GUEST_BIN, HOST_BIN  the ivring binaries (used by run.sh; empty = not yet built)
set -o pipefail

E2E_DIR=${E2E_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
E2E_BUILD=${E2E_BUILD:-$E2E_DIR/build}
E2E_KERNEL=${E2E_KERNEL:-$E2E_BUILD/kernel/vmlinuz}
E2E_MODULES=${E2E_MODULES:-$E2E_BUILD/kernel/modules}
QEMU=${QEMU:-qemu-system-x86_64}
E2E_KERNEL_ARGS=${E2E_KERNEL_ARGS:-loglevel=4}
E2E_VM_MEM=${E2E_VM_MEM:-256M}
E2E_PASSED=0
E2E_FAILED=0
E2E_TMP=

e2e_log() { echo "e2e: $*" >&2; }

# e2e_init: temp dir + cleanup trap. Call once, in the top-level shell.
e2e_init() {
    E2E_TMP=$(mktemp -d /tmp/ivring-e2e.XXXXXX)
    mkdir -p "$E2E_TMP/pids" "$E2E_TMP/vm"
    : > "$E2E_TMP/shm-files"
    trap 'e2e_cleanup' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    [ -s "$E2E_KERNEL" ] || { e2e_log "no guest kernel at $E2E_KERNEL: run e2e/setup.sh"; exit 2; }
    command -v "$QEMU" >/dev/null || { e2e_log "no $QEMU: run e2e/setup.sh"; exit 2; }
}

_alive() { # PID: running and not a zombie
    local st
    [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

_stop_pid() { # PID [GRACE_SECONDS]: TERM, then KILL after the grace time
    local pid=$1 grace=${2:-3} i
    _alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do _alive "$pid" || break; sleep 0.1; done
    _alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    return 0
}

e2e_cleanup() {
    local rc=$? f
    set +e
    trap - EXIT INT TERM
    [ -n "$E2E_TMP" ] && [ -d "$E2E_TMP" ] || return $rc
    for f in "$E2E_TMP"/vm/*.pid "$E2E_TMP"/pids/*.pid; do
        [ -e "$f" ] && _stop_pid "$(cat "$f")" 2
    done
    while read -r f; do [ -n "$f" ] && rm -f "$f"; done < "$E2E_TMP/shm-files"
    if [ -n "${E2E_KEEP:-}" ]; then e2e_log "kept $E2E_TMP"; else rm -rf "$E2E_TMP"; fi
    return $rc
}

# ---------------------------------------------------------------- helper processes
# e2e_spawn NAME CMD...: run CMD in the background (stdout+stderr to $E2E_TMP/NAME.log),
# tracked for cleanup. Prints nothing; the pid is in $E2E_TMP/pids/NAME.pid.
e2e_spawn() {
    local name=$1; shift
    "$@" > "$E2E_TMP/$name.log" 2>&1 &
    echo $! > "$E2E_TMP/pids/$name.pid"
}
# e2e_stop NAME: TERM the helper and wait for it (KILL after 5 s).
e2e_stop() {
    local f=$E2E_TMP/pids/$1.pid
    [ -e "$f" ] || return 0
    _stop_pid "$(cat "$f")" 5; rm -f "$f"
}
# wait_for_file FILE TIMEOUT
wait_for_file() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do [ -e "$1" ] && return 0; sleep 0.1; done
    return 1
}

# ---------------------------------------------------------------- KVM probe
# kvm_works: 0 when a probe boot under KVM reaches the end of kernel init (the panic for
# the missing root fs) within E2E_KVM_PROBE_TIMEOUT s. Cached for the run in E2E_ACCEL
# (and a file, for subshells).
# build_binaries: sets HOST_BIN and GUEST_BIN (static, for the initramfs) to binaries
# built from this checkout, unless the caller gave them.
build_binaries() {
    local root target
    root=$(cd "$E2E_DIR/.." && pwd); target=${CARGO_TARGET_DIR:-$root/target}
    if [ -z "${GUEST_BIN:-}" ]; then
        (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
            -p ivring-guest --target x86_64-unknown-linux-gnu)
        GUEST_BIN=$target/x86_64-unknown-linux-gnu/release/ivring-guest
    fi
    if [ -z "${HOST_BIN:-}" ]; then
        (cd "$root" && cargo build --quiet --release -p ivring-host)
        HOST_BIN=$target/release/ivring-host
    fi
}

kvm_works() {
    if [ -z "${E2E_ACCEL:-}" ] && [ -n "$E2E_TMP" ] && [ -s "$E2E_TMP/accel" ]; then
        E2E_ACCEL=$(cat "$E2E_TMP/accel")
    fi
    if [ -z "${E2E_ACCEL:-}" ]; then
        E2E_ACCEL=tcg
        if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
            local log=${E2E_TMP:-/tmp}/kvm-probe.log t0=$SECONDS
            rm -f "$log"
            timeout -k 1 "${E2E_KVM_PROBE_TIMEOUT:-6}" "$QEMU" -accel kvm -machine q35 -m 128M \
                -nodefaults -no-reboot -nographic -display none -serial "file:$log" \
                -kernel "$E2E_KERNEL" -append "console=ttyS0 panic=-1 loglevel=4" \
                >/dev/null 2>&1 || true
            if grep -aqE 'Kernel panic|Unable to mount root' "$log" 2>/dev/null; then
                E2E_ACCEL=kvm
            fi
            e2e_log "KVM probe: $E2E_ACCEL ($((SECONDS - t0)) s)"
        else
            e2e_log "KVM probe: /dev/kvm not usable, tcg"
        fi
        [ -n "$E2E_TMP" ] && echo "$E2E_ACCEL" > "$E2E_TMP/accel"
    fi
    [ "$E2E_ACCEL" = kvm ]
}

# ---------------------------------------------------------------- initramfs
# e2e_rmem: build (cached in $E2E_BUILD) the static mmap peek/poke tool from rmem.c
e2e_rmem() {
    if [ ! -x "$E2E_BUILD/rmem" ] || [ "$E2E_DIR/rmem.c" -nt "$E2E_BUILD/rmem" ]; then
        mkdir -p "$E2E_BUILD"
        gcc -static -O2 -o "$E2E_BUILD/rmem.tmp" "$E2E_DIR/rmem.c" && mv "$E2E_BUILD/rmem.tmp" "$E2E_BUILD/rmem"
    fi
    echo "$E2E_BUILD/rmem"
}

# build_initramfs OUT GUEST_BIN INIT_SCRIPT [EXTRA...]
#   GUEST_BIN: static binary installed as /bin/<basename> (GUEST_BIN=/bin/<basename> in the
#              guest's /etc/e2e.env); "" or "-" for none.
#   INIT_SCRIPT: becomes /init (a busybox sh script; may source /lib/e2e.sh).
#   EXTRA: SRC or SRC:DEST (DEST absolute inside the guest; default /SRC's basename in /).
# Contents: busybox-static with applet links, /lib/e2e.sh (guest-lib.sh), the kernel
# modules in /lib/modules (+ order), qemu-ga with its libraries and loader.
build_initramfs() {
    local out=$1 gbin=$2 init=$3; shift 3
    local root base=$E2E_TMP/initramfs-base
    # the invariant part is assembled once per run
    if [ ! -e "$base/.done" ]; then
        rm -rf "$base"; mkdir -p "$base"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,etc,proc,sys,dev,tmp,run,var/run}
        cp /bin/busybox "$base/bin/busybox"
        local a
        for a in $("$base/bin/busybox" --list); do
            [ "$a" = busybox ] || ln -sf busybox "$base/bin/$a"
        done
        cp "$E2E_MODULES"/*.ko "$base/lib/modules/"
        cp "$E2E_MODULES/../modules.order" "$base/lib/modules/order" 2>/dev/null || true
        cp /usr/sbin/qemu-ga "$base/usr/sbin/qemu-ga"
        local lib
        for lib in $(ldd /usr/sbin/qemu-ga | grep -oE '/[^ ]+'); do
            mkdir -p "$base$(dirname "$lib")"; cp -L "$lib" "$base$lib"
        done
        cp "$E2E_DIR/guest-lib.sh" "$base/lib/e2e.sh"
        e2e_rmem >/dev/null && cp "$E2E_BUILD/rmem" "$base/bin/rmem"
        touch "$base/.done"
    fi
    root=$(mktemp -d "$E2E_TMP/initramfs.XXXXXX")
    cp -a "$base/." "$root/"; rm -f "$root/.done"
    install -m 755 "$init" "$root/init"
    : > "$root/etc/e2e.env"
    if [ -n "$gbin" ] && [ "$gbin" != - ]; then
        [ -x "$gbin" ] || { e2e_log "guest binary $gbin missing"; return 1; }
        install -m 755 "$gbin" "$root/bin/$(basename "$gbin")"
        echo "GUEST_BIN=/bin/$(basename "$gbin")" >> "$root/etc/e2e.env"
    fi
    local x src dst
    for x in "$@"; do
        src=${x%%:*}; dst=${x#*:}; [ "$dst" = "$x" ] && dst=/$(basename "$src")
        mkdir -p "$root$(dirname "$dst")"; cp -L "$src" "$root$dst"
    done
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$root"
}

# ---------------------------------------------------------------- VMs
# boot_vm NAME MODE INITRD [options] [-- KERNEL_ARGS...]
#   MODE: plain | doorbell | none
#   options: --size S      shared memory size (default 4M; power of two)
#            --shm PATH    plain: backing file (default /dev/shm/NAME; removed at exit)
#            --sock PATH   doorbell: ivshmem server socket (required for doorbell)
#            --vectors N   doorbell: MSI-X vectors (default 2)
#            --master      the ivshmem device with master=on (migratable; doorbell: the
#                          server must give the VM id 0, `serve --vm-socket`)
#            --vserial SOCK  add virtio-serial with port org.qemu.guest_agent.0 on a
#                          server=on,wait=off UNIX socket SOCK (for qemu-ga in the guest)
#            --qemu ARG    extra QEMU argument (repeatable)
#   KERNEL_ARGS: test parameters for /init (read them with `param` from /lib/e2e.sh,
#   e.g. e2e.nonce=0x1234).
# Runs QEMU in the background; serial log $E2E_TMP/NAME.serial, QEMU's own output
# $E2E_TMP/NAME.qemu.log. Sets VM_PID and prints the pid.
boot_vm() {
    local name=$1 mode=$2 initrd=$3; shift 3
    local size=4M shm=/dev/shm/$name sock='' vectors=2 vserial='' extra=() kargs=() master=''
    while [ $# -gt 0 ]; do
        case $1 in
            --size) size=$2; shift 2 ;;
            --shm) shm=$2; shift 2 ;;
            --sock) sock=$2; shift 2 ;;
            --vectors) vectors=$2; shift 2 ;;
            --master) master=,master=on; shift ;;
            --vserial) vserial=$2; shift 2 ;;
            --qemu) extra+=("$2"); shift 2 ;;
            --) shift; kargs=("$@"); break ;;
            *) e2e_log "boot_vm: unknown option $1"; return 2 ;;
        esac
    done
    local machine=q35 append="console=ttyS0 panic=-1 $E2E_KERNEL_ARGS"
    local accel; kvm_works && accel=kvm || accel=tcg
    local args=(-accel "$accel")
    case $mode in
        plain)
            echo "$shm" >> "$E2E_TMP/shm-files"
            args+=(-object "memory-backend-file,id=ivmem,share=on,mem-path=$shm,size=$size"
                   -device "ivshmem-plain,memdev=ivmem$master") ;;
        doorbell)
            [ -n "$sock" ] || { e2e_log "boot_vm: doorbell needs --sock"; return 2; }
            [ "$accel" = kvm ] && machine=q35,kernel-irqchip=split
            args+=(-device intel-iommu,intremap=on
                   -chardev "socket,path=$sock,id=ivs"
                   -device "ivshmem-doorbell,chardev=ivs,vectors=$vectors$master")
            # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer test
            # can time out, and with interrupt remapping that is a panic ("timer doesn't
            # work through Interrupt-remapped IO-APIC"); the timer itself works.
            append+=" intel_iommu=on iommu=pt no_timer_check" ;;
        none) ;;
        *) e2e_log "boot_vm: unknown mode $mode"; return 2 ;;
    esac
    if [ -n "$vserial" ]; then
        args+=(-device virtio-serial-pci
               -chardev "socket,path=$vserial,server=on,wait=off,id=qga0"
               -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0)
    fi
    [ ${#kargs[@]} -gt 0 ] && append+=" ${kargs[*]}"
    local serial=$E2E_TMP/$name.serial
    rm -f "$serial"
    "$QEMU" -machine "$machine" "${args[@]}" -m "$E2E_VM_MEM" -nodefaults -no-reboot \
        -nographic -serial "file:$serial" -kernel "$E2E_KERNEL" -initrd "$initrd" \
        -append "$append" "${extra[@]}" > "$E2E_TMP/$name.qemu.log" 2>&1 < /dev/null &
    VM_PID=$!
    echo "$VM_PID" > "$E2E_TMP/vm/$name.pid"
    echo "$VM_PID"
}

# vm_serial NAME: path of the VM's serial log.
vm_serial() { echo "$E2E_TMP/$1.serial"; }

# wait_vm NAME TIMEOUT: 0 when the VM powered off within TIMEOUT s; else kills it, 1.
wait_vm() {
    local f=$E2E_TMP/vm/$1.pid pid i
    [ -e "$f" ] || return 0
    pid=$(cat "$f")
    for ((i = 0; i < $2 * 10; i++)); do
        if ! _alive "$pid"; then wait "$pid" 2>/dev/null || true; _vm_done "$1"; return 0; fi
        sleep 0.1
    done
    e2e_log "VM $1 still running after $2 s: killed"
    kill_vm "$1"
    return 1
}

# kill_vm NAME: stop the VM now.
kill_vm() {
    local f=$E2E_TMP/vm/$1.pid
    [ -e "$f" ] || return 0
    _stop_pid "$(cat "$f")" 2
    _vm_done "$1"
}

_vm_done() {
    rm -f "$E2E_TMP/vm/$1.pid"
    if [ -n "${E2E_LOGS:-}" ]; then
        mkdir -p "$E2E_LOGS"
        cp "$E2E_TMP/$1.serial" "$E2E_LOGS/" 2>/dev/null || true
        cp "$E2E_TMP/$1.qemu.log" "$E2E_LOGS/" 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------- results
# e2e_pass NAME / e2e_fail NAME REASON: count one host-side result.
e2e_pass() { E2E_PASSED=$((E2E_PASSED + 1)); echo "PASS $1"; }
e2e_fail() { E2E_FAILED=$((E2E_FAILED + 1)); echo "FAIL $1: $2"; }
# e2e_check NAME CMD...: PASS when CMD succeeds, else FAIL with CMD in the reason.
e2e_check() { local n=$1; shift; if "$@"; then e2e_pass "$n"; else e2e_fail "$n" "check failed: $*"; fi; }

# collect_results VM [EXPECTED_CASE...]: count the guest's `PASS case` / `FAIL case: why`
# lines from the VM's serial log as VM/case. Each expected case with no line is a
# failure, and so is a log with no result at all. On any failure the log's tail is shown.
collect_results() {
    local vm=$1; shift
    collect_file "$vm" "$E2E_TMP/$vm.serial" "$@"
    [ "$_collect_bad" -eq 0 ] || { echo "---- $vm QEMU output ----"; tail -n 10 "$E2E_TMP/$vm.qemu.log" 2>/dev/null || true; echo "----"; }
}

# collect_file LABEL FILE [EXPECTED_CASE...]: as collect_results, for any log (e.g. a host
# program's), counted as LABEL/case.
collect_file() {
    local vm=$1 serial=$2; shift 2
    local line n=0 bad=0 c
    local seen=" "
    while IFS= read -r line; do
        line=${line%$'\r'}
        case $line in
            "PASS "*) c=${line#PASS }; e2e_pass "$vm/$c"; seen+="$c "; n=$((n + 1)) ;;
            "FAIL "*) c=${line#FAIL }; e2e_fail "$vm/${c%%:*}" "${c#*: }"; seen+="${c%%:*} "; n=$((n + 1)); bad=1 ;;
        esac
    done < <(sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' "$serial" 2>/dev/null | grep -aE '^(PASS|FAIL) ' || true)
    for c in "$@"; do
        case $seen in *" $c "*) ;; *) e2e_fail "$vm/$c" "no result in $(basename "$serial")"; bad=1 ;; esac
    done
    if [ "$n" -eq 0 ] && [ $# -eq 0 ]; then e2e_fail "$vm" "no result lines in $(basename "$serial")"; bad=1; fi
    if [ "$bad" -ne 0 ]; then
        echo "---- $vm: $(basename "$serial") (tail) ----"; tail -n 40 "$serial" 2>/dev/null | tr -d '\r' || true
        echo "----"
    fi
    _collect_bad=$bad
}

# wait_for_line FILE REGEX TIMEOUT [VM]: 0 once a line of FILE matches REGEX (grep -E);
# 1 after TIMEOUT s, or at once when VM is given and has stopped.
wait_for_line() {
    local i vmf=${4:+$E2E_TMP/vm/$4.pid}
    for ((i = 0; i < $3 * 10; i++)); do
        grep -aqE "$2" "$1" 2>/dev/null && return 0
        if [ -n "$vmf" ] && ! { [ -e "$vmf" ] && _alive "$(cat "$vmf")"; }; then
            grep -aqE "$2" "$1" 2>/dev/null; return
        fi
        sleep 0.1
    done
    return 1
}

# e2e_summary: prints `N passed, M failed`; returns 0 only when M is 0.
e2e_summary() {
    echo "$E2E_PASSED passed, $E2E_FAILED failed"
    [ "$E2E_FAILED" -eq 0 ]
}

# ---------------------------------------------------------------- shared memory helpers
# mem_put32 FILE OFFSET VALUE / mem_get32 FILE OFFSET (little-endian u32, hex out 0x...)
mem_put32() {
    local v=$(( $3 & 0xffffffff ))
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))" \
        | dd of="$1" bs=1 seek="$(($2))" conv=notrunc status=none
}
mem_get32() {
    local b
    b=$(od -An -tu1 -j "$(($2))" -N4 "$1" | tr -s ' ' | sed 's/^ //')
    set -- $b
    [ $# -eq 4 ] || { echo ""; return 1; }
    printf '0x%08x\n' $(( $1 | $2 << 8 | $3 << 16 | $4 << 24 ))
}
# rand32: a random u32 as 0x........
rand32() { od -An -tx4 -N4 /dev/urandom | tr -d ' \n' | sed 's/^/0x/'; echo; }

# ---------------------------------------------------------------- qemu-ga
# qga_ping SOCK TIMEOUT: talk to the guest agent on a virtio-serial chardev socket:
# guest-sync-delimited (after a 0xFF resync byte), then guest-ping. 0 on success.
qga_ping() {
    # in the background + wait, so that a signal to the suite is handled at once
    local pid rc=0
    _qga_ping_py "$@" & pid=$!
    echo "$pid" > "$E2E_TMP/pids/qga_ping.pid"
    wait "$pid" || rc=$?
    rm -f "$E2E_TMP/pids/qga_ping.pid"
    return $rc
}
_qga_ping_py() { # only run in the background: exec replaces the subshell, so the pid is python's
    exec python3 - "$1" "$2" <<'PY'
import json, socket, sys, time, random
path, deadline = sys.argv[1], time.time() + float(sys.argv[2])
def attempt():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(path)
    buf = b""
    try:
        nid = random.randint(1, 1 << 30)
        s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": nid}}).encode() + b"\n")
        end = time.time() + 2
        while time.time() < end:
            buf += s.recv(4096)
            # the reply starts with 0xFF; discard everything before the reply carrying nid
            for line in buf.replace(b"\xff", b"\n").split(b"\n"):
                try:
                    if json.loads(line).get("return") == nid:
                        s.sendall(b'{"execute":"guest-ping"}\n')
                        rest = b""
                        while b"\n" not in rest:
                            rest += s.recv(4096)
                        return json.loads(rest.split(b"\n")[0]).get("return") == {}
                except ValueError:
                    pass
    except (socket.timeout, OSError):
        return False
    finally:
        s.close()
    return False
while time.time() < deadline:
    try:
        if attempt():
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}
