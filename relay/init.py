"""`relay init DIR`: the first real configuration, its DKIM key and tracking keys, owned for the service user.

Run as root with `--user relay`, the folder and the secrets belong to root and are readable by the relay group
only (0750 folders, 0640 files: the service reads its keys and cannot change them), and the data folder
belongs to the relay user. Run as anyone else, everything belongs to the caller, private to them. Nothing
that exists is overwritten: an existing key is kept and used, an existing relay.toml stops the command.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import sys
from pathlib import Path

from relay.config import HOST_RE, ConfigError, DkimKey, load_or_create_keyring
from relay.core import dkim
from relay.core.dkim import new_private_key
from relay.core.production import is_loopback_host
from relay.core.setup import DEFAULT_UPSTREAM_PORT, Setup, dns_records, next_steps, render_config
from relay.sign import load_key_file, write_private_key

PRIVATE_FOLDER, PRIVATE_FILE = 0o700, 0o600  # run by anyone: the caller's own
SHARED_FOLDER, SHARED_FILE = 0o750, 0o640  # run by root for a service user: root's, readable by its group


class InitError(ValueError):
    """Something `relay init` was told that cannot work; the message names the option."""


def init_command(args: argparse.Namespace) -> int:
    try:
        setup = setup_from(args)
        owner = service_owner(setup.user)
        record = write_files(setup, owner)
    except InitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = _this_command()
    print(f"wrote {setup.config_file}, {setup.dkim_key} and {setup.tracking_keys}\n")
    print("DNS records to publish:\n" + "\n".join(dns_records(setup, record)) + "\n")
    print("Next steps:\n" + "\n".join(next_steps(setup, command)))
    return 0


def _this_command() -> str:
    """How the operator ran relay (/opt/relay/venv/bin/relay), for the commands the next steps show."""
    invoked = Path(sys.argv[0])
    if invoked.name == "relay" and invoked.is_absolute():
        return str(invoked)
    return shutil.which("relay") or "relay"


# --- what was asked --------------------------------------------------------------------------------------------

def setup_from(args: argparse.Namespace) -> Setup:
    """The options, checked and made absolute."""
    domain = _domain("--domain", args.domain)
    tracking_host = _domain("--tracking-host", args.tracking_host)
    if is_loopback_host(tracking_host):
        raise InitError(f"--tracking-host: {tracking_host} is a loopback name: recipients could not reach it")
    if not all(c.isalnum() or c in "-_" for c in args.selector):
        raise InitError(f"--selector: {args.selector!r}: letters, digits, - and _ only")
    hostname = _hostname(args.hostname)
    host, port = _host_port("--upstream", args.upstream, DEFAULT_UPSTREAM_PORT) if args.upstream else (None, 0)
    _host_port("--smtp-listen", args.smtp_listen, None)
    return Setup(
        config_dir=Path(os.path.abspath(args.dir)), data_dir=Path(os.path.abspath(args.data_dir)), domain=domain,
        tracking_host=tracking_host, selector=args.selector, hostname=hostname,
        smtp_listen=args.smtp_listen, upstream_host=host, upstream_port=port or DEFAULT_UPSTREAM_PORT,
        bounce_domain=_domain("--bounce-domain", args.bounce_domain) if args.bounce_domain else None,
        user=args.user,
    )


def _hostname(given: str | None) -> str:
    """relay's public name: as given, else this machine's fully qualified name when it is one."""
    if given:
        name = _domain("--hostname", given)
        if is_loopback_host(name):
            raise InitError(f"--hostname: {name} is a loopback name: give relay's public host name")
        return name
    name = socket.getfqdn().lower()
    if not HOST_RE.match(name) or "." not in name or is_loopback_host(name):
        raise InitError(f"--hostname: this machine calls itself {name!r}, not a public host name: give relay's"
                        " with --hostname")
    return name


def _domain(option: str, value: str) -> str:
    name = value.strip().lower().rstrip(".")
    if not HOST_RE.match(name) or "." not in name or ":" in name:
        raise InitError(f"{option}: {value!r} is not a domain name like example.com")
    return name


def _host_port(option: str, value: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep and default_port is not None:
        host, port = value, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InitError(f"{option}: {value!r} is not host:port")
    return host.strip("[]"), int(port)


def service_owner(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) of the service user when root sets up for one; None when the caller keeps everything."""
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InitError(f"--user: no user {user!r} (create it first: useradd --system --home-dir /var/lib/relay"
                        f" --shell /usr/sbin/nologin {user})") from None
    if os.geteuid() == entry.pw_uid:
        return None  # setting up for oneself: private files, as without --user
    if os.geteuid() != 0:
        raise InitError(f"--user {user}: only root can give files to another user (run relay init with sudo)")
    return entry.pw_uid, entry.pw_gid


# --- the files -----------------------------------------------------------------------------------------------

def write_files(s: Setup, owner: tuple[int, int] | None) -> str:
    """Folders, keys and relay.toml, with their owners and modes; the DKIM zone-file line."""
    if s.config_file.exists():
        raise InitError(f"{s.config_file} exists: relay init never overwrites a configuration (move it away, or edit"
                        " it)")
    folder_mode, file_mode = (SHARED_FOLDER, SHARED_FILE) if owner else (PRIVATE_FOLDER, PRIVATE_FILE)
    group = (0, owner[1]) if owner else None  # root keeps the secrets; the service's group reads them
    try:
        for folder in (s.config_dir, s.dkim_key.parent):
            _folder(folder, folder_mode, group)
        _folder(s.data_dir, folder_mode, owner)  # the service writes here
        key = _dkim_key(s)
        load_or_create_keyring(s.tracking_keys)
        fd = os.open(s.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_config(s))
        for path in (s.dkim_key, s.tracking_keys, s.config_file):
            _own(path, file_mode, group)
    except ConfigError as exc:
        raise InitError("; ".join(exc.problems)) from exc
    except OSError as exc:
        raise InitError(f"{exc.filename or s.config_dir}: {exc.strerror or exc}") from exc
    return dkim.zone_file_line(f"{s.selector}._domainkey.{s.domain}", dkim.key_record(key))


def _dkim_key(s: Setup) -> dkim.PrivateKey:
    """A new RSA key, or the one a previous run left (a published record may already name it)."""
    if s.dkim_key.exists():
        try:
            return load_key_file(DkimKey(s.domain, s.selector, s.dkim_key))
        except ValueError as exc:
            raise InitError(str(exc)) from exc
    key = new_private_key("rsa", 2048)  # RSA-2048: what every receiver verifies (Ed25519 is not yet universal)
    write_private_key(s.dkim_key, key)
    return key


def _folder(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Create `path` with its owner and mode; a folder that exists is left as it is (it may be /etc)."""
    if not path.exists():
        path.mkdir(parents=True)
        _own(path, mode, owner)


def _own(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, mode)
