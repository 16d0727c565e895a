"""One-click unsubscribe headers (RFC 2369 List-Unsubscribe, RFC 8058 List-Unsubscribe-Post) on raw bytes.

Pure: the caller passes the signed URL and mailto address. The two fields are inserted as whole new fields at
the end of the header block; every other byte of the message stays as it was.

Where: at the end of the header block, as list managers (Mailman, Sympa) add their List-* fields. DKIM selects
fields by name, so the position does not matter to the signature; the end keeps trace fields (Received,
Return-Path) on top where RFC 5321 wants them. When the header block does not end with an empty line (a line
that is no field ends it, as the email package reads it), the fields go after the leading trace fields
instead: appended before such a line, a DKIM verifier would read the line as part of our field.

An application that set its own List-Unsubscribe (or List-Unsubscribe-Post) manages unsubscribing itself:
its fields are kept exactly and nothing is added. A second List-Unsubscribe would leave receivers to pick one,
and a Post field of ours would declare one-click for URLs relay does not answer.
"""

from __future__ import annotations

from relay.core.headers import HeaderField, split_header_block, to_crlf

LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
ONE_CLICK = "List-Unsubscribe=One-Click"  # the field's only value, and the POST body it announces
_OWN = ("list-unsubscribe", "list-unsubscribe-post")
_TRACE = ("return-path", "received")
_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters


def unsubscribe_fields(https_url: str, mailto: str | None) -> bytes:
    """The two fields, CRLF-terminated. List-Unsubscribe-Post only with an https URL: RFC 8058 3.1 requires
    one (an http URL still serves RFC 2369 receivers, which open it in a browser: the confirmation page)."""
    uris = [f"<{https_url}>"] + ([f"<mailto:{mailto}>"] if mailto else [])
    out = _folded(LIST_UNSUBSCRIBE, uris)
    if https_url.lower().startswith("https://"):
        out += f"{LIST_UNSUBSCRIBE_POST}: {ONE_CLICK}\r\n"
    return out.encode("ascii")


def _folded(name: str, items: list[str]) -> str:
    """`Name: a, b` folded after a comma wherever a line would pass _WIDTH. A URI is never broken: RFC 2369
    lets readers drop whitespace inside <>, but not every reader does, and lines may reach 998 octets."""
    lines = [f"{name}: {items[0]}"]
    for item in items[1:]:
        lines[-1] += ","
        if len(lines[-1]) + 1 + len(item) > _WIDTH:
            lines.append(f" {item}")
        else:
            lines[-1] += f" {item}"
    return "\r\n".join(lines) + "\r\n"


def add_list_unsubscribe(raw: bytes, https_url: str, mailto: str | None) -> bytes | None:
    """`raw` with List-Unsubscribe and List-Unsubscribe-Post added; None when the application set its own
    (then the message is to go out as it is). Raises ValueError for URLs that cannot be a header value.

    Relay's messages are CRLF; a message with bare LF line endings only (a file given to `relay instrument`,
    say) gets LF in the added fields too, so its other bytes stay as they were."""
    for value in (https_url, mailto or ""):
        if not value.isascii() or any(c in value for c in "<>\r\n\t ,"):
            raise ValueError(f"not usable in List-Unsubscribe: {value!r}")
    if b"\r" not in raw and b"\n" in raw:
        out = add_list_unsubscribe(to_crlf(raw), https_url, mailto)
        return None if out is None else out.replace(b"\r\n", b"\n")
    block = split_header_block(raw)
    if any(f.lname in _OWN for f in block.fields):
        return None
    new = HeaderField(LIST_UNSUBSCRIBE, unsubscribe_fields(https_url, mailto))
    if block.separator:
        at = len(block.fields)
    else:
        at = next((i for i, f in enumerate(block.fields) if f.lname not in _TRACE), len(block.fields))
    if at and not block.fields[at - 1].raw.endswith(b"\r\n"):
        raise ValueError("the header block ends without a line break")
    block.fields.insert(at, new)
    return block.to_bytes()
