"""Which local process holds the other end of a TCP connection (the destination, when both
ends are on this host), found the way `ss -p` does: /proc/net/tcp{,6} gives the peer socket's
inode, and /proc/PID/fd holds it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket


def _parse(addr: str) -> tuple[str, int]:
    """'0100007F:1F90' (host byte order words, as /proc/net/tcp prints them) -> ('127.0.0.1', 8080)."""
    host, port = addr.split(":")
    raw = bytes.fromhex(host)
    # Each 32-bit word is printed in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def _norm(a: tuple[str, int]) -> tuple[str, int]:
    ip = ipaddress.ip_address(a[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), a[1]


def _peer_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the socket whose local end is `remote` and remote end is `local`."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if _parse(cols[1]) == remote and _parse(cols[2]) == local:
                    return int(cols[9])
    return None


def local_peer_pid(sock: socket.socket) -> int | None:
    """The pid of the local process at the other end of `sock`, or None (another host, or a
    process we may not inspect)."""
    try:
        local, remote = _norm(sock.getsockname()[:2]), _norm(sock.getpeername()[:2])
    except OSError:
        return None
    inode = _peer_inode(local, remote)
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        return int(pid)
    return None
