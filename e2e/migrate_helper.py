#!/usr/bin/env python3
"""QMP and guest-agent helpers of e2e/migrate.sh.

  migrate_helper.py qmp SOCK CMD [ARGS_JSON]
      run one QMP command; print its return value as JSON; exit 1 on an error reply
  migrate_helper.py hmp SOCK 'COMMAND LINE'
      run one monitor (HMP) command through QMP; print its output; exit 1 when QEMU
      reports an error in it
  migrate_helper.py migrate SOCK URI TIMEOUT
      migrate to URI and wait for the end; prints `MIGRATED status=.. total_ms=..
      downtime_ms=.. end=UNIX_TIME` (end: when this side saw it completed)
  migrate_helper.py wait-status SOCK STATUS TIMEOUT
      wait until query-status says STATUS (e.g. running)
  migrate_helper.py busy SOCK SECONDS
      through an agent socket (a host bridge): guest-sync N with a fresh N, again and
      again on one connection, each reply checked to be exactly its own, until the
      connection ends or SECONDS pass. Prints `RESULT busy ok=.. replies=.. end=..`
  migrate_helper.py first SOCK T0 TIMEOUT
      fresh clients on SOCK until one is served; the first served must get exactly its
      own guest-ping and guest-sync replies (qga_client.fresh_clients); times from T0
"""
import json
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Qmp:
    def __init__(self, path, timeout=10):
        end = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.time() > end:
                    raise
                time.sleep(0.1)
        self.f = self.s.makefile("rb")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError("%s: %s" % (name, r["error"].get("desc")))
            return r["return"]


def migrate(path, uri, timeout):
    q = Qmp(path)
    q.cmd("migrate", {"uri": uri})
    end = time.time() + timeout
    while time.time() < end:
        st = q.cmd("query-migrate")
        status = st.get("status")
        if status in ("completed", "failed", "cancelled"):
            t = time.time()
            print("MIGRATED status=%s total_ms=%s downtime_ms=%s end=%.3f%s" % (
                status, st.get("total-time"), st.get("downtime"), t,
                " error=%r" % st.get("error-desc") if st.get("error-desc") else ""))
            return 0 if status == "completed" else 1
        time.sleep(0.05)
    print("MIGRATED status=timeout")
    return 1


def busy(path, seconds):
    from qga_client import Client, parse, sync_cmd
    c = Client(path, time.time() + 10)
    end = time.time() + seconds
    replies = 0
    while time.time() < end:
        n = random.randint(1, (1 << 31) - 1)
        try:
            c.send(sync_cmd(n))
        except OSError as e:
            print("RESULT busy ok=1 replies=%d end=%r" % (replies, str(e)))
            return 0
        line = c.line(10.0)
        if line is None:
            print("RESULT busy ok=1 replies=%d end=%s" % (replies, "EOF" if not c.buf else "partial"))
            return 0
        if parse(line) != {"return": n}:
            print("RESULT busy ok=0 replies=%d why=%r" % (replies, line[:120]))
            return 1
        replies += 1
    print("RESULT busy ok=1 replies=%d end=timeout" % replies)
    return 0


def main(argv):
    if len(argv) >= 3 and argv[0] == "qmp":
        print(json.dumps(Qmp(argv[1]).cmd(argv[2], json.loads(argv[3]) if len(argv) > 3 else None)))
        return 0
    if len(argv) == 3 and argv[0] == "hmp":
        out = Qmp(argv[1]).cmd("human-monitor-command", {"command-line": argv[2]})
        print(out, end="")
        return 1 if "rror" in out else 0
    if len(argv) == 4 and argv[0] == "migrate":
        return migrate(argv[1], argv[2], float(argv[3]))
    if len(argv) == 4 and argv[0] == "wait-status":
        q, end = Qmp(argv[1]), time.time() + float(argv[3])
        while time.time() < end:
            if q.cmd("query-status").get("status") == argv[2]:
                return 0
            time.sleep(0.05)
        return 1
    if len(argv) == 3 and argv[0] == "busy":
        return busy(argv[1], float(argv[2]))
    if len(argv) == 4 and argv[0] == "first":
        from qga_client import fresh_clients
        return fresh_clients(argv[1], "first", float(argv[2]), float(argv[3]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, RuntimeError, ValueError) as e:
        print("migrate_helper: %s" % e)
        sys.exit(1)
