#!/usr/bin/env bash
# ivring against QEMU's own ivshmem tools: contrib/ivshmem-server and contrib/ivshmem-client,
# built from the source of the Debian qemu package that e2e/setup.sh installs (cached in
# e2e/build/qemu-tools/). Run as root (apt-get). Usage:
#   e2e/qemu-tools.sh [--host-bin P] [--guest-bin P] [--build-only]
# Cases: QEMU's server (-M shm object and -m file, 0/1/2 vectors) with ivring joining in
# both roles, and its memory truncated under them; `ivring-host serve` with QEMU's client
# joining, listing, ringing, leaving 50 times; QEMU's clients ringing ivring peers and
# leaving while their sessions run.
# QT_CASES picks cases (qemu_server serve_qemu_client qemu_client_rings_ivring).
# Takes about 15 s, plus about 10 s to build the QEMU tools the first time.
# Last line: `N passed, M failed`; exit 0 only when M is 0.
set -euo pipefail
E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$E2E_DIR/lib.sh"
ROOT=$(cd "$E2E_DIR/.." && pwd)
TOOLS=$E2E_BUILD/qemu-tools
APT_DIR=$E2E_BUILD/apt-src
export DEBIAN_FRONTEND=noninteractive

HOST_BIN=${HOST_BIN:-}
GUEST_BIN=${GUEST_BIN:-}
build_only=0
while [ $# -gt 0 ]; do
    case $1 in
        --host-bin) HOST_BIN=$2; shift 2 ;;
        --guest-bin) GUEST_BIN=$2; shift 2 ;;
        --build-only) build_only=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "qemu-tools: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
log() { echo "qemu-tools: $*" >&2; }

# ---------------------------------------------------------------- private apt source
# deb and deb-src entries for the suites of /etc/apt/sources.list.d/debian.sources plus
# bookworm-backports, in e2e/build/apt-src/ (nothing under /etc/apt changes).
APT_OPTS=()
apt_private() {
    local src=/etc/apt/sources.list.d/debian.sources
    [ -r "$src" ] || { log "$src missing"; exit 1; }
    mkdir -p "$APT_DIR/lists/partial"
    awk '
    function flush(   i, j, k, nu, ns, u, s, opt, t) {
        if (uris == "") return
        nu = split(uris, u, " "); ns = split(suites, s, " ")
        opt = (key != "") ? " [signed-by=" key "]" : ""
        for (k = 1; k <= 2; k++) {
            t = (k == 1) ? "deb" : "deb-src"
            for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) {
                print t opt " " u[i] " " s[j] " " comps
                if (s[j] == "bookworm") print t opt " " u[i] " bookworm-backports " comps
            }
        }
        uris = ""; suites = ""; comps = ""; key = ""
    }
    /^[[:space:]]*$/ { flush(); next }
    /^[[:space:]]*#/ { next }
    /^URIs:/       { sub(/^URIs:[[:space:]]*/, ""); uris = $0 }
    /^Suites:/     { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
    /^Components:/ { sub(/^Components:[[:space:]]*/, ""); comps = $0 }
    /^Signed-By:/  { sub(/^Signed-By:[[:space:]]*/, ""); key = $0 }
    END { flush() }' "$src" | sort -u > "$APT_DIR/sources.list"
    APT_OPTS=(-o "Dir::Etc::sourcelist=$APT_DIR/sources.list" -o "Dir::Etc::sourceparts=-"
              -o "Dir::State::lists=$APT_DIR/lists"
              -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
    if [ -z "$(find "$APT_DIR/lists" -maxdepth 1 -name '*_Sources*' -mmin -1440 2>/dev/null | head -1)" ]; then
        log "apt-get update (private list with deb-src)"
        apt-get "${APT_OPTS[@]}" -qq update
    fi
}

# ---------------------------------------------------------------- the build
# The QEMU source version: that of the installed QEMU (e2e/setup.sh), else backports'.
qemu_source_version() {
    local p v
    for p in qemu-system-x86 qemu-utils; do
        v=$(dpkg-query -W -f='${Status} ${source:Version}' "$p" 2>/dev/null | sed -n 's/^install ok installed //p')
        [ -n "$v" ] && { echo "$v"; return; }
    done
    apt-cache "${APT_OPTS[@]}" showsrc qemu | sed -n 's/^Version: //p' | sort -V | tail -1
}

# What ivshmem-server needs of QEMU's util library; --gc-sections drops the rest.
SERVER_SRCS="contrib/ivshmem-server/ivshmem-server.c contrib/ivshmem-server/main.c
  util/event_notifier-posix.c util/cutils.c util/qemu-option.c util/error.c util/osdep.c
  util/oslib-posix.c util/error-report.c util/id.c util/host-utils.c util/int128.c
  qobject/qdict.c qobject/qbool.c qobject/qnum.c qobject/qstring.c qobject/qobject.c
  qobject/qlist.c qobject/qnull.c qapi/qapi-util.c
  stubs/fdset.c stubs/error-printf.c stubs/monitor-core.c"
CLIENT_SRCS="contrib/ivshmem-client/ivshmem-client.c contrib/ivshmem-client/main.c"

build_tools() {
    apt_private
    local ver stamp
    ver=$(qemu_source_version)
    [ -n "$ver" ] || { log "no qemu source package found"; exit 1; }
    stamp="qemu $ver; $(echo "$SERVER_SRCS $CLIENT_SRCS" | md5sum | cut -c1-8)"
    if [ -x "$TOOLS/ivshmem-server" ] && [ -x "$TOOLS/ivshmem-client" ] \
       && [ "$(cat "$TOOLS/.stamp" 2>/dev/null)" = "$stamp" ]; then
        log "cached: $stamp"
        return
    fi
    local t0=$SECONDS need=() p
    for p in libglib2.0-dev pkg-config xz-utils; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get "${APT_OPTS[@]}" -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 \
            install "${need[@]}" > "$E2E_BUILD/qemu-tools-apt.log" 2>&1 \
            || { tail -20 "$E2E_BUILD/qemu-tools-apt.log" >&2; exit 1; }
    fi
    # Only the upstream tarball: Debian's patches do not touch these programs.
    local work=$E2E_BUILD/qemu-tools.tmp uri file size hash
    rm -rf "$work"; mkdir -p "$work/gen/qapi" "$work/gen/trace"
    # (from $work: apt leaves out files already in the current directory)
    read -r uri file size hash < <(cd "$work" && apt-get "${APT_OPTS[@]}" source --print-uris -qq "qemu=$ver" \
        | grep "\.orig\.tar\." | head -1 | tr -d "'")
    [ -n "${uri:-}" ] || { log "qemu $ver: no upstream tarball listed"; exit 1; }
    log "qemu $ver: downloading $file ($((size >> 20)) MiB)"
    /usr/lib/apt/apt-helper -o APT::Sandbox::User=root -qq download-file "$uri" "$work/$file" "$hash" >/dev/null
    local top
    top=$(tar -tf "$work/$file" 2>/dev/null | head -1 | cut -d/ -f1 || true)
    tar -xf "$work/$file" -C "$work" "$top/contrib/ivshmem-server" "$top/contrib/ivshmem-client" \
        "$top/include" "$top/util" "$top/qapi" "$top/qobject" "$top/stubs" "$top/trace" \
        "$top/monitor" "$top/host/include" "$top/linux-headers" "$top/scripts"
    rm -f "$work/$file"
    local src=$work/$top gen=$work/gen
    # What QEMU's configure would generate, cut down to what these files read.
    cat > "$gen/config-host.h" <<EOF
#define CONFIG_LINUX 1
#define CONFIG_POSIX 1
#define CONFIG_IOVEC 1
#define CONFIG_EVENTFD 1
#define HOST_X86_64 1
#define QEMU_VERSION "$ver"
#define CONFIG_PREFIX "/usr/local"
#define CONFIG_BINDIR "/usr/local/bin"
#define CONFIG_QEMU_HELPERDIR "/usr/local/libexec"
#define CONFIG_QEMU_LOCALSTATEDIR "/var"
EOF
    : > "$gen/config-poison.h"
    (cd "$src" && python3 scripts/qapi-gen.py -o "$gen/qapi" -b qapi/qapi-schema.json \
        && python3 scripts/tracetool.py --backends=nop --group=util --format=h \
            util/trace-events "$gen/trace/trace-util.h") > "$work/gen.log" 2>&1 \
        || { tail -20 "$work/gen.log" >&2; exit 1; }
    local cflags
    cflags="-I$gen -I$src -I$src/include -I$src/host/include/x86_64 -I$src/host/include/generic
        -I$src/linux-headers -I$src/util $(pkg-config --cflags glib-2.0) -D_GNU_SOURCE
        -std=gnu11 -O1 -w -ffunction-sections -fdata-sections"
    mkdir -p "$work/obj"
    # shellcheck disable=SC2086
    printf '%s\n' $SERVER_SRCS $CLIENT_SRCS | xargs -P "$(nproc)" -I{} sh -c \
        'gcc -c $1 -o "$2/obj/$(echo "$3" | tr / _).o" "$4/$3" || exit 255' _ "$cflags" "$work" {} "$src" \
        || { log "compiling failed"; exit 1; }
    local objs=() f
    for f in $SERVER_SRCS; do objs+=("$work/obj/$(echo "$f" | tr / _).o"); done
    # shellcheck disable=SC2046
    gcc -Wl,--gc-sections -o "$work/ivshmem-server" "${objs[@]}" $(pkg-config --libs glib-2.0)
    objs=()
    for f in $CLIENT_SRCS; do objs+=("$work/obj/$(echo "$f" | tr / _).o"); done
    # shellcheck disable=SC2046
    gcc -Wl,--gc-sections -o "$work/ivshmem-client" "${objs[@]}" $(pkg-config --libs glib-2.0)
    rm -rf "$TOOLS"; mkdir -p "$TOOLS"
    mv "$work/ivshmem-server" "$work/ivshmem-client" "$TOOLS/"
    echo "$stamp" > "$TOOLS/.stamp"
    rm -rf "$work"
    log "built ivshmem-server and ivshmem-client of qemu $ver in $((SECONDS - t0)) s"
}

[ "$(id -u)" = 0 ] || { log "must run as root (apt-get)"; exit 2; }
mkdir -p "$E2E_BUILD"
build_tools
[ "$build_only" = 0 ] || exit 0

# ---------------------------------------------------------------- the ivring binaries
if [ -z "$HOST_BIN" ] || [ -z "$GUEST_BIN" ]; then
    log "building ivring-host and ivring-guest"
    (cd "$ROOT" && cargo build --release -q -p ivring-host -p ivring-guest)
    target=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    HOST_BIN=${HOST_BIN:-$target/release/ivring-host}
    GUEST_BIN=${GUEST_BIN:-$target/release/ivring-guest}
fi
SERVER=$TOOLS/ivshmem-server
CLIENT=$TOOLS/ivshmem-client

E2E_TMP=$(mktemp -d /tmp/ivring-qemu-tools.XXXXXX)
mkdir -p "$E2E_TMP/pids" "$E2E_TMP/vm"
: > "$E2E_TMP/shm-files"
trap 'e2e_cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_line FILE PATTERN SECONDS: polls every 20 ms for an extended regex in FILE.
wait_line() {
    local i
    for ((i = 0; i < $3 * 50; i++)); do
        grep -aqE "$2" "$1" 2>/dev/null && return 0
        sleep 0.02
    done
    return 1
}

# show_tail NAME...: the end of helper logs, after a failure.
show_tail() {
    local n
    for n in "$@"; do echo "---- $n ----"; tail -n 15 "$E2E_TMP/$n.log" 2>/dev/null || true; done
    echo "----"
}

# QEMU's client, its stdin on a FIFO held open by fd QC_FD, unbuffered stdout to NAME.log.
# qc_start NAME SOCK: sets QC_FD; returns once the client is connected.
qc_start() {
    rm -f "$E2E_TMP/$1.in" "$E2E_TMP/$1.log"; mkfifo "$E2E_TMP/$1.in"
    e2e_spawn "$1" sh -c 'exec stdbuf -o0 "$1" -S "$2" < "$3"' _ "$CLIENT" "$2" "$E2E_TMP/$1.in"
    exec {QC_FD}> "$E2E_TMP/$1.in"
    wait_line "$E2E_TMP/$1.log" 'listen on server socket' 5
}
# qc_stop NAME FD: stops it (it leaves the server) and closes its stdin.
qc_stop() {
    e2e_stop "$1"
    eval "exec $2>&-"
}
# qc_id NAME: its own peer id, from a `dump`.
qc_id() {
    local fd=$2
    echo dump >&"$fd"
    wait_line "$E2E_TMP/$1.log" 'our_id = [0-9]+' 5 || return 1
    sed -n 's/.*our_id = \([0-9]*\).*/\1/p' "$E2E_TMP/$1.log" | tail -1
}

# ---------------------------------------------------------------- QEMU's server, ivring joining
# case_qemu_server M|m VECTORS: ivring-host check (host role) and ivring-guest check (guest
# role) joined to QEMU's server, the exchange with checksums both ways; readers blocking
# so that only the doorbell wakes them (vectors > 0), or polling (0 vectors).
case_qemu_server() {
    local mode=$1 vec=$2 name=qs-$1$2 sock mem rc grc block=()
    sock=$E2E_TMP/$name.sock
    if [ "$mode" = M ]; then
        mem=(-M "/ivring-qt-$$-$vec"); echo "/dev/shm/ivring-qt-$$-$vec" >> "$E2E_TMP/shm-files"
    else
        mkdir -p "$E2E_TMP/$name.dir"; mem=(-m "$E2E_TMP/$name.dir")
    fi
    e2e_spawn "$name-server" "$SERVER" -F -v -S "$sock" "${mem[@]}" -l 1M -n "$vec"
    if ! wait_for_file "$sock" 5; then
        e2e_fail "$name/server-up" "no socket"; show_tail "$name-server"; return
    fi
    local out
    out=$("$HOST_BIN" check --join "$sock" --timeout 2 2>&1) && rc=0 || rc=$?
    if [ "$rc" != 0 ] && grep -q -- '--allow-unsealed' <<< "$out"; then
        e2e_pass "$name/refused-without-allow-unsealed"
    else e2e_fail "$name/refused-without-allow-unsealed" "exit $rc: $out"; fi

    [ "$vec" -gt 0 ] && block=(--block)
    e2e_spawn "$name-guest" "$GUEST_BIN" check --join "$sock" --allow-unsealed \
        --bytes 300000 --latency 0.5 --timeout 30 "${block[@]}"
    "$HOST_BIN" check --join "$sock" --allow-unsealed --bytes 300000 --latency 0.5 \
        --timeout 30 "${block[@]}" > "$E2E_TMP/$name-host.log" 2>&1 && rc=0 || rc=$?
    wait "$(cat "$E2E_TMP/pids/$name-guest.pid")" && grc=0 || grc=$?
    local ok=1 side want
    for side in host guest; do
        if [ "$side" = host ]; then r=$rc; else r=$grc; fi
        if [ "$r" = 0 ] && grep -q '^INFO [0-9]* passed, 0 failed' "$E2E_TMP/$name-$side.log" \
           && ! grep -q '^FAIL' "$E2E_TMP/$name-$side.log"; then
            e2e_pass "$name/$side-exchange"
        else e2e_fail "$name/$side-exchange" "exit $r: $(grep -m3 '^FAIL' "$E2E_TMP/$name-$side.log" | tr '\n' ' ')"; ok=0; fi
    done
    if [ "$vec" = 0 ]; then want='^INFO polling: the ivshmem server gives no doorbell vectors'
    else want="^INFO interrupts: $vec eventfd vector"; fi
    if grep -qE "$want" "$E2E_TMP/$name-host.log" && grep -qE "$want" "$E2E_TMP/$name-guest.log"; then
        e2e_pass "$name/wake-mode"
    else e2e_fail "$name/wake-mode" "expected '$want'"; ok=0; fi
    if [ "$vec" -gt 0 ]; then
        if grep -q '^PASS blocked-reader-woken' "$E2E_TMP/$name-host.log" \
           && grep -q '^PASS blocked-reader-woken' "$E2E_TMP/$name-guest.log"; then
            e2e_pass "$name/doorbell-wakes-blocked-readers"
        else e2e_fail "$name/doorbell-wakes-blocked-readers" "see blocked-reader-woken"; ok=0; fi
    fi
    [ "$ok" = 1 ] || show_tail "$name-host" "$name-guest" "$name-server"
    e2e_stop "$name-server"
}

# case_qemu_server_shrink: the memory of QEMU's server (-M) truncated under two joined ivring
# processes (the link idle but heartbeating): each says so on one line and lives on.
case_qemu_server_shrink() {
    local name=qs-shrink sock shm p ok=1
    sock=$E2E_TMP/$name.sock; shm=/dev/shm/ivring-qt-$$-shrink
    echo "$shm" >> "$E2E_TMP/shm-files"
    e2e_spawn "$name-server" "$SERVER" -F -S "$sock" -M "/ivring-qt-$$-shrink" -l 1M -n 1
    wait_for_file "$sock" 5 || { e2e_fail "$name/server-up" "no socket"; return; }
    e2e_spawn "$name-guest" "$GUEST_BIN" serve --join "$sock" --allow-unsealed
    e2e_spawn "$name-host" "$HOST_BIN" peer --role host --join "$sock" --allow-unsealed
    wait_line "$E2E_TMP/$name-guest.log" 'serving ports' 10 && wait_line "$E2E_TMP/$name-host.log" 'serving ports' 10 \
        || { e2e_fail "$name/joined" "an ivring process did not start"; show_tail "$name-guest" "$name-host"; return; }
    sleep 0.5
    truncate -s 0 "$shm"
    for p in guest host; do
        if wait_line "$E2E_TMP/$name-$p.log" 'the shared memory was shrunk under this process' 10 \
           && sleep 0.3 && _alive "$(cat "$E2E_TMP/pids/$name-$p.pid")"; then
            e2e_pass "$name/$p-reports-and-lives-on"
        else e2e_fail "$name/$p-reports-and-lives-on" "no report, or it died"; ok=0; fi
    done
    [ "$ok" = 1 ] || show_tail "$name-guest" "$name-host"
    e2e_stop "$name-guest"; e2e_stop "$name-host"; e2e_stop "$name-server"
}

# ---------------------------------------------------------------- ivring's server, QEMU's client
# QEMU's client joins `ivring-host serve`, lists the peers (a long-lived QEMU client and an
# ivring peer), rings the long-lived client (which must report it), and leaves (which the
# long-lived client must hear of: ringing the gone id then finds no such peer), 50 times.
case_serve_qemu_client() {
    local sock=$E2E_TMP/serve.sock i b a fdb listed=0 rung=0 left=0 bad=""
    e2e_spawn serve "$HOST_BIN" serve --socket "$sock" --size 1M --vectors 2 --max-peers 8
    wait_for_file "$sock" 5 || { e2e_fail serve-qemu-client/server-up "no socket"; show_tail serve; return; }
    e2e_spawn serve-peer "$HOST_BIN" peer --role guest --join "$sock"
    qc_start qc-b "$sock" || { e2e_fail serve-qemu-client/join "QEMU's client did not connect"; show_tail qc-b serve; return; }
    fdb=$QC_FD
    b=$(qc_id qc-b "$fdb") || { e2e_fail serve-qemu-client/join "no dump"; show_tail qc-b; return; }
    for ((i = 1; i <= 50; i++)); do
        if ! qc_start qc-a "$sock"; then bad="join $i"; break; fi
        if ! a=$(qc_id qc-a "$QC_FD"); then bad="dump $i"; break; fi
        # Its peers: the long-lived client and the ivring peer, each with 2 vectors.
        if [ "$(grep -c 'peer_id = ' "$E2E_TMP/qc-a.log")" = 2 ] \
           && grep -qE "peer_id = $b\$" "$E2E_TMP/qc-a.log" \
           && [ "$(grep -c 'vector [01] is enabled' "$E2E_TMP/qc-a.log")" = 6 ]; then
            listed=$((listed + 1))
        fi
        # The long-lived client reports each ring of its own vector 0 (naming itself).
        local k n0
        n0=$(grep -c 'receive notification' "$E2E_TMP/qc-b.log" || true)
        echo "int $b 0" >&"$QC_FD"
        for ((k = 0; k < 250; k++)); do
            if [ "$(grep -c 'receive notification' "$E2E_TMP/qc-b.log" || true)" -gt "$n0" ]; then
                rung=$((rung + 1)); break
            fi
            sleep 0.02
        done
        qc_stop qc-a "$QC_FD"
        for ((k = 0; k < 100; k++)); do
            echo "int $a 0" >&"$fdb"
            if grep -qE "cannot find peer_id = $a\$" "$E2E_TMP/qc-b.log"; then left=$((left + 1)); break; fi
            sleep 0.02
        done
    done
    [ -z "$bad" ] || e2e_fail serve-qemu-client/loop "stopped at $bad"
    local t
    for t in listed rung left; do
        if [ "${!t}" = 50 ]; then e2e_pass "serve-qemu-client/$t-50-times"
        else e2e_fail "serve-qemu-client/$t-50-times" "only ${!t} of 50"; fi
    done
    if _alive "$(cat "$E2E_TMP/pids/serve.pid")" && _alive "$(cat "$E2E_TMP/pids/serve-peer.pid")"; then
        e2e_pass serve-qemu-client/server-and-ivring-peer-alive
    else e2e_fail serve-qemu-client/server-and-ivring-peer-alive "one of them died"; fi
    [ "$listed $rung $left" = "50 50 50" ] || show_tail qc-a qc-b serve serve-peer
    qc_stop qc-b "$fdb"
    e2e_stop serve-peer
    e2e_stop serve
}

# ---------------------------------------------------------------- QEMU's clients under load
# An ivring exchange (both roles, readers blocking) over `ivring-host serve` while QEMU's
# clients keep joining, ringing every vector of every peer (`int all`) and leaving.
case_qemu_client_rings_ivring() {
    local sock=$E2E_TMP/busy.sock hp rc grc n=0 seen=0
    e2e_spawn busy "$HOST_BIN" serve --socket "$sock" --size 4M --vectors 1
    wait_for_file "$sock" 5 || { e2e_fail busy/server-up "no socket"; show_tail busy; return; }
    e2e_spawn busy-guest "$GUEST_BIN" check --join "$sock" --bytes 2000000 --latency 2 --block --timeout 60
    "$HOST_BIN" check --join "$sock" --bytes 2000000 --latency 2 --block --timeout 60 \
        > "$E2E_TMP/busy-host.log" 2>&1 &
    hp=$!
    wait_line "$E2E_TMP/busy-host.log" '^PASS link-up' 30 || true
    while _alive "$hp"; do
        qc_start qc-r "$sock" || break
        qc_id qc-r "$QC_FD" > /dev/null || break
        # Counted only if neither ivring side had finished (it prints peer-done before
        # it leaves) when the list was taken.
        if grep -q 'peer-done' "$E2E_TMP/busy-host.log" "$E2E_TMP/busy-guest.log"; then
            qc_stop qc-r "$QC_FD"; break
        fi
        [ "$(grep -c 'peer_id = ' "$E2E_TMP/qc-r.log")" -ge 2 ] && seen=$((seen + 1))
        echo "int all" >&"$QC_FD"
        sleep 0.05
        qc_stop qc-r "$QC_FD"
        n=$((n + 1))
    done
    wait "$hp" && rc=0 || rc=$?
    wait "$(cat "$E2E_TMP/pids/busy-guest.pid")" && grc=0 || grc=$?
    local side r ok=1
    for side in host guest; do
        if [ "$side" = host ]; then r=$rc; else r=$grc; fi
        if [ "$r" = 0 ] && ! grep -q '^FAIL' "$E2E_TMP/busy-$side.log"; then
            e2e_pass "qemu-client-rings-ivring/$side-exchange"
        else e2e_fail "qemu-client-rings-ivring/$side-exchange" "exit $r: $(grep -m3 '^FAIL' "$E2E_TMP/busy-$side.log" | tr '\n' ' ')"; ok=0; fi
    done
    if [ "$n" -ge 5 ] && [ "$seen" = "$n" ]; then
        e2e_pass "qemu-client-rings-ivring/clients-joined-rang-left"
    else e2e_fail "qemu-client-rings-ivring/clients-joined-rang-left" "$n clients, $seen saw both ivring peers"; ok=0; fi
    echo "INFO qemu-client-rings-ivring: $n QEMU clients joined, rang every peer and left during the exchange"
    [ "$ok" = 1 ] || show_tail busy-host busy-guest busy qc-r
    e2e_stop busy
}

t0=$SECONDS
read -r -a cases <<< "${QT_CASES:-qemu_server serve_qemu_client qemu_client_rings_ivring}"
for c in "${cases[@]}"; do
    if [ "$c" = qemu_server ]; then
        for m in M m; do
            for v in 0 1 2; do case_qemu_server "$m" "$v"; done
        done
        case_qemu_server_shrink
    else
        "case_$c"
    fi
done
echo "INFO qemu-tools cases took $((SECONDS - t0)) s"
e2e_summary
