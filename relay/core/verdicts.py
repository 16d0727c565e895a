"""Machine verdicts for Open and Click events, with the reasons that led to them (pure).

SES counts every open and click; so does relay. The raw event is never changed. Beside it sits a verdict:
- `human`: no machine signal;
- `proxy`: a real open fetched through a mailbox provider's image proxy (Gmail, Yahoo) — counts as an open;
- `machine`: prefetch or a scanner (Apple Mail Privacy Protection, Safe Links, Proofpoint, Mimecast,
  Barracuda, HEAD probes, clicks seconds after delivery, every link clicked at once).
Every verdict carries its reasons (a code and a human-readable detail), and is a function of the raw hit, a
little context from the store and the operator's lists, so it can be recomputed when lists change.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import re
import socket
from dataclasses import dataclass, field

HUMAN, PROXY, MACHINE = "human", "proxy", "machine"
OPEN, CLICK = "Open", "Click"
APPLE_MPP_UA = "Mozilla/5.0"

# Mailbox providers' image proxies: an open through them is a real open whose IP and UA are the proxy's.
DEFAULT_PROXY_USER_AGENTS = (
    ("google-image-proxy", "GoogleImageProxy"),
    ("yahoo-image-proxy", "YahooMailProxy"),
)


# --- lists ------------------------------------------------------------------------------------------------

class NetworkSet:
    """Labelled IP networks with O(log n) lookup (Apple's egress list has tens of thousands of ranges)."""

    def __init__(self, entries: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = ()):
        self._tables: dict[int, tuple[list[int], list[int], list[int], list[str]]] = {}
        for version in (4, 6):
            rows = sorted(
                (int(n.network_address), int(n.broadcast_address), label) for n, label in entries
                if n.version == version
            )
            starts = [r[0] for r in rows]
            ends = [r[1] for r in rows]
            # running maximum of ends lets a lookup stop scanning back as soon as nothing earlier can contain it
            reach, top = [], -1
            for end in ends:
                top = max(top, end)
                reach.append(top)
            self._tables[version] = (starts, ends, reach, [r[2] for r in rows])
        self.size = len(entries)

    def lookup(self, ip: str) -> str | None:
        """The label of a network containing `ip` (the most specific start), or None."""
        if not self.size:
            return None
        version, value = _ip_int(ip)
        if not version:
            return None
        starts, ends, reach, labels = self._tables[version]
        i = bisect.bisect_right(starts, value) - 1
        while i >= 0 and reach[i] >= value:
            if ends[i] >= value:
                return labels[i]
            i -= 1
        return None

    def __len__(self) -> int:
        return self.size


def _ip_int(ip: str) -> tuple[int, int]:
    """(IP version, address as an integer), (0, 0) when not an address. inet_pton is ~10x cheaper than
    `ipaddress` for the common IPv4 case, and this runs for every recorded hit."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        pass
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return 0, 0
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.version, int(addr)


def parse_networks(text: str, default_label: str) -> tuple[NetworkSet, list[str]]:
    """Networks from a list file, and the problems found (line numbers).

    One network per line, first field; fields split on commas or whitespace, so Apple's published
    `egress-ip-ranges.csv` (`17.0.0.0/24,US,US-CA,Cupertino,`) and `CIDR label` lists both load. A second
    whitespace-separated field is the label; `#` starts a comment.
    """
    entries, problems = [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = re.split(r"[,\s]+", line)
        try:
            net = ipaddress.ip_network(fields[0], strict=False)
        except ValueError:
            problems.append(f"line {lineno}: {fields[0]!r} is not a network")
            continue
        label = fields[1] if "," not in line and len(fields) > 1 else default_label
        entries.append((net, label))
    return NetworkSet(entries), problems


def parse_user_agents(text: str) -> list[tuple[str, str]]:
    """`label: substring` per line (case-insensitive substring match); `#` comments."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        label, sep, needle = line.partition(":")
        if sep and needle.strip():
            rules.append((label.strip(), needle.strip()))
    return rules


@dataclass(frozen=True)
class Lists:
    apple_egress: NetworkSet = field(default_factory=NetworkSet)
    scanner_user_agents: tuple[tuple[str, str], ...] = ()
    scanner_networks: NetworkSet = field(default_factory=NetworkSet)
    proxy_user_agents: tuple[tuple[str, str], ...] = DEFAULT_PROXY_USER_AGENTS

    def __post_init__(self) -> None:
        lowered = tuple((label, needle.lower()) for label, needle in self.scanner_user_agents)
        object.__setattr__(self, "scanner_user_agents", lowered)
        # one alternation over the lower-cased needles instead of a substring test per rule (runs for every hit)
        needles = sorted({needle for _, needle in lowered}, key=len, reverse=True)
        pattern = "|".join(re.escape(n) for n in needles) if needles else "(?!)"
        object.__setattr__(self, "_scanner_re", re.compile(pattern))
        # User-Agent -> rule: a long alternation costs ~10 us a search, and the same few agents make most hits
        object.__setattr__(self, "_agent_rules", {})

    def scanner_agent(self, user_agent: str) -> tuple[str, str] | None:
        """(label, needle) of the first scanner rule whose needle the User-Agent contains."""
        known = self._agent_rules.get(user_agent, False)
        if known is not False:
            return known
        text = user_agent.lower()
        rule = None
        if self._scanner_re.search(text) is not None:
            # the rule listed first wins when several needles occur (the list's order is the operator's)
            rule = next((rule for rule in self.scanner_user_agents if rule[1] in text), None)
        if len(self._agent_rules) >= 8192:
            self._agent_rules.clear()
        self._agent_rules[user_agent] = rule
        return rule


@dataclass(frozen=True)
class Thresholds:
    early_click_seconds: float = 10.0  # a click this soon after delivery is a scanner following links
    burst_window_seconds: float = 5.0  # ... and so is clicking this many different links within this window
    burst_min_links: int = 3


# --- facts and verdicts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """One recorded Open or Click, as received."""

    type: str
    method: str
    ip: str
    user_agent: str
    time_ms: int
    link: str = ""


@dataclass(frozen=True)
class Context:
    """What the store knows around a hit."""

    delivered_ms: int | None = None  # the Delivery event of this copy, else the message's acceptance time
    delivered_from: str = "delivery"  # "delivery" | "message"
    # the most different links of this copy clicked inside one burst window holding this click
    # (`burst_sizes` computes it for all of a copy's clicks at once)
    burst_links: int = 1
    link_count: int | None = None  # links wrapped in the message, when known


@dataclass(frozen=True)
class Reason:
    code: str
    detail: str
    verdict: str  # the verdict this reason argues for

    def to_json(self) -> dict:
        return {"code": self.code, "detail": self.detail, "verdict": self.verdict}


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reasons: tuple[Reason, ...]

    @property
    def is_machine(self) -> bool:
        return self.verdict == MACHINE

    def reasons_json(self) -> list[dict]:
        return [r.to_json() for r in self.reasons]


def classify(hit: Hit, ctx: Context, lists: Lists, th: Thresholds = Thresholds()) -> Verdict:
    reasons = hit_reasons(hit, lists)
    if hit.type == CLICK:
        reasons += click_timing_reasons(hit, ctx, th)
    return verdict_of(reasons)


def hit_reasons(hit: Hit, lists: Lists) -> tuple[Reason, ...]:
    """The reasons that depend only on the hit's type, method, IP and User-Agent (and the lists): a caller
    judging many hits may keep them per (type, method, ip, user agent)."""
    return (*_request_reasons(hit), *_agent_reasons(hit, lists), *_network_reasons(hit, lists))


def verdict_of(reasons: tuple[Reason, ...]) -> Verdict:
    if any(r.verdict == MACHINE for r in reasons):
        return Verdict(MACHINE, reasons)
    if any(r.verdict == PROXY for r in reasons):
        return Verdict(PROXY, reasons)
    return Verdict(HUMAN, reasons)


def _request_reasons(hit: Hit) -> list[Reason]:
    out = []
    if hit.method == "HEAD":
        out.append(Reason("head-request", "HEAD request: a link checker, not a person viewing", MACHINE))
    if not hit.user_agent.strip():
        out.append(Reason("no-user-agent", "no User-Agent header", MACHINE))
    return out


def _agent_reasons(hit: Hit, lists: Lists) -> list[Reason]:
    out = []
    if hit.type == OPEN:
        ua_lower = hit.user_agent.lower()
        for label, needle in lists.proxy_user_agents:
            if needle.lower() in ua_lower:
                out.append(Reason(label, f"image proxy ({needle} in User-Agent): a real open via the provider",
                                  PROXY))
                break
    rule = lists.scanner_agent(hit.user_agent)
    if rule is not None:
        out.append(Reason("scanner-user-agent", f"{rule[0]}: User-Agent contains {rule[1]!r}", MACHINE))
    return out


def _network_reasons(hit: Hit, lists: Lists) -> list[Reason]:
    out = []
    if hit.user_agent == APPLE_MPP_UA and lists.apple_egress.lookup(hit.ip) is not None:
        out.append(Reason("apple-mpp", f"User-Agent exactly {APPLE_MPP_UA!r} from Apple's egress range "
                                       f"({hit.ip}): Mail Privacy Protection prefetch", MACHINE))
    label = lists.scanner_networks.lookup(hit.ip)
    if label is not None:
        out.append(Reason("scanner-network", f"{label}: {hit.ip} is in a security scanner's network", MACHINE))
    return out


def click_timing_reasons(hit: Hit, ctx: Context, th: Thresholds) -> tuple[Reason, ...]:
    """A click's reasons from its timing: soon after delivery, or in a burst of different links."""
    out = []
    if ctx.delivered_ms is not None:
        delay = (hit.time_ms - ctx.delivered_ms) / 1000
        if delay < th.early_click_seconds:
            what = "delivery" if ctx.delivered_from == "delivery" else "the message was accepted"
            out.append(Reason("early-click", f"clicked {max(delay, 0):.1f} s after {what} "
                                             f"(< {th.early_click_seconds:g} s)", MACHINE))
    needed = th.burst_min_links if ctx.link_count is None else max(2, min(th.burst_min_links, ctx.link_count))
    if ctx.burst_links >= needed:
        out.append(Reason("link-burst", f"{ctx.burst_links} different links of this message clicked within "
                                        f"{th.burst_window_seconds:g} s", MACHINE))
    return tuple(out)


def burst_sizes(clicks: list[tuple[int, str]], window_ms: float) -> list[int]:
    """For each (time_ms, link) click of one copy: the most different links clicked inside any window of
    `window_ms` that contains it. O(n log n): a flood of clicks on one copy must not cost O(n^2)."""
    if len({link for _, link in clicks}) <= 1:  # one link (a flood on one URL, say): every window holds one
        return [1] * len(clicks)
    order = sorted(range(len(clicks)), key=lambda i: clicks[i][0])
    times = [clicks[i][0] for i in order]
    # distinct links in the window starting at each click (two pointers over the sorted clicks)
    starts: list[tuple[int, int]] = []  # (distinct links, index of the window's last click)
    counts: dict[str, int] = {}
    end = 0
    for i in range(len(order)):
        while end < len(order) and times[end] <= times[i] + window_ms:
            link = clicks[order[end]][1]
            counts[link] = counts.get(link, 0) + 1
            end += 1
        starts.append((len(counts), end - 1))
        link = clicks[order[i]][1]
        counts[link] -= 1
        if not counts[link]:
            del counts[link]
    # each click takes the best window that started at or before it and still reaches it
    sizes = [1] * len(clicks)
    live: list[tuple[int, int]] = []  # max-heap of (-distinct, last index)
    for j in range(len(order)):
        heapq.heappush(live, (-starts[j][0], starts[j][1]))
        while live[0][1] < j:
            heapq.heappop(live)
        sizes[order[j]] = -live[0][0]
    return sizes
