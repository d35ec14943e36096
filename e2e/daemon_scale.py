#!/usr/bin/env python3
"""One `ivring-host daemon` serving N simulated VMs (e2e/daemon-scale.sh runs this).

Each VM is `ivring-guest bridge --join DIR/vmI.ivshmem.sock` (a guest-role process
joining the daemon's ivshmem socket as QEMU would) relaying to its own real qemu-ga on a
UNIX socket. One asyncio client per VM talks to DIR/vmI.qga.sock: guest-ping and
guest-sync with a unique id, alternately, reconnecting every few requests (each
connection is a fresh session); a reply that is not the answer to the request just sent
is stale.

Phases: the daemon idle at 0 VMs; 10 VMs idle and busy; N VMs idle; the main run (N
clients for SECS, and meanwhile CHURN guests killed and restarted and CHURN VMs removed
and added again); N VMs idle again; then the hostile case: HOSTILE_SECS with every
client and no hostile VM, then HOSTILE_SECS with a hostile VM among them (a process
joining its own VM's socket, scribbling random words all over the shared memory and
ringing the daemon's doorbell in a loop). The hostile VM is a process of its own at the
lowest CPU priority (nice 19), as a real one is a QEMU whose vCPU its quota confines: what
is measured is what its scribbling and ringing cost the daemon and the other VMs' links,
not the core it burns (and not this script's interpreter lock, which a hostile thread in
the client's process would hold against every client). Prints the figures and PASS/FAIL
lines.
"""

import asyncio
import concurrent.futures
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

HOST = os.environ["HOST_BIN"]
GUEST = os.environ["GUEST_BIN"]
QGA = os.environ.get("QGA_BIN", "qemu-ga")
WORK = os.environ["WORK"]
N = int(os.environ.get("DAEMON_SCALE_VMS", "100"))
SECS = float(os.environ.get("DAEMON_SCALE_SECS", "60"))
IDLE_SECS = float(os.environ.get("DAEMON_SCALE_IDLE_SECS", "10"))
BUSY_SECS = float(os.environ.get("DAEMON_SCALE_BUSY_SECS", "10"))
HOSTILE_SECS = float(os.environ.get("DAEMON_SCALE_HOSTILE_SECS", "20"))
CHURN = int(os.environ.get("DAEMON_SCALE_CHURN", "10"))
SIZE = os.environ.get("DAEMON_SCALE_SIZE", "256K")
DAEMON_ARGS = os.environ.get("DAEMON_ARGS", "").split()
REQS_PER_CONN = 20
TIMEOUT = 10.0
RUN = os.path.join(WORK, "run")

results = []  # (ok, name, detail)


def check(ok, name, detail=""):
    results.append((ok, name, detail))
    print(("PASS " if ok else "FAIL ") + name + (": " + detail if detail else ""), flush=True)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- processes -------------------------------------------------------------------------

procs = []


def spawn(args, logname):
    f = open(os.path.join(WORK, "logs", logname), "ab")
    p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs.append(p)
    return p


def vmctl(*args, check_rc=True):
    r = subprocess.run([HOST, "vm", *args, "--dir", RUN], capture_output=True, text=True)
    if check_rc and r.returncode != 0:
        raise RuntimeError(f"vm {' '.join(args)}: {r.stderr.strip()}")
    return r


def control(req):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(RUN, "control.sock"))
    s.sendall((json.dumps(req) + "\n").encode())
    f = s.makefile("rb")
    ans = json.loads(f.readline())
    s.close()
    return ans


def wait_path(path, secs=10):
    t = time.time() + secs
    while not os.path.exists(path):
        if time.time() > t:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.02)


class Vm:
    def __init__(self, i):
        self.i = i
        self.name = f"vm{i}"
        self.qdir = os.path.join(WORK, "qga", self.name)
        self.qsock = os.path.join(self.qdir, "qga.sock")
        self.qga = None
        self.guest = None
        self.lat = []  # (phase, seconds)
        self.errors = []  # (phase, why)
        self.expected_errors = 0
        self.stale = 0
        self.churning = False
        self.restarted = False  # the churn is over: the next reply ends the window
        self.ok_after_churn = False
        self.paused = False

    def start_qga(self):
        os.makedirs(self.qdir, exist_ok=True)
        try:
            os.unlink(self.qsock)
        except FileNotFoundError:
            pass
        self.qga = spawn(
            [QGA, "-m", "unix-listen", "-p", self.qsock, "-t", self.qdir,
             "-f", os.path.join(self.qdir, "pid"),
             "-a", "guest-sync,guest-sync-delimited,guest-ping,guest-info"],
            f"{self.name}.qga.log")

    def start_guest(self):
        self.guest = spawn(
            [GUEST, "bridge", "--join", os.path.join(RUN, f"{self.name}.ivshmem.sock"),
             "--connect", self.qsock], f"{self.name}.guest.log")

    def add(self):
        vmctl("add", self.name, "--size", SIZE)


# --- measuring the daemon ---------------------------------------------------------------

def task_totals(pid):
    """(CPU ns, context switches) summed over the daemon's threads."""
    ns = 0
    ctx = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                ns += int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        ctx += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ns, ctx


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])  # KiB
            if k == "Threads":
                out[k] = int(v)
    return out


class Meter:
    def __init__(self, pid):
        self.pid = pid

    def start(self):
        self.t0 = time.monotonic()
        self.ns0, self.ctx0 = task_totals(self.pid)

    def stop(self):
        dt = time.monotonic() - self.t0
        ns, ctx = task_totals(self.pid)
        return {"cpu_pct": (ns - self.ns0) / 1e9 / dt * 100, "ctx_per_s": (ctx - self.ctx0) / dt,
                "secs": dt, **mem(self.pid)}


figures = []  # (label, vms, dict)


def record(label, vms, m):
    figures.append((label, vms, m))
    log(f"{label} ({vms} VMs): CPU {m['cpu_pct']:.2f}% of a core, {m['ctx_per_s']:.0f} context "
        f"switches/s, RSS {m['VmRSS'] / 1024:.1f} MiB (anon {m['RssAnon'] / 1024:.1f}, file "
        f"{m['RssFile'] / 1024:.1f}, shmem {m['RssShmem'] / 1024:.1f}), {m['Threads']} threads")


def idle(meter, label, vms):
    meter.start()
    time.sleep(IDLE_SECS)
    record(label, vms, meter.stop())


# --- clients ----------------------------------------------------------------------------

next_id = [random.randrange(1 << 40)]
state = {"phase": "warmup", "stop": False}


async def client(vm):
    while not state["stop"]:
        if vm.paused:
            await asyncio.sleep(0.05)
            continue
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(
                os.path.join(RUN, f"{vm.name}.qga.sock")), TIMEOUT)
            for k in range(REQS_PER_CONN):
                if state["stop"] or vm.paused:
                    break
                if k % 2 == 0:
                    req, want = {"execute": "guest-ping"}, {"return": {}}
                else:
                    next_id[0] += 1
                    n = next_id[0]
                    req = {"execute": "guest-sync", "arguments": {"id": n}}
                    want = {"return": n}
                phase = state["phase"]
                t0 = time.perf_counter()
                w.write((json.dumps(req) + "\n").encode())
                await w.drain()
                line = await asyncio.wait_for(r.readline(), TIMEOUT)
                dt = time.perf_counter() - t0
                if not line:
                    raise ConnectionError("EOF instead of a reply")
                got = json.loads(line)
                if got != want:
                    if isinstance(got.get("return"), int) or got == {"return": {}}:
                        vm.stale += 1
                        raise ConnectionError(f"stale reply {got} to {req}")
                    raise ConnectionError(f"unexpected reply {got} to {req}")
                vm.lat.append((phase, dt))
                if vm.churning and vm.restarted:
                    vm.churning = False
                    vm.ok_after_churn = True
            w.close()
            await w.wait_closed()
        except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as e:
            if w is not None:
                w.close()
            if vm.churning:
                vm.expected_errors += 1
            else:
                vm.errors.append((state["phase"], f"{type(e).__name__}: {e}"))
            await asyncio.sleep(0.2)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def lat_of(vms, phase):
    return [dt for v in vms for (ph, dt) in v.lat if ph == phase]


def summary(vms, phase, label):
    xs = lat_of(vms, phase)
    p50, p99 = pct(xs, 0.50) * 1e3, pct(xs, 0.99) * 1e3
    log(f"{label}: {len(xs)} replies, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return len(xs), p50, p99


# --- the hostile VM ----------------------------------------------------------------------

def hostile(sock_path, secs):
    """Joins the VM's ivshmem socket, then scribbles the memory and rings the daemon."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    fds_by_peer = {}
    s.settimeout(2)
    msgs = []
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(s, 8, 4)
            if not data:
                break
            msgs.append((struct.unpack("<q", data)[0], fds))
    except socket.timeout:
        pass
    # version 0, our id, -1 with the memory, then every peer's vectors (ours last).
    own = msgs[1][0]
    memfd = msgs[2][1][0]
    for val, fds in msgs[3:]:
        if fds:
            fds_by_peer.setdefault(val, []).extend(fds)
    size = os.fstat(memfd).st_size
    m = mmap.mmap(memfd, size)
    bells = [fs[0] for p, fs in fds_by_peer.items() if p != own]
    one = struct.pack("<Q", 1)
    end = time.time() + secs
    n = 0
    rnd = random.Random(7)
    while time.time() < end:
        for _ in range(200):
            off = rnd.randrange(0, size // 8) * 8
            struct.pack_into("<Q", m, off, rnd.getrandbits(64))
            for b in bells:
                os.write(b, one)
            n += 1
    return n


# --- the run ------------------------------------------------------------------------------

def main():
    os.makedirs(os.path.join(WORK, "logs"), exist_ok=True)
    os.makedirs(RUN, exist_ok=True)
    daemon = spawn([HOST, "daemon", "--dir", RUN, *DAEMON_ARGS], "daemon.log")
    wait_path(os.path.join(RUN, "control.sock"))
    meter = Meter(daemon.pid)
    log(f"daemon pid {daemon.pid}; {N} VMs of {SIZE}; main run {SECS:.0f} s")
    idle(meter, "idle", 0)

    vms = [Vm(i) for i in range(1, N + 1)]

    def bring_up(group):
        for v in group:
            v.add()
            v.start_qga()
        for v in group:
            wait_path(v.qsock)
            v.start_guest()
        t = time.time() + 60
        while True:
            up = {x["name"]: x["link_up"] for x in control({"op": "list"})["vms"]}
            if all(up.get(v.name) for v in group):
                break
            if time.time() > t:
                down = [v.name for v in group if not up.get(v.name)]
                raise RuntimeError(f"links not up after 60 s: {down[:10]}")
            time.sleep(0.2)

    loop = asyncio.new_event_loop()

    def run_clients(group, phase, secs, during=None):
        state["phase"] = phase
        state["stop"] = False

        async def go():
            tasks = [asyncio.ensure_future(client(v)) for v in group]
            if during:
                await during()
            else:
                await asyncio.sleep(secs)
            state["stop"] = True
            await asyncio.gather(*tasks)

        loop.run_until_complete(go())

    t = time.time()
    bring_up(vms[:10])
    log(f"10 VMs up in {time.time() - t:.1f} s")
    time.sleep(2)
    idle(meter, "idle", 10)
    meter.start()
    run_clients(vms[:10], "busy10", BUSY_SECS)
    record("busy", 10, meter.stop())
    summary(vms[:10], "busy10", "10 VMs busy")

    t = time.time()
    bring_up(vms[10:])
    log(f"{N} VMs up in {time.time() - t:.1f} s")
    time.sleep(2)
    idle(meter, "idle", N)

    # The main run, with churn in the middle.
    kill_set = vms[:CHURN]
    remove_set = vms[CHURN:2 * CHURN]
    churned = set(v.name for v in kill_set + remove_set)
    others = [v for v in vms if v.name not in churned]
    busy_fig = {}

    async def main_run():
        meter.start()
        await asyncio.sleep(SECS / 3)
        busy_fig["m"] = meter.stop()
        # Kill and restart CHURN guests.
        log(f"killing the guests of {', '.join(v.name for v in kill_set)}")
        for v in kill_set:
            v.churning = True
            v.guest.kill()
        await asyncio.sleep(1)
        for v in kill_set:
            v.guest.wait()
            if v.qga.poll() is not None:  # qemu-ga exits on a reset connection
                v.start_qga()
        await asyncio.sleep(0.3)
        for v in kill_set:
            v.start_guest()
            v.restarted = True
        log("guests restarted")
        await asyncio.sleep(SECS / 6)
        # Remove and add CHURN VMs.
        log(f"removing {', '.join(v.name for v in remove_set)}")
        for v in remove_set:
            v.churning = True
            await loop.run_in_executor(None, vmctl, "remove", v.name)
            v.guest.kill()
        for v in remove_set:
            v.guest.wait()
            if v.qga.poll() is not None:
                v.start_qga()
        for v in remove_set:
            await loop.run_in_executor(None, v.add)
            v.start_guest()
            v.restarted = True
        log("VMs added again")
        await asyncio.sleep(SECS - SECS / 3 - SECS / 6 - 1.3)

    run_clients(vms, "main", SECS, main_run)
    record("busy", N, busy_fig["m"])
    n, p50, p99 = summary(vms, "main", f"main run, {N} VMs, {SECS:.0f} s")
    n_o, p50_o, p99_o = summary(others, "main", f"main run, the {len(others)} VMs not churned")
    errs_others = sum(len(v.errors) for v in others)
    errs_churned = sum(len(v.errors) for v in vms if v.name in churned)
    stale = sum(v.stale for v in vms)
    expected = sum(v.expected_errors for v in vms)
    for v in vms:
        for ph, why in v.errors[:3]:
            log(f"  error {v.name} ({ph}): {why}")
    print(f"RESULT main: vms={N} secs={SECS:.0f} replies={n} p50_ms={p50:.2f} p99_ms={p99:.2f} "
          f"errors={errs_others + errs_churned} stale={stale} "
          f"churned_vm_errors_during_churn={expected}", flush=True)
    check(errs_others == 0, f"{len(others)} VMs not churned: 0 errors", f"{errs_others} errors")
    check(stale == 0, "0 stale replies", f"{stale} stale")
    check(n > 0 and n_o > 0, "replies counted", f"{n} replies, p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    back = [v.name for v in kill_set + remove_set if not v.ok_after_churn]
    check(not back and errs_churned == 0,
          f"{2 * CHURN} churned VMs answer again (guests killed/restarted, VMs removed/added)",
          f"not back: {back}; errors outside their churn window: {errs_churned}")

    time.sleep(2)
    idle(meter, "idle after churn", N)
    m = figures[-1][2]
    check(m["cpu_pct"] < 1.0, f"idle daemon at {N} VMs under 1% of a core",
          f"{m['cpu_pct']:.2f}%, {m['ctx_per_s']:.0f} context switches/s, {m['Threads']} threads")
    base = figures[0][2]
    per_vm = (m["RssAnon"] + m["RssFile"] - base["RssAnon"] - base["RssFile"]) / N
    print(f"RESULT memory: {per_vm:.0f} KiB per VM (RSS without shared memory: anon+file, "
          f"{N} VMs minus 0 VMs); threads {m['Threads']} ({(m['Threads'] - base['Threads']) / N:.2f} "
          f"per VM)", flush=True)
    ls = control({"op": "list"})
    check(m["Threads"] == base["Threads"] and ls.get("keeper_threads") == 0,
          f"the daemon's threads do not grow with the VMs (one thread drives every link)",
          f"{base['Threads']} threads at 0 VMs, {m['Threads']} at {N}; keeper threads "
          f"{ls.get('keeper_threads')}, links driven {ls.get('driven_links')}")

    # Hostile VM.
    run_clients(vms, "calm", HOSTILE_SECS)
    _, _, p99_calm = summary(vms, "calm", f"{N} VMs, no hostile VM, {HOSTILE_SECS:.0f} s")
    vmctl("add", "hostile", "--size", SIZE)
    hostile_sock = os.path.join(RUN, "hostile.ivshmem.sock")
    rings = {}

    async def with_hostile():
        meter.start()
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=1, initializer=os.nice, initargs=(19,)) as pool:
            rings["n"] = await loop.run_in_executor(pool, hostile, hostile_sock, HOSTILE_SECS)
        rings["m"] = meter.stop()

    run_clients(vms, "hostile", HOSTILE_SECS, with_hostile)
    record("hostile", N + 1, rings["m"])
    _, _, p99_host = summary(vms, "hostile", f"{N} VMs beside a hostile VM, {HOSTILE_SECS:.0f} s")
    errs_h = sum(1 for v in vms for ph, _ in v.errors if ph in ("calm", "hostile"))
    ratio = p99_host / p99_calm
    print(f"RESULT hostile: p99 without {p99_calm:.2f} ms, with {p99_host:.2f} ms, ratio "
          f"{ratio:.2f}; hostile scribbles+rings {rings['n']} "
          f"({rings['n'] / HOSTILE_SECS:.0f}/s); errors {errs_h}", flush=True)
    check(ratio < 2.0, "a hostile VM changes the others' p99 by less than 2x", f"ratio {ratio:.2f}")
    check(errs_h == 0, "no errors beside the hostile VM", f"{errs_h} errors")
    hv = [x for x in control({"op": "list"})["vms"] if x["name"] == "hostile"]
    check(daemon.poll() is None and bool(hv), "the daemon survived the hostile VM")
    vmctl("remove", "hostile")

    print("\nFIGURES (daemon process; CPU % of one core; RSS without shared memory = anon+file)")
    print(f"{'state':<18}{'VMs':>5}{'CPU %':>8}{'ctxsw/s':>9}{'RSS MiB':>9}{'anon+file':>10}"
          f"{'shmem':>8}{'threads':>8}")
    for label, n_vms, m in figures:
        print(f"{label:<18}{n_vms:>5}{m['cpu_pct']:>8.2f}{m['ctx_per_s']:>9.0f}"
              f"{m['VmRSS'] / 1024:>9.1f}{(m['RssAnon'] + m['RssFile']) / 1024:>10.1f}"
              f"{m['RssShmem'] / 1024:>8.1f}{m['Threads']:>8}")


def cleanup():
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - reported as a failure
        import traceback
        traceback.print_exc()
        check(False, "the run completed", str(e))
    finally:
        cleanup()
    failed = sum(1 for ok, _, _ in results if not ok)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
