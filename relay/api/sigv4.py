"""AWS Signature Version 4 verification (pure): the server side of botocore's `SigV4Auth`.

Only header-signed requests are accepted (the SES CLI and SDKs never presign their calls). The caller
hands in the request exactly as received: method, raw path and query (still percent-encoded), the headers
(repeated names kept), the body bytes, the configured keys and the clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "ses"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_AUTH_RE = re.compile(r"^AWS4-HMAC-SHA256\s+(.*)$", re.S)
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS Secret"
            " Access Key and signing method. Consult the service documentation for details.")


class AuthError(Exception):
    """A refused request: AWS's error code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 403):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class Request:
    method: str
    raw_path: str  # as sent, percent-encoded, without the query
    raw_query: str  # as sent, without the "?"
    headers: tuple[tuple[str, str], ...]  # (name, value) in arrival order
    body: bytes

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Authorization:
    access_key: str
    date: str  # yyyymmdd
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str | None) -> Authorization:
    if not value:
        raise AuthError("MissingAuthenticationToken", "Request is missing Authentication Token")
    m = _AUTH_RE.match(value.strip())
    if not m:
        raise AuthError("IncompleteSignature", f"Unsupported authorization scheme (only {ALGORITHM}).", 400)
    parts = {}
    for item in m.group(1).split(","):
        key, sep, val = item.strip().partition("=")
        if sep:
            parts[key] = val
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not parts.get(k)]
    if missing:
        raise AuthError("IncompleteSignature", f"Authorization header requires {', '.join(missing)}.", 400)
    scope = parts["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise AuthError("IncompleteSignature", "Credential must have the form"
                        " <AccessKeyId>/<yyyymmdd>/<region>/<service>/aws4_request.", 400)
    if not re.fullmatch(r"[0-9a-f]{64}", parts["Signature"]):
        raise AuthError("IncompleteSignature", "Signature must be 64 lower-case hex digits.", 400)
    return Authorization(scope[0], scope[1], scope[2], scope[3], tuple(parts["SignedHeaders"].split(";")),
                         parts["Signature"])


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, as botocore normalises the path before signing."""
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if len(out) > 1:
                out.pop()
        elif seg != ".":
            out.append(seg)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


def canonical_uri(raw_path: str) -> str:
    # Non-S3 services encode the already-encoded path once more (%40 -> %2540).
    return quote(remove_dot_segments(raw_path or "/"), safe="/~")


def canonical_query(raw_query: str) -> str:
    pairs = []
    for item in raw_query.split("&") if raw_query else []:
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_headers(request: Request, signed: Iterable[str]) -> str:
    lines = []
    for name in signed:
        values = request.header_values(name)
        lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


def payload_hash(request: Request) -> str:
    declared = request.header("x-amz-content-sha256")
    actual = hashlib.sha256(request.body).hexdigest()
    if declared is None:
        return actual
    if declared != "UNSIGNED-PAYLOAD" and declared != actual:
        raise AuthError("XAmzContentSHA256Mismatch",
                        "The provided 'x-amz-content-sha256' header does not match what was computed.", 400)
    return declared


def canonical_request(request: Request, signed: tuple[str, ...]) -> str:
    return "\n".join([request.method.upper(), canonical_uri(request.raw_path), canonical_query(request.raw_query),
                      canonical_headers(request, signed), ";".join(signed), payload_hash(request)])


def string_to_sign(amz_date: str, scope: str, creq: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode("utf-8")).hexdigest()])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def _request_time(request: Request, auth: Authorization, now: datetime, max_skew: float) -> str:
    amz_date = request.header("x-amz-date")
    if amz_date is None:
        raise AuthError("IncompleteSignature", "Authorization requires an X-Amz-Date header.", 400)
    try:
        when = datetime.strptime(amz_date.strip(), _DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise AuthError("IncompleteSignature", f"X-Amz-Date {amz_date!r} is not yyyymmddThhmmssZ.", 400) from exc
    if amz_date[:8] != auth.date:
        raise AuthError("SignatureDoesNotMatch", f"Date in Credential scope does not match YYYYMMDD from ISO-8601"
                        f" version of date from HTTP: '{auth.date}' != '{amz_date[:8]}'.")
    if abs((now - when).total_seconds()) > max_skew:
        raise AuthError("SignatureDoesNotMatch", f"Signature expired: {amz_date} is now earlier or later than"
                        f" {now.strftime(_DATE_FORMAT)} by more than {int(max_skew // 60)} minutes.")
    return amz_date.strip()


def verify(request: Request, keys: Mapping[str, str], now: datetime, regions: Iterable[str] = (),
           max_skew: float = 900.0) -> str:
    """The access key id that signed `request`, or AuthError. `keys` maps access key ids to secrets;
    `regions` restricts the credential scope's region (empty: any)."""
    if "x-amz-algorithm" in request.raw_query.lower():
        raise AuthError("AccessDenied", "Presigned (query string) requests are not accepted.")
    auth = parse_authorization(request.header("authorization"))
    if auth.service != SERVICE:
        raise AuthError("SignatureDoesNotMatch", f"Credential should be scoped to correct service: '{SERVICE}'.")
    regions = tuple(regions)
    if regions and auth.region not in regions:
        raise AuthError("SignatureDoesNotMatch", f"Credential should be scoped to a valid region, not"
                        f" '{auth.region}'.")
    amz_date = _request_time(request, auth, now, max_skew)
    secret = keys.get(auth.access_key)
    if secret is None:
        raise AuthError("InvalidClientTokenId", "The security token included in the request is invalid.")
    if request.header("x-amz-security-token") is not None:
        # relay issues no session credentials: a token can only come from somewhere else.
        raise AuthError("InvalidClientTokenId", "The security token included in the request is invalid.")
    signed = tuple(h.lower() for h in auth.signed_headers)
    if "host" not in signed:
        raise AuthError("SignatureDoesNotMatch", "'Host' must be a signed header.")
    absent = [h for h in signed if not request.header_values(h)]
    if absent:
        raise AuthError("SignatureDoesNotMatch", f"Signed header(s) missing from the request: {', '.join(absent)}.")
    creq = canonical_request(request, signed)
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    key = signing_key(secret, auth.date, auth.region, auth.service)
    expected = hmac.new(key, string_to_sign(amz_date, scope, creq).encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, auth.signature):
        raise AuthError("SignatureDoesNotMatch", MISMATCH)
    return auth.access_key
