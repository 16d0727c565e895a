"""Email templates (SES's CreateTemplate / CreateEmailTemplate): one table for the v1 and v2 APIs and the CLI.

Rows are plain values here; relay/templates.py gives them SES's errors and relay/core/templates.py renders them.
"""

from __future__ import annotations

TemplateRow = tuple[str, str | None, str | None, str | None, str]  # name, subject, text, html, created_at

_COLUMNS = "name, subject, text_part, html_part, created_at"


def insert_template(conn, row: TemplateRow, max_templates: int) -> str:
    """Add a template: "created", "exists" (a template of that name is kept as it is) or "full" (at the limit)."""
    if conn.execute("SELECT 1 FROM email_templates WHERE name = ?", (row[0],)).fetchone():
        return "exists"
    if conn.execute("SELECT COUNT(*) FROM email_templates").fetchone()[0] >= max_templates:
        return "full"
    conn.execute(f"INSERT INTO email_templates ({_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                 (*row, row[4]))
    return "created"


def update_template(conn, row: TemplateRow) -> bool:
    """Replace a template's parts (its creation time stays); False when there is none of that name."""
    name, subject, text, html, now = row
    return conn.execute("UPDATE email_templates SET subject = ?, text_part = ?, html_part = ?, updated_at = ?"
                        " WHERE name = ? RETURNING name", (subject, text, html, now, name)).fetchone() is not None


def delete_template(conn, name: str) -> bool:
    return conn.execute("DELETE FROM email_templates WHERE name = ? RETURNING name", (name,)).fetchone() is not None


def get_template(conn, name: str) -> TemplateRow | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM email_templates WHERE name = ?", (name,)).fetchone()
    return tuple(row) if row else None


def list_templates(conn, after: str | None, limit: int) -> list[tuple[str, str]]:
    """(name, created_at) in name order, after the name `after` (a page's last), at most `limit`."""
    return [tuple(r) for r in conn.execute(
        "SELECT name, created_at FROM email_templates WHERE name > ? ORDER BY name LIMIT ?", (after or "", limit))]
