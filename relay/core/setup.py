"""The text `relay init` writes and prints, from plain facts (pure): a production configuration with absolute
paths, the DNS records to publish, and the next steps.

The configuration leaves out every key whose default is right for production, so the file stays short and a
path derived from data_dir (captured mail) follows data_dir when an operator moves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The smarthost's TLS by its port, as mail clients guess it: 465 speaks TLS from the first byte (RFC 8314),
# 587 (submission) requires STARTTLS, anything else (25) uses STARTTLS when offered.
UPSTREAM_TLS_BY_PORT = {465: "implicit", 587: "starttls"}
DEFAULT_UPSTREAM_PORT = 587


@dataclass(frozen=True)
class Setup:
    """What `relay init` was told, and where it put the keys (absolute paths)."""

    config_dir: Path
    data_dir: Path
    domain: str
    tracking_host: str
    selector: str
    hostname: str
    smtp_listen: str
    upstream_host: str | None = None
    upstream_port: int = DEFAULT_UPSTREAM_PORT
    bounce_domain: str | None = None
    user: str | None = None

    @property
    def config_file(self) -> Path:
        return self.config_dir / "relay.toml"

    @property
    def dkim_key(self) -> Path:
        return self.config_dir / "dkim" / f"{self.domain}.{self.selector}.pem"

    @property
    def tracking_keys(self) -> Path:
        return self.config_dir / "tracking-keys"


def _q(value: str | Path) -> str:
    """A TOML basic string."""
    return json.dumps(str(value))


def render_config(s: Setup) -> str:
    """The production configuration for `s`: every key an operator must decide, with why, and nothing else."""
    return "\n".join([
        f"# relay for {s.domain}, written by `relay init`. Every key: docs/configuration.md. Check it with",
        "# `relay check --production` (the systemd unit runs it before each start); reload with `systemctl reload"
        " relay`.",
        "",
        "[relay]",
        f"data_dir = {_q(s.data_dir)}  # database and queue (the unit's StateDirectory); captured mail follows it",
        f"hostname = {_q(s.hostname)}  # relay's name in SMTP greetings, added Message-IDs and events",
        "",
        "[smtp]",
        f"listen = {_q(s.smtp_listen)}  # where your applications send; 0.0.0.0:587 serves other hosts, which",
        "# then log in as [[smtp.users]] (`relay passwd` makes the hash) over STARTTLS:",
        f'# tls_certificate = {_q(s.config_dir / "tls" / "fullchain.pem")}',
        f'# tls_key = {_q(s.config_dir / "tls" / "privkey.pem")}',
        "# [[smtp.users]]",
        '# username = "app"',
        '# password_hash = "scrypt$16384$8$1$..."',
        "",
        _upstream(s),
        "",
        "[tracking]",
        '# Your reverse proxy (nginx, Caddy) terminates TLS for the tracking host and forwards to this listener',
        "# with Host, X-Forwarded-For and X-Forwarded-Proto (docs/tracking.md, \"Behind a reverse proxy\").",
        'listen = "127.0.0.1:8080"',
        f"default_host = {_q(s.tracking_host)}  # the host of every pixel and wrapped link",
        f"https_hosts = [{_q(s.tracking_host)}]  # the proxy serves it over https, so links are https://",
        'trusted_proxies = ["127.0.0.1/32", "::1/128"]  # believe X-Forwarded-For from the proxy only',
        f"keys_file = {_q(s.tracking_keys)}  # signs every link: back it up; old links need it",
        "",
        "[dkim]",
        "[[dkim.keys]]  # publish its TXT record before sending (`relay dkim check` compares)",
        f"domain = {_q(s.domain)}",
        f"selector = {_q(s.selector)}",
        f"private_key_file = {_q(s.dkim_key)}",
        "",
        *_bounces(s),
        "# A message names its set in X-SES-CONFIGURATION-SET; mail without one is relayed and recorded, untracked.",
        "[configuration_sets.marketing]",
        "open_tracking = true",
        "click_tracking = true",
        "",
        "[configuration_sets.transactional]",
        "open_tracking = false",
        "click_tracking = false",
        "",
        "[metrics]",
        'listen = "127.0.0.1:9108"  # Prometheus; keep it on loopback (no login)',
        "",
        "[retention]",
        "days = 60  # events older than this are deleted, as SES keeps 60 days; 0 keeps everything",
        "",
    ])


def _upstream(s: Setup) -> str:
    if s.upstream_host is None:
        return "\n".join([
            "[upstream]",
            "# No smarthost was given to `relay init`: every message is written to a file under data_dir/delivered",
            "# and delivered nowhere; `relay check --production` refuses this. Name your provider or smarthost:",
            'type = "capture"',
            '# type = "smtp"',
            '# host = "smtp.example.net"',
            f"# port = {DEFAULT_UPSTREAM_PORT}",
            '# tls = "starttls"',
            '# username = "relay"',
            f'# password_file = {_q(s.config_dir / "upstream-password")}',
        ])
    return "\n".join([
        "[upstream]",
        'type = "smtp"',
        f"host = {_q(s.upstream_host)}",
        f"port = {s.upstream_port}",
        f"tls = {_q(UPSTREAM_TLS_BY_PORT.get(s.upstream_port, 'opportunistic'))}",
        "# Credentials, when the smarthost wants a login:",
        '# username = "relay"',
        f'# password_file = {_q(s.config_dir / "upstream-password")}',
    ])


def _bounces(s: Setup) -> list[str]:
    if s.bounce_domain is None:
        return []
    return ["[bounces]  # bounces and complaints come back to relay's SMTP listener (its MX, port 25)",
            f"domain = {_q(s.bounce_domain)}", ""]


def dns_records(s: Setup, dkim_record_line: str) -> list[str]:
    """The records to publish, zone-file style, each with what it is for."""
    records = [
        "; DKIM: receivers check relay's signatures with this key",
        dkim_record_line,
        "; Tracking: the host in every pixel and link, pointing at your reverse proxy (or use an A/AAAA record)",
        f"{s.tracking_host}. IN CNAME {s.hostname}.",
        f"; SPF: your smarthost sends the mail, so {s.domain}'s SPF record must allow its addresses, e.g.",
        f'{s.domain}. IN TXT "v=spf1 include:<your smarthost\'s SPF domain> ~all"',
    ]
    if s.bounce_domain:
        records += [
            "; Bounces and complaints: their MX is relay's SMTP listener on port 25; SPF for the envelope sender",
            f"{s.bounce_domain}. IN MX 10 {s.hostname}.",
            f'{s.bounce_domain}. IN TXT "v=spf1 include:<your smarthost\'s SPF domain> -all"',
        ]
    return records


def next_steps(s: Setup, relay_command: str) -> list[str]:
    """What the operator does after `relay init`, in order."""
    as_user = f" --user {s.user}" if s.user else ""
    steps = []
    if s.upstream_host is None:
        steps.append(f"Name your smarthost in [upstream] of {s.config_file} (type, host, port, login).")
    steps += [
        f"Publish the DNS records above; `{relay_command} dkim check --config {s.config_file} --domain"
        f" {s.domain}` says when the DKIM record is live.",
        f"Serve https://{s.tracking_host}/ from a reverse proxy that forwards to 127.0.0.1:8080 (docs/tracking.md).",
        f"Check the configuration as the service will use it: {relay_command} check --production --config "
        f"{s.config_file}{as_user}",
        "Install the unit from the source (systemd/relay.service) into /etc/systemd/system/, then systemctl"
        " daemon-reload && systemctl enable --now relay (docs/operating.md, \"The systemd unit\").",
        f"Point your applications at SMTP {s.smtp_listen} with the header X-SES-CONFIGURATION-SET: marketing.",
        f"Back up {s.config_dir} (the keys) and the database under {s.data_dir} (docs/operating.md, \"Backups\").",
    ]
    return [f"{i}. {step}" for i, step in enumerate(steps, 1)]
