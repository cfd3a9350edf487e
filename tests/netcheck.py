"""Which TCP sockets a process tree listens on, read from /proc (no tool needed): for the loopback-only tests."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

__all__ = ["is_loopback", "listeners"]


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listening() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Socket inode → (address, port) of every listening TCP socket, from /proc/net/tcp and tcp6."""
    found = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if v6:  # four host-order 32-bit words
                addr = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            else:
                addr = ipaddress.IPv4Address(raw[::-1])
            found[fields[9]] = (addr, int(hex_port, 16))
    return found


def _process_tree(root: int) -> dict[int, str]:
    """pid → command of ``root`` and all its descendants (Ray's servers, agents and workers)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    cmds = {}
    for p in tree:
        try:
            cmds[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
    return cmds


def listeners(root: int) -> list[tuple[str, str, int]]:
    """(command, address, port) of each listening socket held by ``root`` or its descendants."""
    socks = _listening()
    out = []
    for pid, cmd in _process_tree(root).items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target[len("socket:[") : -1] if target.startswith("socket:[") else None
            if inode in socks:
                addr, port = socks[inode]
                out.append((cmd, str(addr), port))
    return out
