"""`relay tracking-domain verify DOMAIN`: prove that a custom redirect domain reaches this relay's tracking
listener (DNS and any proxy or CDN in front), by fetching a one-time challenge through it."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import aiohttp
from aiohttp.abc import AbstractResolver

from relay import config as config_module
from relay.core import events
from relay.core.challenge import CHALLENGE_PATH, challenge_answer, make_challenge
from relay.core.domains import InvalidTrackingOptions, split_port, validate_tracking_domain
from relay.core.tokens import Keyring
from relay.store import Store, open_store


class _DnsResolver(AbstractResolver):
    """aiohttp resolver backed by dnspython, so `--nameserver` also applies to redirects."""

    def __init__(self, nameserver: str | None, port: int):
        import dns.asyncresolver

        self.resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
        if nameserver:
            self.resolver.nameservers = [nameserver]
            self.resolver.port = port
        self.resolver.lifetime = 5.0
        self.answers: dict[str, list[str]] = {}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        addresses = await self.addresses(host)
        if not addresses:
            raise OSError(f"{host} has no A or AAAA record")
        return [{"hostname": host, "host": ip, "port": port,
                 "family": socket.AF_INET6 if ":" in ip else socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for ip in addresses]

    async def addresses(self, host: str) -> list[str]:
        import dns.exception
        import dns.resolver

        if host not in self.answers:
            found = []
            for rtype in ("A", "AAAA"):
                try:
                    answer = await self.resolver.resolve(host, rtype)
                    found += [r.address for r in answer]
                except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN, dns.resolver.NoNameservers,
                        dns.exception.Timeout):
                    continue
            self.answers[host] = found
        return self.answers[host]

    async def close(self) -> None:
        pass


async def verify_domain(keyring: Keyring, domain: str, nameserver: str | None, dns_port: int,
                        timeout: float = 10.0) -> tuple[str, str, list[str]]:
    """Fetch a fresh challenge through `domain`; (scheme, address, notes) on success, else ValueError."""
    host, port = split_port(domain)
    resolver = _DnsResolver(nameserver, dns_port)
    addresses = await resolver.addresses(host)
    if not addresses:
        raise ValueError(f"{host} does not resolve (no A or AAAA record)")
    token = make_challenge(keyring, int(time.time()))
    expected = challenge_answer(keyring, token, int(time.time()))
    notes = []
    connector = aiohttp.TCPConnector(resolver=resolver, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        for scheme in ("https", "http"):
            url = f"{scheme}://{host}{f':{port}' if port else ''}{CHALLENGE_PATH}{token}"
            try:
                async with http.get(url, max_redirects=3) as resp:
                    body = (await resp.content.read(512)).decode("utf-8", "replace")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                notes.append(f"{scheme}: {type(exc).__name__}: {exc}")
                continue
            parts = body.split()
            if resp.status == 200 and len(parts) >= 2 and parts[0] == "relay-tracking" and parts[1] == expected:
                return scheme, ",".join(addresses), notes
            notes.append(f"{scheme}: HTTP {resp.status}, not this listener's answer")
    raise ValueError("; ".join(notes))


def tracking_domain_command(args) -> int:
    if getattr(args, "tracking_domain_command", "verify") != "verify":
        return 2
    cfg = config_module.load(args.config)
    try:
        domain = validate_tracking_domain(args.domain)
    except InvalidTrackingOptions as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    try:
        scheme, address, notes = asyncio.run(
            verify_domain(cfg.keyring(), domain, args.nameserver, args.port))
    except ValueError as exc:
        print(f"error: {domain} does not reach this tracking listener: {exc}", file=sys.stderr)
        return 1
    host = split_port(domain)[0]
    store = open_store(cfg.store_target)
    try:
        store.submit(Store.verified_domain_work(host, address, scheme, events.iso_ms(int(time.time() * 1000))))\
            .result()
    finally:
        store.close()
    print(f"verified: {host} reaches this tracking listener over {scheme} ({address})")
    for note in notes:
        print(f"  note: {note}")
    return 0
