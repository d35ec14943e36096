#!/usr/bin/env python3
"""A stand-in for systemd's file descriptor store, for e2e/daemon.sh.

  fdstore_sim.py NOTIFY_SOCK STATUS_FILE -- CMD [ARGS...]

Runs CMD with NOTIFY_SOCKET=NOTIFY_SOCK, keeps every fd it sends with `FDSTORE=1` under
its FDNAME (and forgets the names it withdraws with `FDSTOREREMOVE=1`), and drops a stored
fd that reports POLLHUP, as systemd does. On SIGHUP it kills CMD (SIGKILL: a crash) and
starts it again with the stored fds passed as systemd passes them (fds 3.., LISTEN_FDS,
LISTEN_FDNAMES, LISTEN_PID), like `Restart=on-failure`. Writes `restarts=N stored=M` to
STATUS_FILE after each change. Ends (killing CMD) on SIGTERM.
"""
import os
import select
import signal
import socket
import subprocess
import sys

sock_path, status_file = sys.argv[1], sys.argv[2]
cmd = sys.argv[sys.argv.index("--") + 1:]
try:
    os.unlink(sock_path)
except FileNotFoundError:
    pass
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(sock_path)
stored = []  # (name, fd)
restarts = 0
child = None
wake_r, wake_w = os.pipe()
pending = []


def status():
    with open(status_file + ".tmp", "w") as f:
        f.write(f"restarts={restarts} stored={len(stored)}\n")
    os.replace(status_file + ".tmp", status_file)


def start():
    global child
    n = len(stored)
    # Above anything the child could otherwise get; moved to 3.. in the child.
    high = [fcntl_dup_high(fd) for _, fd in stored]

    def pre():
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i, inheritable=True)

    env = dict(os.environ, NOTIFY_SOCKET=sock_path, LISTEN_FDS=str(n),
               LISTEN_FDNAMES=":".join(name for name, _ in stored))
    # LISTEN_PID must be the daemon's: the shell's pid, which exec keeps.
    # Every other fd of ours is close-on-exec; dup2 makes 3.. inheritable.
    child = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *cmd], env=env,
                             preexec_fn=pre, close_fds=False)
    for fd in high:
        os.close(fd)


def fcntl_dup_high(fd):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000)


signal.signal(signal.SIGHUP, lambda *_: (pending.append("restart"), os.write(wake_w, b"x")))
signal.signal(signal.SIGTERM, lambda *_: (pending.append("stop"), os.write(wake_w, b"x")))
start()
status()
while True:
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    poll.register(wake_r, select.POLLIN)
    for _, fd in stored:
        poll.register(fd, 0)  # POLLHUP and POLLERR are always reported
    try:
        events = poll.poll(1000)
    except InterruptedError:
        events = []
    for fd, ev in events:
        if fd == sock.fileno():
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            fds = []
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.extend(int.from_bytes(cdata[i:i + 4], sys.byteorder)
                               for i in range(0, len(cdata) - len(cdata) % 4, 4))
            lines = data.decode(errors="replace").splitlines()
            name = next((x[7:] for x in lines if x.startswith("FDNAME=")), "stored")
            for f in fds:
                os.set_inheritable(f, False)
            if "FDSTORE=1" in lines:
                stored.extend((name, f) for f in fds)
            else:
                for f in fds:
                    os.close(f)
            if "FDSTOREREMOVE=1" in lines:
                for n, f in [x for x in stored if x[0] == name]:
                    os.close(f)
                stored[:] = [x for x in stored if x[0] != name]
            status()
        elif fd == wake_r:
            os.read(wake_r, 64)
        elif ev & (select.POLLHUP | select.POLLERR):
            for n, f in [x for x in stored if x[1] == fd]:
                os.close(f)
            stored[:] = [x for x in stored if x[1] != fd]
            status()
    while pending:
        what = pending.pop(0)
        child.kill()
        child.wait()
        if what == "stop":
            sys.exit(0)
        restarts += 1
        start()
        status()
