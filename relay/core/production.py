"""What running for real asks of a configuration, as plain functions (no files, sockets or clock).

`relay check --production` and `relay serve`'s start-up checks (relay/check.py) read the file system and the
configuration and judge with these: whether a host name only ever reaches this machine, whether a listen
address reaches beyond it, and whether POSIX permission bits let a given user read, write or enter a path.
"""

from __future__ import annotations

import ipaddress
import stat
from dataclasses import dataclass

# Names that resolve to the machine itself by convention (RFC 6761: all of .localhost), whatever DNS says.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# What `want` may ask of a path, as the permission bits of the owner class (shifted for group and others).
READ, WRITE, ENTER = stat.S_IRUSR, stat.S_IWUSR, stat.S_IXUSR


def host_name(host_port: str) -> str:
    """`track.example.com:8080` -> `track.example.com`; `[::1]:8080` -> `::1`; lower case, no root dot."""
    host = host_port.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback_host(host_port: str) -> bool:
    """Whether a host (with optional :port) names this machine only: localhost, *.localhost, 127/8, ::1."""
    host = host_name(host_port)
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reaches_beyond_loopback(listen_host: str) -> bool:
    """Whether a listener bound to `listen_host` answers other machines: the wildcard ("", 0.0.0.0, ::) or any
    address or name that is not loopback."""
    if listen_host in ("", "0.0.0.0", "::"):
        return True
    return not is_loopback_host(listen_host)


@dataclass(frozen=True)
class Owner:
    """Who owns a path and its permission bits (an os.stat_result's st_mode, st_uid, st_gid)."""

    mode: int
    uid: int
    gid: int


def permits(owner: Owner, uid: int, gids: frozenset[int], want: int) -> bool:
    """Whether a process of `uid` in groups `gids` may do `want` (READ | WRITE | ENTER) to a path, by its bits
    alone, as the kernel decides: root reads and writes anything and enters any folder; everyone else is
    judged by exactly one class (owner, else group, else others), not the most generous one."""
    if uid == 0:  # a folder root always enters; a file it executes only when someone may
        executable = stat.S_ISDIR(owner.mode) or bool(owner.mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        return not (want & ENTER) or executable
    if uid == owner.uid:
        bits = owner.mode
    elif owner.gid in gids:
        bits = owner.mode << 3
    else:
        bits = owner.mode << 6
    return bits & want == want


def describe(want: int) -> str:
    """READ | WRITE -> "read and write" (for messages)."""
    words = [w for bit, w in ((READ, "read"), (WRITE, "write"), (ENTER, "enter")) if want & bit]
    return " and ".join(words)
