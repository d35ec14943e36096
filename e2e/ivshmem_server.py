#!/usr/bin/env python3
"""Temporary ivshmem server for the e2e suite (stands in for `ivring-host serve`).

Implements the server side of QEMU's ivshmem protocol (see shared IVSHMEM.md): a UNIX
stream socket; to each client, as little-endian int64 messages: version 0, its peer id,
-1 with the shared-memory fd (a sealed memfd), then every existing peer's eventfds
(id + fd, N times), then its own eventfds. Joins and leaves are announced to the others.

Test helpers (not part of the protocol):
  --host-peer        reserve peer id 0 as a "host" peer whose eventfds this server keeps
                     and watches; a guest doorbell to peer 0 logs `RING peer=0 vector=V`.
                     Its id is published as an u32 at --host-id-offset in shared memory.
  --init-file FILE   copy FILE into shared memory at offset 0 before serving.
  --dump FILE        on SIGTERM/SIGINT write the shared memory to FILE, then exit.
  --ready-file FILE  created once the socket listens.
Log lines on stdout: LISTEN, CONNECT peer=N, DISCONNECT peer=N, RING peer=P vector=V count=C.
"""
import argparse
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import sys


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower()
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s, 0)


def log(msg):
    print(msg, flush=True)


class Peer:
    def __init__(self, pid, vectors, sock=None):
        self.id = pid
        self.sock = sock
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.sock is not None:
            self.sock.close()


def send_msg(sock, value, fd=None):
    data = struct.pack("<q", value)
    if fd is None:
        sock.sendall(data)
    else:
        socket.send_fds(sock, [data], [fd])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--size", default="4M")
    ap.add_argument("--vectors", type=int, default=2)
    ap.add_argument("--host-peer", action="store_true")
    ap.add_argument("--host-id-offset", type=lambda s: int(s, 0), default=None)
    ap.add_argument("--init-file")
    ap.add_argument("--dump")
    ap.add_argument("--ready-file")
    a = ap.parse_args()

    size = parse_size(a.size)
    if size <= 0 or size & (size - 1):
        sys.exit("ivshmem_server: --size must be a power of two")
    if not 1 <= a.vectors <= 1024:
        sys.exit("ivshmem_server: --vectors out of range")

    shm = os.memfd_create("ivshmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(shm, size)
    fcntl.fcntl(shm, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mem = mmap.mmap(shm, size)
    if a.init_file:
        with open(a.init_file, "rb") as f:
            data = f.read(size)
        mem[: len(data)] = data

    peers = {}  # id -> Peer
    host = None
    if a.host_peer:
        host = Peer(0, a.vectors)
        peers[0] = host
        if a.host_id_offset is not None:
            mem[a.host_id_offset : a.host_id_offset + 4] = struct.pack("<I", 0)
    next_id = 1 if a.host_peer else 0

    try:
        os.unlink(a.socket)
    except FileNotFoundError:
        pass
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(a.socket)
    lsock.listen(16)

    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"LISTEN socket={a.socket} size={size} vectors={a.vectors}")
    if a.ready_file:
        open(a.ready_file, "w").close()

    def new_id():
        nonlocal next_id
        for _ in range(65536):
            pid = next_id
            next_id = (next_id + 1) % 65536
            if pid not in peers:
                return pid
        return None

    def drop(peer):
        log(f"DISCONNECT peer={peer.id}")
        del peers[peer.id]
        peer.close()
        for other in list(peers.values()):
            if other.sock is not None:
                try:
                    send_msg(other.sock, peer.id)
                except OSError:
                    pass

    while not stop:
        rl = [lsock] + [p.sock for p in peers.values() if p.sock is not None]
        host_fds = {fd: v for v, fd in enumerate(host.fds)} if host else {}
        try:
            ready, _, _ = select.select(rl + list(host_fds), [], [], 1.0)
        except InterruptedError:
            continue
        for r in ready:
            if r is lsock:
                csock, _ = lsock.accept()
                pid = new_id()
                if pid is None:
                    csock.close()
                    continue
                peer = Peer(pid, a.vectors, csock)
                try:
                    send_msg(csock, 0)          # protocol version
                    send_msg(csock, pid)        # its own id
                    send_msg(csock, -1, shm)    # shared memory
                    for other in peers.values():  # announce the new peer to the others
                        if other.sock is not None:
                            for fd in peer.fds:
                                send_msg(other.sock, pid, fd)
                    for other in peers.values():  # existing peers to the new one
                        for fd in other.fds:
                            send_msg(csock, other.id, fd)
                    for fd in peer.fds:           # its own vectors
                        send_msg(csock, pid, fd)
                except OSError as e:
                    log(f"ERROR peer={pid}: {e}")
                    peer.close()
                    continue
                peers[pid] = peer
                log(f"CONNECT peer={pid}")
            elif isinstance(r, int):
                try:
                    count = os.eventfd_read(r)
                except BlockingIOError:
                    continue
                log(f"RING peer=0 vector={host_fds[r]} count={count}")
            else:
                # clients never write: any readability is a disconnect
                for p in list(peers.values()):
                    if p.sock is r:
                        drop(p)
                        break

    if a.dump:
        tmp = a.dump + ".tmp"
        with open(tmp, "wb") as f:
            f.write(mem[:])
        os.replace(tmp, a.dump)
    log("EXIT")
    for p in list(peers.values()):
        p.close()
    lsock.close()
    try:
        os.unlink(a.socket)
    except OSError:
        pass


if __name__ == "__main__":
    main()
