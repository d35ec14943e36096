#!/usr/bin/env bash
# One `ivring-host daemon` serving many VMs, simulated on this machine: each VM is a
# guest-role process (`ivring-guest bridge --join DIR/NAME.ivshmem.sock`) relaying to its
# own real qemu-ga on a UNIX socket, and a client per VM pings its agent through the
# daemon's DIR/NAME.qga.sock. See e2e/daemon_scale.py for the phases. Prints p50/p99,
# errors, stale replies, the daemon's CPU, memory and threads at 0, 10 and N VMs idle and
# busy, and the p99 ratio beside a hostile VM; PASS/FAIL per check; last line
# `N passed, M failed`.
#
# Env: DAEMON_SCALE_VMS (100), DAEMON_SCALE_SECS (main run, 60), DAEMON_SCALE_IDLE_SECS
# (10), DAEMON_SCALE_BUSY_SECS (10), DAEMON_SCALE_HOSTILE_SECS (20, each of the two
# phases), DAEMON_SCALE_CHURN (10), DAEMON_SCALE_SIZE (256K), DAEMON_ARGS (extra daemon
# options), HOST_BIN / GUEST_BIN (default: built here), E2E_KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ -z "${HOST_BIN:-}" ] || [ -z "${GUEST_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet --release -p ivring-host -p ivring-guest)
    HOST_BIN=${HOST_BIN:-$ROOT/target/release/ivring-host}
    GUEST_BIN=${GUEST_BIN:-$ROOT/target/release/ivring-guest}
fi
QGA_BIN=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
# The suite asks qemu-ga for `-a` (allowed commands, QEMU 8.0 on): e2e/setup.sh installs
# QEMU 10's from bookworm-backports; Debian's own qemu-ga 7.2 lacks the option.
if [ ! -x "$QGA_BIN" ] || ! "$QGA_BIN" --help 2>&1 | grep -q -- --allow-rpcs; then
    echo "qemu-ga missing or older than 8.0: installing QEMU 10's (e2e/setup.sh)" >&2
    bash "$ROOT/e2e/setup.sh" >/dev/null || true
    QGA_BIN=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
    "$QGA_BIN" --help 2>&1 | grep -q -- --allow-rpcs || {
        echo "FAIL qemu-ga with --allow-rpcs could not be installed: run e2e/setup.sh as root"
        echo "0 passed, 1 failed"
        exit 1
    }
fi
# 2 processes and a qemu-ga per VM, each with a few fds.
ulimit -n 65536 2>/dev/null || true

WORK=$(mktemp -d /tmp/ivring-daemon-scale.XXXXXX)
cleanup() {
    if [ "${E2E_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
export HOST_BIN GUEST_BIN QGA_BIN WORK
python3 "$ROOT/e2e/daemon_scale.py"
