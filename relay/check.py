"""What `relay check` and `relay serve` verify before relay runs for real: files the service user can reach,
listen addresses that are free, and what a production configuration must not keep from the example.

Each finding is one line that starts with the configuration key it concerns, so an operator knows what to
edit. The judgement of names and permission bits is in relay/core/production.py; this module reads the file
system and binds sockets.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path

from relay.config import Config
from relay.core.production import (
    ENTER,
    READ,
    WRITE,
    Owner,
    describe,
    is_loopback_host,
    permits,
    reaches_beyond_loopback,
)


@dataclass(frozen=True)
class Account:
    """The user a check is made for: the service user relay runs as."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account:
        """The account of a user name; LookupError when there is no such user."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise LookupError(f"no user {name!r} on this machine (create it: useradd --system --home-dir "
                              f"/var/lib/relay --shell /usr/sbin/nologin {name})") from None
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        return cls(name, uid, frozenset([os.getegid(), *os.getgroups()]))


@dataclass(frozen=True)
class Need:
    """A path relay uses, what it does with it, and the key that names it."""

    key: str
    path: Path
    want: int  # READ | WRITE | ENTER
    create: bool = False  # relay creates it when missing (a folder, or a file in a writable folder)
    at_start: bool = True  # `relay serve` cannot start without it (others fail later, one event or scan at a time)


# --- what relay reads and writes ----------------------------------------------------------------------------

def needs(cfg: Config, config_path: str | os.PathLike) -> list[Need]:
    """Every file and folder a running relay reads or writes under this configuration."""
    folder = READ | WRITE | ENTER
    out = [Need("--config", Path(config_path), READ), Need("relay.data_dir", cfg.data_dir, folder, create=True)]
    if cfg.store.url is None:  # SQLite: the database and its journal files must stay writable
        out += [Need("relay.data_dir", cfg.data_dir / name, READ | WRITE)
                for name in ("relay.sqlite3", "relay.sqlite3-wal", "relay.sqlite3-shm")
                if (cfg.data_dir / name).exists()]
    out.append(Need("tracking.keys_file", cfg.tracking.keys_file, READ, create=True))
    if cfg.upstream.type == "capture":
        out.append(Need("upstream.capture_dir", cfg.upstream.capture_dir, folder, create=True))
    out += _files_read(cfg)
    for name, s in cfg.configuration_sets.items():
        out += [Need(f"configuration_sets.{name}.destinations[{i}].path", Path(d.path), WRITE, create=True,
                     at_start=False) for i, d in enumerate(s.destinations) if d.kind == "file" and d.path]
    if cfg.scan.clamd_socket is not None:  # connecting to a unix socket takes write permission on it
        out.append(Need("scan.clamd_socket", cfg.scan.clamd_socket, WRITE, at_start=False))
    return out


def _files_read(cfg: Config) -> list[Need]:
    t = cfg.tracking
    named = [(f"dkim.keys[{i}].private_key_file", k.private_key_file) for i, k in enumerate(cfg.dkim.keys)]
    named += [("smtp.tls_certificate", cfg.smtp.tls_certificate), ("smtp.tls_key", cfg.smtp.tls_key),
              ("upstream.ca_file", cfg.upstream.ca_file), ("tracking.apple_egress_file", t.apple_egress_file),
              ("tracking.scanner_user_agents_file", t.scanner_user_agents_file),
              ("tracking.scanner_networks_file", t.scanner_networks_file)]
    for i, c in enumerate(t.certificates):
        named += [(f"tracking.certificates[{i}].certificate", c.certificate),
                  (f"tracking.certificates[{i}].key", c.key)]
    return [Need(key, path, READ) for key, path in named if path is not None]


# --- can the service user reach them ------------------------------------------------------------------------

def access_problems(items: list[Need], account: Account | None = None) -> list[str]:
    """One line per path `account` (None: this process, with its ACLs and read-only mounts) cannot use; a
    path inside a folder already reported is not reported again (the data folder's files)."""
    who = account.name if account else Account.current().name
    problems: list[str] = []
    failed: list[Path] = []
    for need in items:
        if any(need.path.is_relative_to(folder) for folder in failed):
            continue
        problem = _access_problem(need, account, who)
        if problem:
            problems.append(problem)
            failed.append(need.path)
    return problems


def _access_problem(need: Need, account: Account | None, who: str) -> str | None:
    path = Path(os.path.abspath(need.path))
    target = path if path.exists() else _nearest_existing(path)
    if target != path and not need.create:
        return f"{need.key}: {path} does not exist"
    for folder in reversed(target.parents):
        if not _may(folder, ENTER, account):
            return f"{need.key}: {path}: {who} cannot enter {folder}"
    if target != path:
        if not target.is_dir():
            return f"{need.key}: {path}: {target} is not a folder"
        if not _may(target, WRITE | ENTER, account):
            return f"{need.key}: {path} does not exist and {who} cannot create it ({target} is not writable for {who})"
        return None
    if not _may(path, need.want, account):
        return f"{need.key}: {path}: {who} cannot {describe(need.want)} it"
    return None


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _may(path: Path, want: int, account: Account | None) -> bool:
    flags = (os.R_OK if want & READ else 0) | (os.W_OK if want & WRITE else 0) | (os.X_OK if want & ENTER else 0)
    if account is None:
        return os.access(path, flags)
    st = path.stat()
    if not permits(Owner(st.st_mode, st.st_uid, st.st_gid), account.uid, account.gids, want):
        return False
    # The bits say yes; a read-only mount still says no to everyone (root's own access() sees that).
    return not (want & WRITE and os.geteuid() == 0) or os.access(path, os.W_OK)


# --- what production must not keep from the example ---------------------------------------------------------

def tracking_hosts(cfg: Config) -> list[tuple[str, str]]:
    """(key, host) of every host the file puts into tracking links."""
    hosts = [("tracking.default_host", cfg.tracking.default_host)]
    hosts += [(f"configuration_sets.{n}.custom_redirect_domain", s.custom_redirect_domain)
              for n, s in cfg.configuration_sets.items() if s.custom_redirect_domain]
    hosts += [(f"domains.{d}.tracking.custom_redirect_domain", o.custom_redirect_domain)
              for d, o in cfg.domains.items() if o.custom_redirect_domain]
    return hosts


def production_findings(cfg: Config) -> list[str]:
    """What makes a configuration unfit to serve real mail: errors with `relay check --production`."""
    found = []
    if cfg.upstream.type == "capture":
        found.append(f'upstream.type: "capture" writes every message to {cfg.upstream.capture_dir} and delivers'
                     ' none: set type = "smtp" and the host of your mail provider or smarthost')
    found += [f"{key}: {host} is a loopback name: recipients cannot reach the pixel and the links in their mail;"
              " use the public host name of the tracking listener" for key, host in tracking_hosts(cfg)
              if is_loopback_host(host)]
    return found


def production_warnings(cfg: Config) -> list[str]:
    """What works but is seldom meant in production: warnings with `relay check --production`."""
    notes = []
    if is_loopback_host(cfg.hostname) or "." not in cfg.hostname:
        notes.append(f"relay.hostname: {cfg.hostname} is not a public host name: receivers see it in the SMTP"
                     " greeting, Received fields and Message-IDs")
    if not cfg.dkim.keys:
        notes.append("dkim.keys: none: relay does not sign, and instrumented mail no longer verifies with the"
                     " application's own signature (`relay init` or `relay dkim keygen` makes a key)")
    if reaches_beyond_loopback(cfg.smtp.listen_host) and cfg.smtp.users and cfg.smtp.tls_certificate is None:
        notes.append("smtp.tls_certificate: none, so AUTH is offered only to smtp.plaintext_auth_networks: other"
                     " clients cannot log in")
    if cfg.metrics.listen_host is not None and reaches_beyond_loopback(cfg.metrics.listen_host):
        notes.append(f"metrics.listen: {cfg.metrics.listen_host}:{cfg.metrics.listen_port} answers other machines"
                     " and /metrics has no login: keep it on loopback or firewall it")
    return notes


# --- listen addresses ---------------------------------------------------------------------------------------

def serve_listeners(cfg: Config) -> list[tuple[str, str, int]]:
    """(key, host, port) of every listener `relay serve` opens."""
    out = [("smtp.listen", cfg.smtp.listen_host, cfg.smtp.listen_port)] + track_listeners(cfg)
    if cfg.api.enabled:
        out.append(("api.listen", cfg.api.listen_host, cfg.api.listen_port))
    if cfg.metrics.listen_host is not None:
        out.append(("metrics.listen", cfg.metrics.listen_host, cfg.metrics.listen_port))
    return out


def track_listeners(cfg: Config) -> list[tuple[str, str, int]]:
    """(key, host, port) of the tracking listener's sockets (`relay track` opens only these)."""
    t = cfg.tracking
    out = [("tracking.listen", t.listen_host, t.listen_port)]
    if t.tls_listen_host is not None:
        out.append(("tracking.tls_listen", t.tls_listen_host, t.tls_listen_port))
    return out


_BIND_ERRORS = {
    errno.EADDRINUSE: "address already in use (`ss -ltnp 'sport = :{port}'` shows by what)",
    errno.EACCES: "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE (see the systemd unit)",
    errno.EADDRNOTAVAIL: "no such address on this machine",
}


def listen_problems(listeners: list[tuple[str, str, int]], reuse_port: bool = False) -> list[str]:
    """One line per address that cannot be bound now, tried as relay binds it (SO_REUSEADDR, v6 only on v6).
    Port 0 (any free port) is never a problem."""
    problems = []
    for key, host, port in listeners:
        if port == 0:
            continue
        reason = _bind_problem(host, port, reuse_port)
        if reason:
            problems.append(f"{key}: {host}:{port}: {reason}")
    return problems


def _bind_problem(host: str, port: int, reuse_port: bool) -> str | None:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return _BIND_ERRORS.get(exc.errno, exc.strerror or str(exc)).format(port=port)
    return None
