#!/usr/bin/env bash
# Runs every ivring test: unit, property, two-process, hostile-peer, loom models, the
# real-VM suite (QEMU booting a Debian guest kernel), the qemu-ga suite (which also runs
# the operator commands of README.md and docs/QGA.md as written), the suite
# against QEMU's own ivshmem-server and ivshmem-client, and (as root) the Debian packages.
# Installs what it needs from Debian's packages (run as root). Last line: N passed, M failed.
#
#   scripts/test.sh            everything
#   scripts/test.sh --no-vm    skip the QEMU suites
set -uo pipefail
cd "$(dirname "$0")/.."

vm=1
for a in "$@"; do
  case "$a" in
    --no-vm) vm=0 ;;
    *) echo "usage: scripts/test.sh [--no-vm]" >&2; exit 2 ;;
  esac
done

passed=0
failed=0
failures=()
suite() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  if "$@"; then
    passed=$((passed + 1))
    echo "=== $name: ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "=== $name: FAILED ($((SECONDS - t0)) s)"
  fi
}

if [ "$vm" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "the VM suites need root (apt-get, /dev/shm, QEMU): run as root or pass --no-vm" >&2
    failed=$((failed + 1)); failures+=("vm suites (not root)")
    vm=0
  else
    # QEMU, the guest kernel, busybox and qemu-guest-agent (the qemu-ga tests use it too).
    suite "e2e setup" bash e2e/setup.sh
  fi
fi
suite "cargo test" cargo test --workspace --release
# The workspace run has ivring's tokio feature (ivring-tools enables it); mio is alone.
suite "mio sources" cargo test -p ivring --release --features tokio,mio --test mio_sessions
suite "doc tests, all features" cargo test -p ivring --release --features tokio,mio --doc
suite "fuzz findings replayed" cargo test -p ivring --release --features fuzzing \
  --test fuzz_regressions
suite "loom models" env RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 \
  cargo test -p ivring --release --lib --target-dir target/loom loom
# Installs and purges the .debs (dpkg): root only.
if [ "$(id -u)" = 0 ]; then
  suite "Debian packages" bash scripts/packages.sh
fi
if [ "$vm" = 1 ]; then
  if true; then
    suite "e2e VM suite" bash e2e/run.sh
    suite "QEMU's ivshmem-server/client suite" bash e2e/qemu-tools.sh
    for mode in doorbell join plain; do
      suite "qemu-ga VM suite ($mode)" bash e2e/qga.sh --mode "$mode"
    done
    suite "migration and snapshot VM suite" bash e2e/migrate.sh
    suite "daemon VM suite" bash e2e/daemon.sh
    # 100 simulated VMs with real qemu-ga behind one daemon; the main run is 20 s here
    # (the README's figures are from a 60 s run: DAEMON_SCALE_SECS=60).
    suite "daemon scale suite (100 VMs)" env DAEMON_SCALE_SECS="${DAEMON_SCALE_SECS:-20}" \
      DAEMON_SCALE_HOSTILE_SECS="${DAEMON_SCALE_HOSTILE_SECS:-10}" bash e2e/daemon-scale.sh
  fi
fi

[ "$failed" = 0 ] || echo "failed suites: ${failures[*]}"
echo "all suites took $SECONDS s"
echo "suites: $passed passed, $failed failed"
[ "$failed" = 0 ]
