"""Identities made with the CLI or the API (email_identities), their DKIM keys sealed (relay.core.identities),
and their checks. Every change that a running relay acts on (an identity, its status, its key, its signing
switch) moves configuration_version, so every node signs and checks with it for the next message."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from relay.store.configuration import bump_configuration_version


@dataclass(frozen=True)
class IdentityRow:
    identity: str
    kind: str
    created_at: str
    verification_token: str | None = None
    verification_status: str = "PENDING"
    verified_at: str | None = None
    checked_at: str | None = None
    check_detail: str = ""
    dkim_signing: bool = True
    dkim_status: str = "NOT_STARTED"
    dkim_origin: str | None = None
    dkim_selector: str | None = None
    dkim_algorithm: str | None = None
    dkim_key: str | None = None  # sealed: never in a response or a log
    dkim_key_created_at: str | None = None
    mail_from_domain: str | None = None
    mail_from_behavior: str | None = None
    mail_from_status: str | None = None

    def __repr__(self) -> str:  # a repr in a log line shows no key, sealed or not
        return f"IdentityRow({self.identity!r}, {self.kind}, {self.verification_status}, dkim {self.dkim_status})"


COLUMNS = tuple(f.name for f in fields(IdentityRow))
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM email_identities"


def _row(values: tuple) -> IdentityRow:
    row = IdentityRow(*values)
    return row if isinstance(row.dkim_signing, bool) else replace(row, dkim_signing=bool(row.dkim_signing))


def identity_rows(conn) -> list[IdentityRow]:
    return [_row(r) for r in conn.execute(_SELECT + " ORDER BY identity")]


def identity_row(conn, identity: str) -> IdentityRow | None:
    row = conn.execute(_SELECT + " WHERE identity = ?", (identity,)).fetchone()
    return _row(row) if row else None


def put_identity(conn, row: IdentityRow) -> None:
    """Insert or replace an identity whole."""
    conn.execute("DELETE FROM email_identities WHERE identity = ?", (row.identity,))
    values = [int(v) if isinstance(v, bool) else v for v in (getattr(row, c) for c in COLUMNS)]
    conn.execute(f"INSERT INTO email_identities ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                 values)
    bump_configuration_version(conn)


def delete_identity(conn, identity: str) -> bool:
    """The identity and its default configuration set; False when there was none."""
    gone = conn.execute("DELETE FROM email_identities WHERE identity = ?", (identity,)).rowcount
    conn.execute("DELETE FROM identity_sets WHERE identity = ?", (identity,))
    bump_configuration_version(conn)
    return gone > 0


def record_check(conn, identity: str, checked_at: str, verification: str, dkim_status: str, detail: str) -> bool:
    """Write a check's outcome; True (and the configuration version moved) when a status changed."""
    row = identity_row(conn, identity)
    if row is None:
        return False
    changed = (row.verification_status, row.dkim_status) != (verification, dkim_status)
    verified_at = checked_at if verification == "SUCCESS" and row.verification_status != "SUCCESS" \
        else row.verified_at
    conn.execute("UPDATE email_identities SET checked_at = ?, check_detail = ?, verification_status = ?,"
                 " dkim_status = ?, verified_at = ? WHERE identity = ?",
                 (checked_at, detail, verification, dkim_status, verified_at, identity))
    if changed:
        bump_configuration_version(conn)
    return changed
