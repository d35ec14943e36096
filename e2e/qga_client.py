#!/usr/bin/env python3
"""A client of the QEMU guest agent's socket for e2e/qga.sh: checks and reset scenarios.

  qga_client.py check SOCK TIMEOUT
      wait (up to TIMEOUT s) for the agent, then guest-ping, guest-info, guest-sync;
      exit 0 when all are answered correctly
  qga_client.py scenario SOCK NAME KIND FAST REPS [--resync]
      KIND a: a client sends half a command and disconnects; KIND b: a client sends
      guest-info and disconnects before the reply. Then a new client sends guest-sync N
      and reads its first reply. FAST 1: reconnect at once. --resync: first bring the
      agent to a clean state (0xFF + guest-sync-delimited), as a careful client would
      before a run. Prints `RESULT NAME ok=.. stale_info=.. stale_other=.. none=.. reps=..`.
  qga_client.py scribble CTL SERIAL SOCK NAME OFFSET VALUE TIMEOUT
      ask the guest (on its control port CTL) to stop its bridge, write the u64 VALUE at
      OFFSET of the shared memory and, once it says `SCRIBBLE NAME ready` in the serial
      log SERIAL, to start a fresh bridge; from then on, connect clients to SOCK until one
      is served (up to TIMEOUT s). The first client served must get exactly its own replies to
      guest-ping and guest-sync N, and nothing else. Prints `RESULT NAME ok=.. first=..
      clients=.. reply=..s` (reply: from the fresh bridge's start to the first correct
      reply), and `why=...` when not ok; exits 0 when ok.

The clients never read what they abandon: on a virtio-serial port that is how the
previous client's reply reaches the next one.
"""
import json
import random
import socket
import sys
import time

LINE_TIMEOUT = 15.0


class Client:
    def __init__(self, path, deadline=None):
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if deadline is None or time.time() > deadline:
                    raise
                time.sleep(0.2)
        self.buf = b""

    def send(self, b):
        self.s.sendall(b)

    def line(self, timeout=LINE_TIMEOUT):
        end = time.time() + timeout
        while b"\n" not in self.buf:
            left = end - time.time()
            if left <= 0:
                return None
            self.s.settimeout(left)
            try:
                d = self.s.recv(65536)
            except OSError:
                return None
            if not d:
                return None
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def close(self):
        self.s.close()


def sync_cmd(n):
    return json.dumps({"execute": "guest-sync", "arguments": {"id": n}}).encode() + b"\n"


def parse(line):
    try:
        return json.loads(line.replace(b"\xff", b""))
    except (ValueError, AttributeError):
        return None


def resync(path, deadline):
    """0xFF + guest-sync-delimited, discarding everything up to its reply."""
    while time.time() < deadline:
        try:
            c = Client(path, deadline)
        except OSError:
            return False
        n = random.randint(1, (1 << 31) - 1)
        c.send(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": n}}).encode() + b"\n")
        while True:
            line = c.line(min(5.0, max(0.1, deadline - time.time())))
            if line is None:
                break
            if b"\xff" in line and (parse(line.rsplit(b"\xff", 1)[1]) or {}).get("return") == n:
                return c
        c.close()
        time.sleep(0.5)
    return None


def check(path, timeout):
    c = resync(path, time.time() + timeout)
    if not c:
        print("check: the agent did not answer a sync within %s s" % timeout)
        return 1
    bad = 0
    c.send(b'{"execute":"guest-ping"}\n')
    r = parse(c.line())
    print("check: guest-ping ->", r)
    bad += r != {"return": {}}
    c.send(b'{"execute":"guest-info"}\n')
    r = parse(c.line()) or {}
    names = [x.get("name") for x in r.get("return", {}).get("supported_commands", [])]
    print("check: guest-info -> version", r.get("return", {}).get("version"), "%d commands" % len(names))
    bad += "guest-ping" not in names
    n = random.randint(1, (1 << 31) - 1)
    c.send(sync_cmd(n))
    r = parse(c.line())
    print("check: guest-sync %d ->" % n, r)
    bad += r != {"return": n}
    c.close()
    return 1 if bad else 0


def scenario(path, name, kind, fast, reps, do_resync):
    if do_resync:
        c = resync(path, time.time() + 30)
        if c:
            c.close()
    tally = {"ok": 0, "stale_info": 0, "stale_other": 0, "none": 0}
    example = None
    t0 = time.time()
    for _ in range(reps):
        n = random.randint(1, (1 << 31) - 1)
        c1 = Client(path)
        c1.send(b'{"execute":"guest-sy' if kind == "a" else b'{"execute":"guest-info"}\n')
        if not fast:
            time.sleep(0.005)
        c1.close()
        if not fast:
            time.sleep(0.005)
        c2 = Client(path)
        c2.send(sync_cmd(n))
        line = c2.line()
        r = parse(line)
        if r == {"return": n}:
            tally["ok"] += 1
        else:
            if line is None:
                tally["none"] += 1
            elif isinstance(r, dict) and isinstance(r.get("return"), dict) and "version" in r["return"]:
                tally["stale_info"] += 1
            else:
                tally["stale_other"] += 1
            if example is None:
                example = (line or b"<nothing>")[:100]
        c2.close()
    print("RESULT %s %s reps=%d time=%.1fs%s" % (
        name, " ".join("%s=%d" % kv for kv in tally.items()), reps, time.time() - t0,
        " first_wrong=%r" % example if example else ""))
    sys.stdout.flush()
    return 0


def wait_marker(serial, start, marker, timeout):
    """The first line of SERIAL after byte START that contains MARKER, or None."""
    end = time.time() + timeout
    while time.time() < end:
        with open(serial, "rb") as f:
            f.seek(start)
            for line in f.read().split(b"\n"):
                if marker in line:
                    return line.strip().decode("utf-8", "replace")
        time.sleep(0.01)
    return None


def served_cleanly(c):
    """guest-ping, then guest-sync N on a fresh client: (None, seconds to the ping reply)
    when nothing was served (EOF or no byte at all), (why, t) when something wrong was
    served, ("", t) when both replies were exactly right and nothing else came."""
    t0 = time.time()
    c.send(b'{"execute":"guest-ping"}\n')
    line = c.line()
    t = time.time() - t0
    if line is None and not c.buf:
        return None, t
    if line is None or b"\xff" in line or parse(line) != {"return": {}}:
        return "guest-ping got %r" % (line if line is not None else c.buf)[:120], t
    n = random.randint(1, (1 << 31) - 1)
    c.send(sync_cmd(n))
    line = c.line()
    if line is None or b"\xff" in line or parse(line) != {"return": n}:
        return "guest-sync %d got %r" % (n, (line if line is not None else c.buf)[:120]), t
    c.s.shutdown(socket.SHUT_WR)
    extra = c.buf
    while True:
        rest = c.line(2.0)
        if rest is None:
            break
        extra += rest + b"\n"
    extra += c.buf
    if extra:
        return "more after the replies: %r" % extra[:120], t
    return "", t


def scribble(ctl, serial, path, name, off, val, timeout):
    with open(serial, "rb") as f:
        start = f.seek(0, 2)
    deadline = time.time() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ctl)
            break
        except OSError:
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    # Connected until the case ends: what QEMU reads from a closed socket may be lost.
    try:
        s.sendall(("scribble %s %s %s\n" % (name, off, val)).encode())
        ready = wait_marker(serial, start, ("SCRIBBLE %s " % name).encode(), 30)
        if ready is None or not ready.endswith(" ready"):
            print("RESULT %s ok=0 why=%r" % (name, ready or "the guest did not answer the scribble command"))
            return 1
        # Timed from here: the guest starts its fresh bridge when it reads this line.
        t0 = time.time()
        s.sendall(b"go\n")
        return fresh_clients(path, name, t0, timeout)
    finally:
        s.close()


def fresh_clients(path, name, t0, timeout):
    clients = 0
    first = None
    while time.time() < t0 + timeout:
        clients += 1
        c = Client(path)
        tc = time.time()
        why, t = served_cleanly(c)
        c.close()
        if why is None:
            first = "EOF" if first is None else first
            time.sleep(0.2)
            continue
        if first is None:
            first = "served" if why == "" else "wrong"
        reply = "%.3fs" % (tc + t - t0) if why == "" else "none"
        ok = why == "" and first == "served"
        print("RESULT %s ok=%d first=%s clients=%d reply=%s%s" % (
            name, ok, first, clients, reply, "" if why == "" else " why=%r" % why))
        return 0 if ok else 1
    print("RESULT %s ok=0 first=%s clients=%d reply=none why='no client served within %ss'" % (
        name, first, clients, timeout))
    return 1


def main(argv):
    if len(argv) >= 3 and argv[0] == "check":
        return check(argv[1], float(argv[2]))
    if len(argv) >= 6 and argv[0] == "scenario":
        return scenario(argv[1], argv[2], argv[3], argv[4] == "1", int(argv[5]), "--resync" in argv)
    if len(argv) >= 8 and argv[0] == "scribble":
        return scribble(*argv[1:7], float(argv[7]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
