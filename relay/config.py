"""TOML configuration → typed settings, with validation messages that name the key.

`load(path)` returns a `Config` or raises `ConfigError` carrying every problem found (not just the first), so
`relay check` can list them all. Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from relay.core.control import TLS_POLICIES, QuotaLimits, Quotas, SetOptions, Thresholds
from relay.core.domains import InvalidTrackingOptions, validate_tracking_domain
from relay.core.headers import CONFIG_SET_RE
from relay.core.resolve import (
    Destination,
    FeedbackDefaults,
    FeedbackOptions,
    ModelError,
    TrackingOptions,
    check_destination,
    check_suppression_reasons,
    event_types,
)
from relay.core.settings import HTTPS_POLICIES, PIXEL_POSITIONS, SUPPRESSION_REASONS
from relay.core.tokens import Keyring, SigningKey

UPSTREAM_TYPES = ("capture", "smtp")
UPSTREAM_TLS = ("none", "opportunistic", "starttls", "implicit")
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}(?::\d+)?$){_LABEL}(?:\.{_LABEL})*(?::\d{{1,5}})?$")


# Where every subcommand finds its configuration without --config: $RELAY_CONFIG, else the file the systemd
# unit and `relay init /etc/relay` use, when it exists.
CONFIG_ENV = "RELAY_CONFIG"
SYSTEM_CONFIG = Path("/etc/relay/relay.toml")


def default_config_path(environ: dict[str, str] | None = None, system: Path = SYSTEM_CONFIG) -> str | None:
    """The configuration file to use when --config is not given; None when there is none to guess."""
    named = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if named:
        return named
    return str(system) if system.is_file() else None


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SmtpUser:
    username: str
    password_hash: str


@dataclass(frozen=True)
class SmtpSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 2525
    max_message_size: int = 40 * 1024 * 1024
    max_recipients: int = 50
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Where AUTH may happen before STARTTLS (credentials never cross a network in clear).
    plaintext_auth_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    users: tuple[SmtpUser, ...] = ()
    auth_fail_limit: int = 5
    auth_fail_window: float = 300.0
    # scrypt checks at once, off the event loop: each costs 16 MiB and ~40 ms of a core, so a flood of AUTH
    # attempts gets this much of the machine and no more (the rest wait their turn, one per open connection).
    auth_concurrency: int = 2
    # Postfix's defaults: smtpd_client_connection_count_limit (50 per client) and default_process_limit (100
    # smtpd processes in all). Clients in trusted_networks are exempt from the per-client cap, as Postfix
    # exempts $mynetworks (smtpd_client_event_limit_exceptions): they are the applications relay serves.
    max_connections: int = 100
    max_connections_per_client: int = 50
    timeout: float = 300.0
    add_received_header: bool = True
    # Behind a TCP load balancer: every connection starts with a PROXY protocol header (v1 or v2) naming the
    # client, accepted only from proxy_networks (the balancers), so trusted networks, caps, AUTH limits and the
    # Received header see the client rather than the balancer.
    proxy_protocol: bool = False
    proxy_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class UpstreamSettings:
    type: str = "capture"
    capture_dir: Path = Path("relay-data/delivered")
    host: str = ""
    port: int = 25
    tls: str = "opportunistic"
    verify_certificate: bool = True
    ca_file: Path | None = None
    username: str = ""
    password: str = ""
    timeout: float = 60.0
    connections: int = 8


@dataclass(frozen=True)
class DeliverySettings:
    concurrency: int = 32
    max_age: float = 86400.0
    retry_initial: float = 60.0
    retry_max: float = 3600.0


@dataclass(frozen=True)
class TrackingConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    default_host: str = "localhost:8080"
    https_policy: str = "OPTIONAL"
    pixel_position: str = "bottom"
    keys_file: Path = Path("relay-data/tracking-keys")
    max_link_age: float = 0.0  # seconds; 0 = links never expire
    # --- tracking listener ---
    # X-Forwarded-For/-Proto are believed only from these peers (a CDN or reverse proxy in front).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tls_listen_host: str | None = None  # HTTPS listener; None: plain HTTP only
    tls_listen_port: int = 0
    certificates: tuple[TrackingCertificate, ...] = ()  # per-domain certificates chosen by SNI; first = default
    apple_egress_file: Path | None = None  # Apple's egress-ip-ranges.csv (Mail Privacy Protection)
    scanner_user_agents_file: Path | None = None  # None: relay/data/scanner-user-agents.txt
    scanner_networks_file: Path | None = None  # None: relay/data/scanner-networks.txt
    early_click_seconds: float = 10.0
    burst_window_seconds: float = 5.0
    burst_min_links: int = 3
    flush_interval: float = 0.005  # events are buffered this long (or flush_batch events) per store write
    flush_batch: int = 2000
    # Hits waiting for the store in memory, at most (about 650 bytes an open, 1.2 KB a click, measured): 65-120 MB
    # that ride out seconds of a flood or minutes of a stalled store; beyond it a hit is answered, not recorded.
    max_buffered_hits: int = 100_000
    # How long stopping waits for a failing store to take the buffered hits: with SMTP's 30 s and deliveries'
    # 10 s, inside systemd's default 90 s stop timeout.
    drain_timeout: float = 30.0
    client_timeout: float = 15.0  # a connection that sends no complete request for this long is closed
    require_verified_domains: bool = True  # refuse custom redirect domains not proved by `tracking-domain verify`
    workers: int = 1  # `relay track` processes sharing the port (SO_REUSEPORT) and the store
    # Hosts reachable as https://host through a proxy or CDN in front of the listener (TLS terminated there).
    https_hosts: tuple[str, ...] = ()
    # --- tracking listener: connections and request limits ---
    # Open connections at most; 0: three quarters of the process's open-file limit (RLIMIT_NOFILE), the other
    # quarter kept for SMTP, delivery and the store (Debian's nginx: 768 worker_connections under 1,024 files).
    max_connections: int = 0
    # Request line (method, target, version): a click token carries its whole destination URL, so more than
    # nginx's and aiohttp's 8 KiB; 32 KiB keeps every link that worked before.
    max_request_line: int = 32768
    max_header_bytes: int = 8192  # the header fields together (SES answers 400 beyond 8 KiB, cookies included)
    max_headers: int = 100  # header fields per request (Apache's LimitRequestFields; aiohttp's default is 128)


@dataclass(frozen=True)
class TrackingCertificate:
    domains: tuple[str, ...]  # lower-case host names or `*.example.com`
    certificate: Path
    key: Path


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    private_key_file: Path
    algorithm: str = "rsa-sha256"


@dataclass(frozen=True)
class DkimSettings:
    keys: tuple[DkimKey, ...] = ()
    keep_broken_signatures: bool = False


@dataclass(frozen=True)
class ConfigurationSet:
    name: str
    open_tracking: bool | None = None
    click_tracking: bool | None = None
    custom_redirect_domain: str | None = None
    https_policy: str | None = None
    pixel_position: str | None = None
    dkim_fallback_domain: str | None = None
    destinations: tuple[Destination, ...] = ()  # [[configuration_sets.NAME.destinations]]
    feedback: FeedbackOptions = field(default_factory=FeedbackOptions)  # verp, list_unsubscribe, suppression
    delivery: SetOptions = field(default_factory=SetOptions)  # tls_policy, max_delivery_seconds (SES DeliveryOptions)

    def tracking_options(self) -> TrackingOptions:
        return TrackingOptions(self.open_tracking, self.click_tracking, self.custom_redirect_domain,
                               self.https_policy, self.pixel_position)


@dataclass(frozen=True)
class StoreSettings:
    """[store]: where relay keeps its data. No url: SQLite under data_dir (one node)."""

    url: str | None = None  # postgresql://user@host/dbname: several nodes share it
    node_id: str | None = None  # this node's name in queue leases; None: host name and SMTP port
    lease: float = 60.0  # how long a node's claim on a queued copy lasts without renewal (a dead node's wait)
    pool_size: int = 8  # PostgreSQL connections for reads (the writer has its own)


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    data_dir: Path = Path("relay-data")
    hostname: str = "relay.localhost"
    account_id: str = "000000000000"
    region: str = "local"
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    configuration_sets: dict[str, ConfigurationSet] = field(default_factory=dict)
    # --- sending domains and identities: [domains."D".tracking], [identities."X"] ---
    domains: dict[str, TrackingOptions] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)  # address or domain -> default configuration set
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings())
    retention: RetentionSettings = field(default_factory=lambda: RetentionSettings())
    privacy: PrivacySettings = field(default_factory=lambda: PrivacySettings())
    api: ApiSettings = field(default_factory=lambda: ApiSettings())
    # --- bounces and feedback: [bounces], [suppression] ---
    feedback: FeedbackDefaults = field(default_factory=FeedbackDefaults)
    complaints_addresses: tuple[str, ...] = ()  # ARF reports are also accepted at these addresses (lower case)
    scan: ScanSettings = field(default_factory=lambda: ScanSettings())  # [scan]: virus scan through clamd
    store: StoreSettings = field(default_factory=StoreSettings)
    console: ConsoleSettings = field(default_factory=lambda: ConsoleSettings())  # [console]: the web console
    # --- sending control: [quotas], [reputation] ---
    quotas: Quotas = field(default_factory=Quotas)
    reputation: ReputationSettings = field(default_factory=lambda: ReputationSettings())
    sending: SendingSettings = field(default_factory=lambda: SendingSettings())  # identities: [sending]

    @property
    def database_path(self) -> Path:
        return self.data_dir / "relay.sqlite3"

    @property
    def store_target(self) -> str | Path:
        """What relay.store.open_store opens: the PostgreSQL URL, or the SQLite file."""
        return self.store.url or self.database_path

    @property
    def node_id(self) -> str:
        return self.store.node_id or f"{socket.gethostname()}:{self.smtp.listen_port}"

    def https_available(self, host: str) -> bool:
        """Whether https://host reaches the tracking listener: a proxy in front, or our own certificate."""
        name = host.lower().rsplit(":", 1)[0] if not host.endswith("]") else host.lower()
        t = self.tracking
        if host.lower() in t.https_hosts or name in t.https_hosts:
            return True
        if t.tls_listen_host is None:
            return False
        wildcard = "*." + name.split(".", 1)[-1]
        return any(name in c.domains or wildcard in c.domains for c in t.certificates)

    def keyring(self) -> Keyring:
        try:
            return load_or_create_keyring(self.tracking.keys_file)
        except OSError as exc:  # unreadable, or its folder not writable: the key to fix, not a traceback
            raise ConfigError([f"tracking.keys_file: {exc.filename or self.tracking.keys_file}: "
                               f"{exc.strerror or exc}"]) from exc


# --- passwords ---------------------------------------------------------------------------------------------

def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (base64); never store a password in clear."""
    salt = salt or secrets.token_bytes(16)
    n, r, p = 2**14, 8, 1
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


# --- tracking keys -----------------------------------------------------------------------------------------

def load_or_create_keyring(path: Path, title: str = "relay tracking keys") -> Keyring:
    """Tracking keys, one `kid secret-hex` per line, newest first. Created with one random key when absent.

    Every relay and tracking node that serves the same links must share this file. (The DKIM sealing keys of
    [sending] dkim_keys_file have the same form: `title` names them in the file.)
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        kid = "k" + secrets.token_hex(3)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# {title}: `key-id secret-hex`, newest (signing) key first.\n")
            f.write(f"{kid} {secrets.token_hex(32)}\n")
    keys = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            kid, secret = line.split()
            keys.append(SigningKey(kid, bytes.fromhex(secret)))
        except ValueError as exc:
            raise ConfigError([f"{path}:{lineno}: expected `key-id secret-hex` ({exc})"]) from exc
    if not keys:
        raise ConfigError([f"{path}: no tracking keys"])
    return Keyring(tuple(keys))


# --- parsing -----------------------------------------------------------------------------------------------

class _Reader:
    """Reads one TOML table, remembering problems with their dotted key names."""

    def __init__(self, table: dict, prefix: str, problems: list[str], base: Path):
        self.table, self.prefix, self.problems, self.base = table, prefix, problems, base
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default):
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.problems.append(f"{self.key(name)}: expected {names}, got {type(value).__name__}")
            return default
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str | None):
        value = self.get(name, str, default)
        if value is not None and value not in choices:
            self.problems.append(f"{self.key(name)}: {value!r} is not one of {', '.join(choices)}")
            return default
        return value

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self.get(name, str, None)
        if value is None or value == "":
            return default if value is None else None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def duration(self, name: str, default: float) -> float:
        value = self.get(name, (int, float, str), None)
        if value is None:
            return default
        if isinstance(value, (int, float)):
            return float(value)
        m = _DURATION.match(value)
        if not m:
            self.problems.append(f"{self.key(name)}: {value!r} is not a duration like 30s, 15m, 24h or 7d")
            return default
        return float(m.group(1)) * _UNITS[m.group(2)]

    def positive(self, name: str, default: int) -> int:
        value = self.get(name, int, default)
        if value <= 0:
            self.problems.append(f"{self.key(name)}: must be a positive number")
            return default
        return value

    def listen(self, name: str, default_host: str, default_port: int) -> tuple[str, int]:
        value = self.get(name, str, None)
        if value is None:
            return default_host, default_port
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            self.problems.append(f"{self.key(name)}: {value!r} is not host:port")
            return default_host, default_port
        return host.strip("[]") or "0.0.0.0", int(port)

    def networks(self, name: str, default: list[str]) -> tuple:
        nets = []
        for i, net in enumerate(self.get(name, list, default)):
            try:
                nets.append(ipaddress.ip_network(str(net), strict=False))
            except ValueError:
                self.problems.append(f"{self.key(name)}[{i}]: {net!r} is not a network like 10.0.0.0/8")
        return tuple(nets)

    def sub(self, name: str) -> _Reader:
        table = self.get(name, dict, {})
        return _Reader(table, self.key(name), self.problems, self.base)

    def finish(self) -> None:
        for name in self.table:
            if name not in self.used:
                self.problems.append(f"{self.key(name)}: unknown key")


def parse(data: dict, base: Path, path: Path | None = None) -> Config:
    problems: list[str] = []
    top = _Reader(data, "", problems, base)
    r = top.sub("relay")
    data_dir = r.path("data_dir", base / "relay-data")
    assert data_dir is not None
    relay_kw = dict(
        hostname=r.get("hostname", str, "relay.localhost"),
        account_id=r.get("account_id", str, "000000000000"),
        region=r.get("region", str, "local"),
    )
    r.finish()
    smtp = _parse_smtp(top.sub("smtp"), problems)
    upstream = _parse_upstream(top.sub("upstream"), data_dir, problems)
    d = top.sub("delivery")
    delivery = DeliverySettings(
        concurrency=d.positive("concurrency", 32),
        max_age=d.duration("max_age", 86400.0),
        retry_initial=d.duration("retry_initial", 60.0),
        retry_max=d.duration("retry_max", 3600.0),
    )
    d.finish()
    tracking = _parse_tracking(top.sub("tracking"), data_dir, problems)
    dkim = _parse_dkim(top.sub("dkim"), problems)
    sets = _parse_sets(top.sub("configuration_sets"), problems)
    domains, identities = _parse_domains(top.sub("domains"), problems), _parse_identities(top.sub("identities"))
    api = _parse_api(top.sub("api"))
    inspection = _parse_inspection(top, problems)
    feedback, complaints = _parse_feedback(top, problems)
    scan = _parse_scan(top.sub("scan"), problems)  # virus scan through clamd
    store = _parse_store(top.sub("store"), problems)
    console = _parse_console(top.sub("console"), problems)
    control = {"quotas": _parse_quotas(top.sub("quotas")), "reputation": _parse_reputation(top.sub("reputation")),
               "sending": _parse_sending(top.sub("sending"), data_dir)}
    top.finish()
    cfg = Config(path=path, data_dir=data_dir, smtp=smtp, upstream=upstream, delivery=delivery,
                 tracking=tracking, dkim=dkim, configuration_sets=sets, domains=domains, identities=identities,
                 api=api, feedback=feedback, complaints_addresses=complaints, scan=scan, store=store,
                 console=console, **control, **relay_kw)
    cfg = _with_inspection(cfg, inspection)
    problems += _https_problems(cfg)
    problems += sets_problems(cfg)  # domain levels
    if problems:
        raise ConfigError(problems)
    return cfg


def _parse_store(s: _Reader, problems: list[str]) -> StoreSettings:
    url = os.environ.get("RELAY_STORE_URL") or s.get("url", str, "") or None
    if url and not url.startswith(("postgresql://", "postgres://")):
        problems.append("store.url: a postgresql:// URL (without it, relay keeps its data in SQLite under data_dir)")
    settings = StoreSettings(url=url, node_id=s.get("node_id", str, "") or None, lease=s.duration("lease", 60.0),
                             pool_size=s.positive("pool_size", 8))
    s.finish()
    if settings.lease < 10:
        problems.append("store.lease: at least 10s (a node renews its leases every third of it)")
    return settings


def _https_problems(cfg: Config) -> list[str]:
    """An https policy is a promise that https://host answers; refuse it where nothing serves TLS."""
    levels = [("tracking.https_policy", cfg.tracking.https_policy, cfg.tracking.default_host)]
    levels += [(f"configuration_sets.{cs.name}.https_policy", cs.https_policy,
                cs.custom_redirect_domain or cfg.tracking.default_host) for cs in cfg.configuration_sets.values()]
    return [f"{key}: {policy} needs https://{host} to reach the tracking listener: list it in tracking.https_hosts"
            " (TLS at a proxy or CDN) or serve a certificate for it (tracking.tls_listen, tracking.certificates)"
            for key, policy, host in levels
            if policy in ("REQUIRE", "REQUIRE_OPEN_ONLY") and not cfg.https_available(host)]


def warnings(cfg: Config) -> list[str]:
    """What works but an operator should know."""
    hosts = {cfg.tracking.default_host} | {cs.custom_redirect_domain for cs in cfg.configuration_sets.values()
                                           if cs.custom_redirect_domain and cs.click_tracking is not False}
    notes = [f"tracking host {h} has no HTTPS: https links are wrapped with http:// tracking URLs (the redirect"
             " still lands on https); list it in tracking.https_hosts or serve a certificate for it"
             for h in sorted(hosts) if not cfg.https_available(h)]
    for cs in cfg.configuration_sets.values():  # RFC 8058 one-click needs an https URL
        own = cs.feedback.list_unsubscribe
        unsubscribe = cfg.feedback.list_unsubscribe if own is None else own
        host = cs.custom_redirect_domain or cfg.tracking.default_host
        if unsubscribe and not cfg.https_available(host):
            notes.append(f"configuration_sets.{cs.name}: list_unsubscribe without HTTPS on {host}: copies get"
                         " List-Unsubscribe but not List-Unsubscribe-Post, so Gmail and Yahoo offer no one-click"
                         " unsubscribe; list the host in tracking.https_hosts or serve a certificate for it")
    return notes


def _parse_smtp(s: _Reader, problems: list[str]) -> SmtpSettings:
    host, port = s.listen("listen", "127.0.0.1", 2525)
    users = []
    for i, u in enumerate(s.get("users", list, [])):
        ur = _Reader(u if isinstance(u, dict) else {}, f"smtp.users[{i}]", problems, s.base)
        name, pw = ur.get("username", str, ""), ur.get("password_hash", str, "")
        if not name:
            problems.append(f"smtp.users[{i}].username: required")
        if not pw.startswith("scrypt$"):
            problems.append(f"smtp.users[{i}].password_hash: expected a hash from `relay passwd`, not a password")
        ur.finish()
        users.append(SmtpUser(name, pw))
    cert, key = s.path("tls_certificate", None), s.path("tls_key", None)
    for name, p in (("tls_certificate", cert), ("tls_key", key)):
        if p is not None and not p.is_file():
            problems.append(f"smtp.{name}: {p} does not exist")
    if (cert is None) != (key is None):
        problems.append("smtp.tls_certificate / smtp.tls_key: give both or neither")
    settings = SmtpSettings(
        listen_host=host, listen_port=port,
        max_message_size=s.positive("max_message_size", 40 * 1024 * 1024),
        max_recipients=s.positive("max_recipients", 50),
        trusted_networks=s.networks("trusted_networks", ["127.0.0.0/8", "::1/128"]),
        plaintext_auth_networks=s.networks("plaintext_auth_networks", ["127.0.0.0/8", "::1/128"]),
        tls_certificate=cert, tls_key=key, users=tuple(users),
        auth_fail_limit=s.positive("auth_fail_limit", 5),
        auth_fail_window=s.duration("auth_fail_window", 300.0),
        auth_concurrency=s.positive("auth_concurrency", 2),
        max_connections=s.positive("max_connections", 100),
        max_connections_per_client=s.positive("max_connections_per_client", 50),
        timeout=s.duration("timeout", 300.0),
        add_received_header=s.get("add_received_header", bool, True),
        proxy_protocol=s.get("proxy_protocol", bool, False),
        proxy_networks=s.networks("proxy_networks", ["127.0.0.0/8", "::1/128"]),
    )
    s.finish()
    return settings


def _parse_upstream(u: _Reader, data_dir: Path, problems: list[str]) -> UpstreamSettings:
    kind = u.choice("type", UPSTREAM_TYPES, "capture")
    password = u.get("password", str, "")
    pw_file = u.path("password_file", None)
    if pw_file is not None:
        try:
            password = pw_file.read_text().strip()
        except OSError as exc:
            problems.append(f"upstream.password_file: {exc}")
    settings = UpstreamSettings(
        type=kind,
        capture_dir=u.path("capture_dir", data_dir / "delivered") or data_dir / "delivered",
        host=u.get("host", str, ""),
        port=u.get("port", int, 25),
        tls=u.choice("tls", UPSTREAM_TLS, "opportunistic"),
        verify_certificate=u.get("verify_certificate", bool, True),
        ca_file=u.path("ca_file", None),
        username=u.get("username", str, ""),
        password=password,
        timeout=u.duration("timeout", 60.0),
        connections=u.positive("connections", 8),
    )
    if kind == "smtp" and not settings.host:
        problems.append("upstream.host: required when upstream.type is \"smtp\"")
    u.finish()
    return settings


def _parse_tracking(t: _Reader, data_dir: Path, problems: list[str]) -> TrackingConfig:
    host, port = t.listen("listen", "127.0.0.1", 8080)
    default_host = t.get("default_host", str, f"localhost:{port}")
    if not HOST_RE.match(default_host):
        problems.append(f"tracking.default_host: {default_host!r} is not a host name (with optional :port)")
    settings = TrackingConfig(
        listen_host=host, listen_port=port, default_host=default_host,
        https_policy=t.choice("https_policy", HTTPS_POLICIES, "OPTIONAL"),
        pixel_position=t.choice("pixel_position", PIXEL_POSITIONS, "bottom"),
        keys_file=t.path("keys_file", data_dir / "tracking-keys") or data_dir / "tracking-keys",
        max_link_age=t.duration("max_link_age", 0.0),
        **_parse_tracking_listener(t, problems),
        **_parse_tracking_limits(t, problems),
    )
    t.finish()
    return settings


def _parse_tracking_listener(t: _Reader, problems: list[str]) -> dict:
    """The tracking listener's own keys (proxies, TLS, verdict lists, batching)."""
    proxies = []
    for i, net in enumerate(t.get("trusted_proxies", list, [])):
        try:
            proxies.append(ipaddress.ip_network(str(net), strict=False))
        except ValueError:
            problems.append(f"tracking.trusted_proxies[{i}]: {net!r} is not a network like 10.0.0.0/8")
    tls_host, tls_port = (t.listen("tls_listen", "", 0) if "tls_listen" in t.table else (None, 0))
    certs = []
    for i, c in enumerate(t.get("certificates", list, [])):
        cr = _Reader(c if isinstance(c, dict) else {}, f"tracking.certificates[{i}]", problems, t.base)
        domains = tuple(str(d).lower() for d in cr.get("domains", list, []))
        cert, key = cr.path("certificate", None), cr.path("key", None)
        for name, p in (("certificate", cert), ("key", key)):
            if p is None:
                problems.append(f"tracking.certificates[{i}].{name}: required")
            elif not p.is_file():
                problems.append(f"tracking.certificates[{i}].{name}: {p} does not exist")
        if not domains:
            problems.append(f"tracking.certificates[{i}].domains: list the host names this certificate serves")
        cr.finish()
        if cert and key:
            certs.append(TrackingCertificate(domains, cert, key))
    if tls_host is not None and not certs:
        problems.append("tracking.tls_listen: needs at least one [[tracking.certificates]]")
    files = {}
    for name in ("apple_egress_file", "scanner_user_agents_file", "scanner_networks_file"):
        files[name] = t.path(name, None)
        if files[name] is not None and not files[name].is_file():
            problems.append(f"tracking.{name}: {files[name]} does not exist")
    return dict(
        trusted_proxies=tuple(proxies), tls_listen_host=tls_host, tls_listen_port=tls_port,
        certificates=tuple(certs), **files,
        early_click_seconds=t.duration("early_click_seconds", 10.0),
        burst_window_seconds=t.duration("burst_window_seconds", 5.0),
        burst_min_links=t.positive("burst_min_links", 3),
        flush_interval=t.duration("flush_interval", 0.005),
        flush_batch=t.positive("flush_batch", 2000),
        max_buffered_hits=t.positive("max_buffered_hits", 100_000),
        drain_timeout=t.duration("drain_timeout", 30.0),
        client_timeout=t.duration("client_timeout", 15.0),
        require_verified_domains=t.get("require_verified_domains", bool, True),
        workers=t.positive("workers", 1),
        https_hosts=tuple(str(h).lower() for h in t.get("https_hosts", list, [])),
    )


def _parse_tracking_limits(t: _Reader, problems: list[str]) -> dict:
    """The tracking listener's connection cap and request limits."""
    max_connections = t.get("max_connections", int, 0)
    if max_connections < 0:
        problems.append("tracking.max_connections: 0 (derived from the open-file limit) or a positive number")
        max_connections = 0
    return dict(
        max_connections=max_connections,
        max_request_line=t.positive("max_request_line", 32768),
        max_header_bytes=t.positive("max_header_bytes", 8192),
        max_headers=t.positive("max_headers", 100),
    )


def _parse_dkim(d: _Reader, problems: list[str]) -> DkimSettings:
    keys = []
    for i, k in enumerate(d.get("keys", list, [])):
        kr = _Reader(k if isinstance(k, dict) else {}, f"dkim.keys[{i}]", problems, d.base)
        domain, selector = kr.get("domain", str, ""), kr.get("selector", str, "")
        key_file = kr.path("private_key_file", None)
        for name, value in (("domain", domain), ("selector", selector), ("private_key_file", key_file)):
            if not value:
                problems.append(f"dkim.keys[{i}].{name}: required")
        algorithm = kr.choice("algorithm", DKIM_ALGORITHMS, "rsa-sha256")
        kr.finish()
        if domain and selector and key_file:
            keys.append(DkimKey(domain.lower(), selector, key_file, algorithm or "rsa-sha256"))
    settings = DkimSettings(tuple(keys), d.get("keep_broken_signatures", bool, False))
    d.finish()
    return settings


def _parse_sets(c: _Reader, problems: list[str]) -> dict[str, ConfigurationSet]:
    sets = {}
    for name in list(c.table):
        if not CONFIG_SET_RE.match(name):
            problems.append(f"configuration_sets.{name}: a set name is 1-64 characters from A-Z a-z 0-9 _ -")
        s = c.sub(name)
        fallback = s.get("dkim_fallback_domain", str, "") or None
        feedback = _parse_feedback_options(s, problems)
        delivery = _parse_set_delivery(s)
        destinations = _parse_destinations(s, problems)
        o = _parse_options(s, problems)  # the set's tracking options; also reports the table's unknown keys
        sets[name] = ConfigurationSet(
            name=name, open_tracking=o.open_tracking, click_tracking=o.click_tracking,
            custom_redirect_domain=o.custom_redirect_domain, https_policy=o.https_policy,
            pixel_position=o.pixel_position, dkim_fallback_domain=fallback, destinations=destinations,
            feedback=feedback, delivery=delivery,
        )
    return sets


def load(path: str | os.PathLike) -> Config:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{p}: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from exc
    return parse(data, p.resolve().parent, p)


# --- configuration sets, sending domains and identities ----------------------------------------------

def _parse_destinations(s: _Reader, problems: list[str]) -> tuple[Destination, ...]:
    """`[[configuration_sets.NAME.destinations]]`: webhook or file targets for the set's events."""
    out: list[Destination] = []
    for i, table in enumerate(s.get("destinations", list, [])):
        r = _Reader(table if isinstance(table, dict) else {}, f"{s.prefix}.destinations[{i}]", problems, s.base)
        secret = r.get("secret", str, "")
        secret_file = r.path("secret_file", None)
        if secret_file is not None:
            try:
                secret = secret_file.read_text().strip()
            except OSError as exc:
                problems.append(f"{r.key('secret_file')}: {exc}")
        path = r.path("path", None)
        kw = dict(
            name=r.get("name", str, ""), kind=r.choice("type", ("webhook", "file"), "webhook") or "webhook",
            enabled=r.get("enabled", bool, True), url=r.get("url", str, ""), secret=secret,
            sns_envelope=r.get("sns_envelope", bool, False), topic_arn=r.get("topic_arn", str, ""),
            path=str(path) if path else "", timeout=r.duration("timeout", 10.0),
            retry_initial=r.duration("retry_initial", 1.0), retry_max=r.duration("retry_max", 300.0),
            max_refusals=r.positive("max_refusals", 5),
        )
        types = r.get("event_types", list, [])
        r.finish()
        try:
            d = check_destination(Destination(event_types=event_types(types), **kw))
        except ModelError as exc:
            problems.append(f"{r.prefix}: {exc}")
            continue
        if any(x.name == d.name for x in out):
            problems.append(f"{r.prefix}.name: destination {d.name!r} is defined twice")
        out.append(d)
    if len(out) > 10:
        problems.append(f"{s.prefix}.destinations: at most 10 event destinations per configuration set")
    return tuple(out)


def _redirect_domain(r: _Reader, problems: list[str]) -> str | None:
    """A custom redirect domain, by the tracking-domain rules of relay/core/domains.py (proof of DNS by
    `relay tracking-domain verify` is required for domains set with the CLI; the file is the operator's)."""
    domain = r.get("custom_redirect_domain", str, "") or None
    if domain is None:
        return None
    try:
        return validate_tracking_domain(domain)
    except InvalidTrackingOptions as exc:
        problems.append(f"{r.key('custom_redirect_domain')}: {domain!r} is not a host name ({exc.message})")
        return None


def _parse_options(r: _Reader, problems: list[str]) -> TrackingOptions:
    domain = _redirect_domain(r, problems)
    options = TrackingOptions(
        open_tracking=r.get("open_tracking", bool, None), click_tracking=r.get("click_tracking", bool, None),
        custom_redirect_domain=domain,
        https_policy=r.choice("https_policy", HTTPS_POLICIES, None),
        pixel_position=r.choice("pixel_position", PIXEL_POSITIONS, None),
    )
    r.finish()
    return options


def _parse_domains(d: _Reader, problems: list[str]) -> dict[str, TrackingOptions]:
    """`[domains."example.com".tracking]`: a sending domain's own tracking options (over the account level)."""
    out = {}
    for name in list(d.table):
        if not HOST_RE.match(name):
            problems.append(f"domains.{name}: not a domain name")
        sub = d.sub(name)
        out[name.lower()] = _parse_options(sub.sub("tracking"), problems)
        sub.finish()
    return out


def _parse_identities(ids: _Reader) -> dict[str, str]:
    """`[identities."news@example.com"] default_configuration_set = "marketing"` (an address or a domain)."""
    out = {}
    for name in list(ids.table):
        r = ids.sub(name)
        if "@" not in name and not HOST_RE.match(name):
            ids.problems.append(f"identities.{name}: not an email address or a domain")
        value = r.get("default_configuration_set", str, "")
        if not CONFIG_SET_RE.match(value):
            ids.problems.append(f"identities.{name}.default_configuration_set: required, a configuration set name")
        r.finish()
        out[name.lower()] = value
    return out


def sets_problems(cfg: Config) -> list[str]:
    """Cross-checks of the file alone: https policies of domain levels, identities' sets (may live in SQLite,
    so `relay check` checks those against the database)."""
    return [f"domains.{d}.tracking.https_policy: {o.https_policy} needs https://{host} to reach the tracking"
            " listener: list it in tracking.https_hosts or serve a certificate for it"
            for d, o in cfg.domains.items()
            for host in [o.custom_redirect_domain or cfg.tracking.default_host]
            if o.https_policy in ("REQUIRE", "REQUIRE_OPEN_ONLY") and not cfg.https_available(host)]


# --- api: the SES-compatible management API ----------------------------------------------------------

@dataclass(frozen=True)
class ApiTarget:
    """Where events sent to an SNS topic or EventBridge bus ARN go: a webhook (relay has no SNS of its own)."""

    url: str
    secret: str = field(default="", repr=False)
    sns_envelope: bool = True  # SNS subscribers get the record as the Message of an SNS Notification


@dataclass(frozen=True)
class ApiAccessKey:
    id: str
    secret: str = field(repr=False)  # never in logs or reprs


@dataclass(frozen=True)
class ApiSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8081
    access_keys: tuple[ApiAccessKey, ...] = ()  # none: the API is not started
    regions: tuple[str, ...] = ()  # credential scopes accepted; empty: any region
    max_skew: float = 900.0  # seconds between X-Amz-Date and now (AWS: 15 minutes)
    sns_topics: dict[str, ApiTarget] = field(default_factory=dict)
    event_buses: dict[str, ApiTarget] = field(default_factory=dict)
    # The sending API's limits, SES's own (quotas.md): a client that works with SES works with relay.
    max_recipients: int = 50  # To + Cc + Bcc of one message (SES, and [smtp] max_recipients)
    max_raw_message_size: int = 40 * 1024 * 1024  # a Raw message, decoded (SES v2 and SMTP: 40 MB)
    max_message_size: int = 10 * 1024 * 1024  # a message built from Simple or Template content (SES: 10 MB)
    max_templates: int = 10_000  # templates stored (SES: 10,000 per account)
    max_template_size: int = 500 * 1024  # subject, text and HTML of one template together (SES: 500 KB)
    max_bulk_destinations: int = 50  # destinations of one SendBulkEmail / SendBulkTemplatedEmail (SES: 50)

    @property
    def enabled(self) -> bool:
        return bool(self.access_keys)

    @property
    def max_body(self) -> int:
        """The largest request body read: a raw message at its limit, base64 (4/3) and form-encoded (a v1 `+`
        or `/` takes three octets), with room for the other parameters."""
        return self.max_raw_message_size * 3 // 2 + 1024 * 1024


_ARN_RE = re.compile(r"^arn:aws[a-z-]*:(sns|events):[a-z0-9-]*:\d{12}:\S+$")


def _parse_api_targets(r: _Reader, service: str, sns_default: bool) -> dict[str, ApiTarget]:
    out = {}
    for arn in list(r.table):
        t = r.sub(arn)
        m = _ARN_RE.match(arn)
        if not m or m.group(1) != service:
            r.problems.append(f"{r.key(arn)}: not an {service} ARN (arn:aws:{service}:REGION:ACCOUNT:NAME)")
        secret = t.get("secret", str, "")
        secret_file = t.path("secret_file", None)
        if secret_file is not None:
            try:
                secret = secret_file.read_text().strip()
            except OSError as exc:
                r.problems.append(f"{t.key('secret_file')}: {exc}")
        url = t.get("url", str, "")
        if not re.match(r"^https?://[^/\s]+", url):
            r.problems.append(f"{t.key('url')}: required, an http:// or https:// URL")
        out[arn] = ApiTarget(url, secret, t.get("sns_envelope", bool, sns_default))
        t.finish()
    return out


def _parse_api(a: _Reader) -> ApiSettings:
    host, port = a.listen("listen", "127.0.0.1", 8081)
    keys = []
    for i, k in enumerate(a.get("access_keys", list, [])):
        kr = _Reader(k if isinstance(k, dict) else {}, f"api.access_keys[{i}]", a.problems, a.base)
        key_id, secret = kr.get("id", str, ""), kr.get("secret", str, "")
        secret_file = kr.path("secret_file", None)
        if secret_file is not None:
            try:
                secret = secret_file.read_text().strip()
            except OSError as exc:
                a.problems.append(f"{kr.key('secret_file')}: {exc}")
        if not re.fullmatch(r"[A-Za-z0-9]{4,128}", key_id):
            a.problems.append(f"api.access_keys[{i}].id: required, 4-128 letters and digits")
        if len(secret) < 16:
            a.problems.append(f"api.access_keys[{i}].secret: required, at least 16 characters")
        kr.finish()
        keys.append(ApiAccessKey(key_id, secret))
    if len({k.id for k in keys}) != len(keys):
        a.problems.append("api.access_keys: an id is listed twice")
    settings = ApiSettings(
        listen_host=host, listen_port=port, access_keys=tuple(keys),
        regions=tuple(str(x) for x in a.get("regions", list, [])),
        max_skew=a.duration("max_skew", 900.0),
        sns_topics=_parse_api_targets(a.sub("sns_topics"), "sns", True),
        event_buses=_parse_api_targets(a.sub("event_buses"), "events", False),
        max_recipients=a.positive("max_recipients", 50),
        max_raw_message_size=a.positive("max_raw_message_size", 40 * 1024 * 1024),
        max_message_size=a.positive("max_message_size", 10 * 1024 * 1024),
        max_templates=a.positive("max_templates", 10_000),
        max_template_size=a.positive("max_template_size", 500 * 1024),
        max_bulk_destinations=a.positive("max_bulk_destinations", 50),
    )
    a.finish()
    return settings


# --- inspection: [metrics], [retention], [privacy] ----------------------------------------------------

@dataclass(frozen=True)
class MetricsSettings:
    listen_host: str | None = None  # None: no /metrics endpoint
    listen_port: int = 0


@dataclass(frozen=True)
class RetentionSettings:
    days: int = 60  # events, verdicts and message records older than this are purged; 0 keeps them forever
    interval: float = 3600.0  # how often the running relay purges
    # A message's body after its last copy is final: kept this long (seconds) so the console can show it as
    # delivered, with its clicks on its links; 0 deletes it at once. Bodies are personal data and disk: every
    # message of a bulk send is one (2 days of 100,000 61 KB messages a day is 12 GB).
    message_bodies: float = 2 * 86400.0


@dataclass(frozen=True)
class PrivacySettings:
    truncate_ip: bool = False  # Open/Click events store 192.0.2.0 (/24) and 2001:db8:1:: (/48)
    drop_user_agent: bool = False  # Open/Click events store no User-Agent (the verdict is computed first)


def _parse_inspection(top: _Reader, problems: list[str]) -> dict:
    m = top.sub("metrics")
    host, port = m.listen("listen", "", 0) if m.get("listen", str, "") else (None, 0)  # "": no endpoint
    m.finish()
    r = top.sub("retention")
    days = r.get("days", int, 60)
    if days < 0:
        problems.append("retention.days: 0 (keep forever) or a positive number of days")
        days = 60
    retention = RetentionSettings(days=days, interval=r.duration("interval", 3600.0),
                                  message_bodies=r.duration("message_bodies", 2 * 86400.0))
    if retention.interval <= 0:
        problems.append("retention.interval: must be a positive duration")
    r.finish()
    p = top.sub("privacy")
    privacy = PrivacySettings(truncate_ip=p.get("truncate_ip", bool, False),
                              drop_user_agent=p.get("drop_user_agent", bool, False))
    p.finish()
    return {"metrics": MetricsSettings(host, port), "retention": retention, "privacy": privacy}


def _with_inspection(cfg: Config, inspection: dict) -> Config:
    from dataclasses import replace

    return replace(cfg, **inspection)


# --- bounces and feedback: [bounces], [suppression], per-set verp/list_unsubscribe/suppression_reasons --

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$|^localhost$")


def _reasons(r: _Reader, name: str, problems: list[str]) -> tuple[str, ...] | None:
    value = r.get(name, list, None)
    if value is None:
        return None
    try:
        return check_suppression_reasons(value)
    except ModelError as exc:
        problems.append(f"{r.key(name)}: {str(exc).split(': ', 1)[1]}")
        return None


def _parse_feedback_options(s: _Reader, problems: list[str]) -> FeedbackOptions:
    return FeedbackOptions(verp=s.get("verp", bool, None), list_unsubscribe=s.get("list_unsubscribe", bool, None),
                           suppression_reasons=_reasons(s, "suppression_reasons", problems))


def _parse_feedback(top: _Reader, problems: list[str]) -> tuple[FeedbackDefaults, tuple[str, ...]]:
    b = top.sub("bounces")
    domain = b.get("domain", str, "").strip().lower().rstrip(".")
    if domain and not _DOMAIN_RE.match(domain):
        problems.append(f"bounces.domain: {domain!r} is not a domain name")
        domain = ""
    complaints = tuple(str(a).strip().lower() for a in b.get("complaints_addresses", list, []))
    for i, address in enumerate(complaints):
        if address.count("@") != 1 or any(c in address for c in " <>"):
            problems.append(f"bounces.complaints_addresses[{i}]: {address!r} is not an email address")
    verp = b.get("verp", bool, True)
    unsubscribe = b.get("list_unsubscribe", bool, False)
    b.finish()
    s = top.sub("suppression")
    reasons = _reasons(s, "reasons", problems)
    s.finish()
    defaults = FeedbackDefaults(domain, verp, unsubscribe, SUPPRESSION_REASONS if reasons is None else reasons)
    return defaults, complaints


# --- virus scanning: [scan] ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanSettings:
    clamd_socket: Path | None = None  # clamd's LocalSocket
    clamd_host: str = ""  # or its TCPSocket (clamd_address = "host:port")
    clamd_port: int = 3310
    timeout: float = 30.0  # for one scan: connect, send, answer
    on_error: str = "tempfail"  # clamd unreachable, slow or failing: "tempfail" (451) or "accept" (unscanned)
    max_scan_size: int = 25 * 1024 * 1024  # larger messages are accepted unscanned; keep <= StreamMaxLength

    @property
    def enabled(self) -> bool:
        return self.clamd_socket is not None or bool(self.clamd_host)


def _parse_scan(s: _Reader, problems: list[str]) -> ScanSettings:
    socket_path = s.path("clamd_socket", None)
    address = s.get("clamd_address", str, "")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if address and (not host or not port.isdigit() or not 0 < int(port) <= 65535):
        problems.append(f"scan.clamd_address: {address!r} is not host:port")
        host, port = "", "3310"
    if socket_path is not None and host:
        problems.append("scan.clamd_socket / scan.clamd_address: give one of them")
    settings = ScanSettings(
        clamd_socket=socket_path, clamd_host=host, clamd_port=int(port or 3310),
        timeout=s.duration("timeout", 30.0),
        on_error=s.choice("on_error", ("tempfail", "accept"), "tempfail") or "tempfail",
        max_scan_size=s.positive("max_scan_size", 25 * 1024 * 1024),
    )
    if settings.timeout <= 0:
        problems.append("scan.timeout: must be a positive duration")
    s.finish()
    return settings


# --- the web console: [console], [[console.users]] ----------------------------------------------------------------

CONSOLE_ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class ConsoleUser:
    username: str
    password_hash: str = field(repr=False)  # from `relay passwd`
    role: str = "viewer"  # admin: may change the suppression list; viewer: reads only


@dataclass(frozen=True)
class ConsoleSettings:
    """[console]: its own listener, never the public tracking one; off without `listen` and users."""

    listen_host: str | None = None  # None: no console
    listen_port: int = 0
    users: tuple[ConsoleUser, ...] = ()
    # Cookies marked Secure (sent over HTTPS only): set it when people reach the console through an HTTPS proxy.
    # Without it, a request from trusted_proxies with X-Forwarded-Proto: https gets Secure cookies all the same.
    secure_cookies: bool = False
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # X-Forwarded-* believed
    # OWASP's session cheat sheet: 15-30 minutes idle for low-risk applications, and an absolute timeout of 4-8
    # hours for an application used through an office day.
    session_idle: float = 1800.0
    session_lifetime: float = 8 * 3600.0
    # The failed-login limit of SMTP AUTH (smtp.auth_fail_limit / auth_fail_window), per client address.
    auth_fail_limit: int = 5
    auth_fail_window: float = 300.0
    auth_concurrency: int = 2  # scrypt checks at once, as SMTP AUTH's (16 MiB and ~40 ms of a core each)
    # The domain breakdown of a set reads the newest this many copies of the range, each with its events: some
    # 4 row reads a copy, 10 us each from the page cache, so 2,000 copies cost about 100 ms of a page's 300 ms,
    # and a domain with a tenth of the mail still has 200 copies to rate.
    domain_sample: int = 2_000

    @property
    def enabled(self) -> bool:
        return self.listen_host is not None and bool(self.users)


def _parse_console(c: _Reader, problems: list[str]) -> ConsoleSettings:
    host, port = c.listen("listen", "", 0) if c.get("listen", str, "") else (None, 0)  # "": no console
    users = []
    for i, u in enumerate(c.get("users", list, [])):
        ur = _Reader(u if isinstance(u, dict) else {}, f"console.users[{i}]", problems, c.base)
        name, pw = ur.get("username", str, ""), ur.get("password_hash", str, "")
        if not name:
            problems.append(f"console.users[{i}].username: required")
        elif any(x.username == name for x in users):
            problems.append(f"console.users[{i}].username: {name!r} is listed twice")
        if not pw.startswith("scrypt$"):
            problems.append(f"console.users[{i}].password_hash: expected a hash from `relay passwd`, not a password")
        role = ur.choice("role", CONSOLE_ROLES, "viewer") or "viewer"
        ur.finish()
        users.append(ConsoleUser(name, pw, role))
    settings = ConsoleSettings(
        listen_host=host, listen_port=port, users=tuple(users),
        secure_cookies=c.get("secure_cookies", bool, False),
        trusted_proxies=c.networks("trusted_proxies", []),
        session_idle=c.duration("session_idle", 1800.0),
        session_lifetime=c.duration("session_lifetime", 8 * 3600.0),
        auth_fail_limit=c.positive("auth_fail_limit", 5),
        auth_fail_window=c.duration("auth_fail_window", 300.0),
        domain_sample=c.positive("domain_sample", 2_000),
    )
    for name in ("session_idle", "session_lifetime", "auth_fail_window"):
        if getattr(settings, name) <= 0:
            problems.append(f"console.{name}: must be a positive duration")
    c.finish()
    return settings


# --- sending control: [quotas], [reputation] -------------------------------------------------------------------

def _parse_set_delivery(s: _Reader) -> SetOptions:
    """A set's `tls_policy` (REQUIRE: its copies go out over TLS or wait) and `max_delivery_seconds`."""
    seconds = s.get("max_delivery_seconds", int, 0) or None
    if seconds is not None and not 300 <= seconds <= 50400:
        s.problems.append(f"{s.key('max_delivery_seconds')}: between 300 and 50400 (SES's range)")
        seconds = None
    return SetOptions(tls_policy=s.choice("tls_policy", TLS_POLICIES, None), max_delivery_seconds=seconds)


def _quota_limits(r: _Reader) -> QuotaLimits:
    limits = QuotaLimits(max_send_rate=r.get("max_send_rate", int, 0),
                         max_24_hour_send=r.get("max_24_hour_send", int, 0))
    for name in ("max_send_rate", "max_24_hour_send"):
        if getattr(limits, name) < 0:
            r.problems.append(f"{r.key(name)}: 0 (no limit) or a positive number of recipients")
    return limits


def _parse_quotas(q: _Reader) -> Quotas:
    """[quotas] (the account's), [quotas.sets.NAME] and [quotas.users.NAME] (SMTP users)."""
    scoped: dict[str, dict[str, QuotaLimits]] = {}
    for kind in ("sets", "users"):
        table = q.sub(kind)
        scoped[kind] = {}
        for name in list(table.table):
            r = table.sub(name)
            scoped[kind][name] = _quota_limits(r)
            r.finish()
        table.finish()
    account = _quota_limits(q)
    q.finish()
    return Quotas(account, scoped["sets"], scoped["users"])


@dataclass(frozen=True)
class ReputationSettings:
    """[reputation]: the guard that pauses a set whose bounce or complaint rate reaches its threshold."""

    enabled: bool = True
    defaults: Thresholds = field(default_factory=Thresholds)
    sets: dict[str, Thresholds] = field(default_factory=dict)  # [reputation.sets.NAME]: a set's own thresholds
    # How often the guard looks; a minute, as often as Gmail's and SES's dashboards move at all.
    check_interval: float = 60.0
    notify_destinations: bool = True  # a set's destinations receive SendingPaused / SendingResumed events

    def thresholds(self, set_name: str) -> Thresholds:
        return self.sets.get(set_name, self.defaults)


def _thresholds(r: _Reader, base: Thresholds) -> Thresholds:
    t = Thresholds(window_s=r.duration("window", base.window_s), min_volume=r.get("min_volume", int, base.min_volume),
                   bounce_rate=r.get("bounce_rate", float, base.bounce_rate),
                   complaint_rate=r.get("complaint_rate", float, base.complaint_rate))
    if t.window_s < 60:
        r.problems.append(f"{r.key('window')}: at least 1m (outcomes are counted per minute)")
    if t.min_volume < 1:
        r.problems.append(f"{r.key('min_volume')}: at least 1 message")
    for name in ("bounce_rate", "complaint_rate"):
        if not 0 < getattr(t, name) <= 1:
            r.problems.append(f"{r.key(name)}: a fraction between 0 and 1 (0.05 is 5 %)")
    return t


def _parse_reputation(r: _Reader) -> ReputationSettings:
    defaults = _thresholds(r, Thresholds())
    table = r.sub("sets")
    sets = {}
    for name in list(table.table):
        sr = table.sub(name)
        sets[name] = _thresholds(sr, defaults)
        sr.finish()
    table.finish()
    settings = ReputationSettings(enabled=r.get("enabled", bool, True), defaults=defaults, sets=sets,
                                  check_interval=r.duration("check_interval", 60.0),
                                  notify_destinations=r.get("notify_destinations", bool, True))
    if settings.check_interval <= 0:
        r.problems.append("reputation.check_interval: must be a positive duration")
    r.finish()
    return settings


@dataclass(frozen=True)
class SendingSettings:
    """[sending]: identities made with the CLI or the API, their DNS checks and their DKIM keys."""

    require_verified_identity: bool = False  # refuse mail From an identity not verified (SES's sandbox rule)
    # DNS servers for identity checks, "host" or "host:port"; empty: the system's resolver (/etc/resolv.conf)
    nameservers: tuple[tuple[str, int], ...] = ()
    # SES keeps looking for a pending identity's records for 72 hours; every 5 minutes finds them soon after
    # they are published without a query storm (one or two lookups per pending identity).
    check_pending_interval: float = 300.0
    # A verified identity's records are looked up again daily, so a removed DKIM record stops the signing.
    check_verified_interval: float = 86400.0
    dns_timeout: float = 5.0  # per lookup, as `relay dkim check`
    # Identities' DKIM private keys are stored sealed (AES-256-GCM) under the first key of this file (`kid
    # secret-hex` lines, created 0600 on first use). Every node sharing the store needs the same file.
    dkim_keys_file: Path = Path("relay-data/dkim-sealing-keys")


def _nameservers(r: _Reader) -> tuple[tuple[str, int], ...]:
    out = []
    for i, text in enumerate(str(t) for t in r.get("nameservers", list, [])):
        if text.startswith("["):  # [IPv6]:port
            host, _, port = text[1:].partition("]:")
        elif text.count(":") == 1:  # IPv4:port
            host, port = text.split(":")
        else:  # an address alone
            host, port = text, "53"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            r.problems.append(f"{r.key('nameservers')}[{i}]: {text!r} is not an IP address (with :port)")
            continue
        if not port.isdigit() or not 0 < int(port) < 65536:
            r.problems.append(f"{r.key('nameservers')}[{i}]: {text!r} has no valid port")
            continue
        out.append((host, int(port)))
    return tuple(out)


def _parse_sending(r: _Reader, data_dir: Path) -> SendingSettings:
    settings = SendingSettings(
        require_verified_identity=r.get("require_verified_identity", bool, False),
        nameservers=_nameservers(r),
        check_pending_interval=r.duration("check_pending_interval", 300.0),
        check_verified_interval=r.duration("check_verified_interval", 86400.0),
        dns_timeout=r.duration("dns_timeout", 5.0),
        dkim_keys_file=r.path("dkim_keys_file", data_dir / "dkim-sealing-keys") or data_dir / "dkim-sealing-keys",
    )
    for name in ("check_pending_interval", "check_verified_interval", "dns_timeout"):
        if getattr(settings, name) <= 0:
            r.problems.append(f"sending.{name}: must be a positive duration")
    r.finish()
    return settings
