"""Identities over the API: v2's email identities with their DKIM attributes and v1's Verify*/Get*/Delete
operations, over relay/identities.py. Registered by relay/api/v1.py and relay/api/v2.py.

The DNS records a domain publishes come back as SES shapes them (DkimAttributes.Tokens: the selector of the key's
`<token>._domainkey.<domain>` TXT record; v1's VerificationToken) and, whole, in relay's own `DnsRecords` member
(name, type, value), which SDKs ignore and `relay identity show` prints. No answer carries a private key.
"""

from __future__ import annotations

import re

from relay import identities
from relay.api.account import xml
from relay.api.common import (
    Context,
    invalid,
    key_token,
    page_size,
    query_bool,
    required,
    structure,
    token_key,
    v2_bool,
)
from relay.api.errors import enum_constraint
from relay.core import identities as core
from relay.core.events import ms_from_iso
from relay.resolve import Resolver
from relay.sets import SesError
from relay.store.identities import IdentityRow, identity_row

_SEG = r"([^/]+)"
ORIGINS = (core.GENERATED, core.EXTERNAL)
V1_TYPES = {"EmailAddress": core.EMAIL_ADDRESS, "Domain": core.DOMAIN}


def _epoch(iso: str | None) -> float | None:
    return ms_from_iso(iso) / 1000 if iso else None


def _origin(value: object, where: str) -> str:
    """SES's origins: EXTERNAL (the owner's key) or relay's own key (AWS_SES and its regional variants)."""
    if value is None or (isinstance(value, str) and value.startswith(core.GENERATED)):
        return core.GENERATED
    if value == core.EXTERNAL:
        return core.EXTERNAL
    raise invalid(value, where, enum_constraint(ORIGINS))


# --- shaping ------------------------------------------------------------------------------------------------------

def dkim_json(ctx: Context, row: IdentityRow | None) -> dict:
    """DkimAttributes of a domain row (an address shows its domain's), as they are."""
    if row is None or row.kind != core.DOMAIN or not row.dkim_selector:
        return {"SigningEnabled": False, "Status": core.NOT_STARTED}
    data: dict = {"SigningEnabled": row.dkim_signing, "Status": row.dkim_status, "Tokens": [row.dkim_selector],
                  "SigningAttributesOrigin": row.dkim_origin or core.GENERATED}
    key = identities.unsealed(ctx.config, row)
    if key is not None:
        data["CurrentSigningKeyLength"] = core.key_length(key)
    if row.dkim_key_created_at:
        data["LastKeyGenerationTimestamp"] = _epoch(row.dkim_key_created_at)
    return data


def identity_json(ctx: Context, row: IdentityRow) -> dict:
    status = identities.status_of(identities.verified_identities(ctx.config, ctx.store), row)
    domain_row = row if row.kind == core.DOMAIN else ctx.store.read(identity_row, core.domain_of(row.identity))
    data: dict = {"IdentityType": row.kind, "FeedbackForwardingStatus": True,
                  "VerifiedForSendingStatus": status == core.SUCCESS, "VerificationStatus": status,
                  "DkimAttributes": dkim_json(ctx, domain_row),
                  "Policies": {}, "Tags": []}
    info = {k: v for k, v in (("LastCheckedTimestamp", _epoch(row.checked_at)),
                              ("LastSuccessTimestamp", _epoch(row.verified_at))) if v is not None}
    if info:
        data["VerificationInfo"] = info
    default = _default_set(ctx, row.identity)
    if default:
        data["ConfigurationSetName"] = default
    data["DnsRecords"] = [r.json() for r in identities.dns_records(ctx.config, row)]  # relay's: what to publish
    return data


def _default_set(ctx: Context, identity: str) -> str | None:
    found = Resolver(ctx.config, ctx.store).model().identities.get(identity)
    return found[0] if found else None


def file_identity_json(ctx: Context, identity: str) -> dict:
    """An identity of the file: verified by definition, read-only; a [[dkim.keys]] domain signs."""
    domain_keys = [k for k in ctx.config.dkim.keys if k.domain.lower() == core.domain_of(identity)]
    dkim = ({"SigningEnabled": True, "Status": core.SUCCESS, "Tokens": [k.selector for k in domain_keys],
             "SigningAttributesOrigin": core.EXTERNAL} if domain_keys else
            {"SigningEnabled": False, "Status": core.NOT_STARTED})
    data: dict = {"IdentityType": identities.kind_of(identity), "FeedbackForwardingStatus": True,
                  "VerifiedForSendingStatus": True, "VerificationStatus": core.SUCCESS, "DkimAttributes": dkim,
                  "Policies": {}, "Tags": []}
    default = _default_set(ctx, identity)
    if default:
        data["ConfigurationSetName"] = default
    return data


# --- v2 -----------------------------------------------------------------------------------------------------------

def create_identity(ctx: Context, call) -> dict:
    name = str(required(call.body.get("EmailIdentity"), "emailIdentity"))
    attrs = structure(call.body.get("DkimSigningAttributes"), "dkimSigningAttributes")
    origin = _origin(attrs.get("DomainSigningAttributesOrigin"), "dkimSigningAttributes.domainSigningAttributesOrigin")
    key = attrs.get("DomainSigningPrivateKey")
    if origin == core.EXTERNAL and not key:
        raise SesError("BadRequestException", "DomainSigningPrivateKey is required for the EXTERNAL origin.")
    row = identities.create(ctx.config, ctx.store, name, selector=attrs.get("DomainSigningSelector"),
                            private_key=key, length=attrs.get("NextSigningKeyLength"),
                            set_name=call.body.get("ConfigurationSetName") or None)
    data = identity_json(ctx, row)
    return {k: data[k] for k in ("IdentityType", "VerifiedForSendingStatus", "DkimAttributes", "DnsRecords")}


def get_identity(ctx: Context, call) -> dict:
    identity, _ = identities.normalised(call.params[0])
    if identity in identities.file_identities(ctx.config):
        return file_identity_json(ctx, identity)
    return identity_json(ctx, identities.row_of(ctx.config, ctx.store, identity))


def list_identities(ctx: Context, call) -> dict:
    params = {**call.body, **call.query}  # a GET's query, or (botocore 1.44 on) a POST's body
    size = page_size(params.get("PageSize"), "pageSize")
    token = params.get("NextToken")
    after = token_key(token) if token else ""
    rows = [r for r in identities.listing(ctx.config, ctx.store) if r["IdentityName"] > after]
    out: dict = {"EmailIdentities": [{"IdentityType": r["IdentityType"], "IdentityName": r["IdentityName"],
                                      "SendingEnabled": True, "VerificationStatus": r["VerificationStatus"]}
                                     for r in rows[:size]]}
    if len(rows) > size:
        out["NextToken"] = key_token(rows[size - 1]["IdentityName"])
    return out


def delete_identity(ctx: Context, call) -> dict:
    identities.delete(ctx.config, ctx.store, call.params[0])
    return {}


def put_dkim(ctx: Context, call) -> dict:
    identities.set_dkim_signing(ctx.config, ctx.store, call.params[0],
                                v2_bool(call.body.get("SigningEnabled"), "signingEnabled"))
    return {}


def put_dkim_signing(ctx: Context, call) -> dict:
    origin = _origin(required(call.body.get("SigningAttributesOrigin"), "signingAttributesOrigin"),
                     "signingAttributesOrigin")
    attrs = structure(call.body.get("SigningAttributes"), "signingAttributes")
    row = identities.set_signing_key(ctx.config, ctx.store, call.params[0], origin,
                                     attrs.get("DomainSigningSelector"), attrs.get("DomainSigningPrivateKey"),
                                     attrs.get("NextSigningKeyLength"))
    return {"DkimStatus": row.dkim_status, "DkimTokens": [row.dkim_selector],
            "DnsRecords": [r.json() for r in identities.dns_records(ctx.config, row)]}


def put_mail_from(ctx: Context, call) -> dict:
    identities.row_of(ctx.config, ctx.store, call.params[0])
    raise SesError("BadRequestException", "relay cannot honour a MAIL FROM domain per identity: its copies' return"
                   " path is the [bounces] domain (VERP), which relay's listener receives the bounces for.")


V2_ROUTES = [
    ("POST", re.compile(r"^/v2/email/identities$"), "CreateEmailIdentity"),
    ("GET", re.compile(r"^/v2/email/identities$"), "ListEmailIdentities"),
    # botocore 1.44 moved the listing to a POST with its parameters in the body; both are in use.
    ("POST", re.compile(r"^/v2/email/list-identities$"), "ListEmailIdentities"),
    ("GET", re.compile(rf"^/v2/email/identities/{_SEG}$"), "GetEmailIdentity"),
    ("DELETE", re.compile(rf"^/v2/email/identities/{_SEG}$"), "DeleteEmailIdentity"),
    ("PUT", re.compile(rf"^/v2/email/identities/{_SEG}/dkim$"), "PutEmailIdentityDkimAttributes"),
    ("PUT", re.compile(rf"^/v2/email/identities/{_SEG}/dkim/signing$"), "PutEmailIdentityDkimSigningAttributes"),
    ("PUT", re.compile(rf"^/v2/email/identities/{_SEG}/mail-from$"), "PutEmailIdentityMailFromAttributes"),
]
V2_HANDLERS = {
    "CreateEmailIdentity": create_identity, "ListEmailIdentities": list_identities,
    "GetEmailIdentity": get_identity, "DeleteEmailIdentity": delete_identity,
    "PutEmailIdentityDkimAttributes": put_dkim, "PutEmailIdentityDkimSigningAttributes": put_dkim_signing,
    "PutEmailIdentityMailFromAttributes": put_mail_from,
}


# --- v1 -----------------------------------------------------------------------------------------------------------

def _members(name: str, items: list[str]) -> str:
    inner = "".join(xml("member", i) for i in items)
    return f"<{name}>{inner}</{name}>" if inner else f"<{name}/>"


def _v1(call):
    """v1 runs SesError's v2 codes as v1's generic InvalidParameterValue (v1 models no identity errors)."""
    def run(ctx: Context, p: dict) -> str:
        try:
            return call(ctx, p)
        except SesError as exc:
            if exc.code in ("BadRequestException", "AlreadyExistsException", "NotFoundException"):
                raise SesError("InvalidParameterValue", exc.message) from exc
            raise
    return run


def _list(value: object) -> list:
    return value if isinstance(value, list) else [] if value in (None, "") else [value]


def verify_domain(ctx: Context, p: dict) -> str:
    row = identities.ensure_token(ctx.config, ctx.store, str(required(p.get("Domain"), "domain")))
    return xml("VerificationToken", row.verification_token)


def verify_email(ctx: Context, p: dict) -> str:
    address = str(required(p.get("EmailAddress"), "emailAddress"))
    if identities.normalised(address)[1] != core.EMAIL_ADDRESS:
        raise SesError("InvalidParameterValue", f"{address} is not an email address.")
    identities.create(ctx.config, ctx.store, address, exists_ok=True)
    return ""


def list_v1(ctx: Context, p: dict) -> str:
    kind = p.get("IdentityType") or None
    if kind is not None and kind not in V1_TYPES:
        raise invalid(kind, "identityType", enum_constraint(tuple(V1_TYPES)))
    size = page_size(p.get("MaxItems"), "maxItems")
    after = token_key(p["NextToken"]) if p.get("NextToken") else ""
    names = [r["IdentityName"] for r in identities.listing(ctx.config, ctx.store)
             if r["IdentityName"] > after and (kind is None or r["IdentityType"] == V1_TYPES[kind])]
    out = _members("Identities", names[:size])
    return out + (xml("NextToken", key_token(names[size - 1])) if len(names) > size else "")


def _rows(ctx: Context, p: dict) -> list[tuple[str, IdentityRow | None]]:
    """Each identity asked for (at most 100, as SES), with its row; the file's and unknown ones have none."""
    names = [str(n) for n in _list(p.get("Identities"))]
    if len(names) > 100:
        raise invalid(len(names), "identities", "Member must have length less than or equal to 100")
    return [(n, ctx.store.read(identity_row, identities.normalised(n)[0]) if _valid(n) else None) for n in names]


def _valid(name: str) -> bool:
    try:
        core.normalise(name)
    except core.InvalidIdentity:
        return False
    return True


def verification_attributes(ctx: Context, p: dict) -> str:
    entries = []
    files = identities.file_identities(ctx.config)
    verified = identities.verified_identities(ctx.config, ctx.store)
    for name, row in _rows(ctx, p):
        if row is not None:
            value = xml("VerificationStatus", core.V1_STATUS[identities.status_of(verified, row)])
            if row.verification_token:
                value += xml("VerificationToken", row.verification_token)
        elif _valid(name) and identities.normalised(name)[0] in files:
            value = xml("VerificationStatus", "Success")
        else:
            continue  # SES leaves out what it does not know
        entries.append(f"<entry>{xml('key', name)}<value>{value}</value></entry>")
    return f"<VerificationAttributes>{''.join(entries)}</VerificationAttributes>"


def verify_dkim(ctx: Context, p: dict) -> str:
    row = identities.ensure_dkim(ctx.config, ctx.store, str(required(p.get("Domain"), "domain")))
    return _members("DkimTokens", [row.dkim_selector])


def dkim_attributes(ctx: Context, p: dict) -> str:
    entries = []
    for name, row in _rows(ctx, p):
        domain_row = row if row is not None and row.kind == core.DOMAIN else (
            ctx.store.read(identity_row, core.domain_of(identities.normalised(name)[0])) if _valid(name) else None)
        if row is None and domain_row is None:
            continue
        attrs = dkim_json(ctx, domain_row)
        value = (xml("DkimEnabled", attrs["SigningEnabled"])
                 + xml("DkimVerificationStatus", core.V1_STATUS[attrs["Status"]])
                 + _members("DkimTokens", attrs.get("Tokens", [])))
        entries.append(f"<entry>{xml('key', name)}<value>{value}</value></entry>")
    return f"<DkimAttributes>{''.join(entries)}</DkimAttributes>"


def delete_v1(ctx: Context, p: dict) -> str:
    identities.delete(ctx.config, ctx.store, str(required(p.get("Identity"), "identity")), missing_ok=True)
    return ""


def set_dkim_enabled(ctx: Context, p: dict) -> str:
    identities.set_dkim_signing(ctx.config, ctx.store, str(required(p.get("Identity"), "identity")),
                                query_bool(p.get("DkimEnabled"), "dkimEnabled"))
    return ""


V1_ACTIONS = {name: _v1(fn) for name, fn in {
    "VerifyDomainIdentity": verify_domain, "VerifyEmailIdentity": verify_email, "VerifyEmailAddress": verify_email,
    "ListIdentities": list_v1, "GetIdentityVerificationAttributes": verification_attributes,
    "VerifyDomainDkim": verify_dkim, "GetIdentityDkimAttributes": dkim_attributes, "DeleteIdentity": delete_v1,
    "SetIdentityDkimEnabled": set_dkim_enabled,
}.items()}
