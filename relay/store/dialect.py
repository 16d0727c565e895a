"""Where SQLite and PostgreSQL spell the same thing differently, side by side.

The store's SQL is written once, in the subset both engines read the same way (`?` parameters, `:name` for
named ones, `IS NOT DISTINCT FROM`, `ON CONFLICT ... DO UPDATE`, `RETURNING`, row values). What is left
(aggregates over a condition, JSON paths, identity columns, ...) is asked of the connection's dialect, so
each view and query names its intent and each engine gets its own words for it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    name: str

    @property
    def postgres(self) -> bool:
        return self.name == "postgresql"

    def sum_if(self, condition: str) -> str:
        """How many rows meet `condition`; NULL when it is NULL for every row (SQLite's SUM of a comparison)."""
        return f"SUM(({condition})::int)" if self.postgres else f"SUM({condition})"

    def any_if(self, condition: str) -> str:
        """Whether any row meets `condition` (inside CASE WHEN)."""
        return f"bool_or({condition})" if self.postgres else f"MAX({condition})"

    def json_text(self, column: str, *path: str) -> str:
        """The value at `path` of a JSON text column, as text (objects as their JSON)."""
        if self.postgres:  # -> and ->> rather than #>> '{a,b}': the SQL is also a str.format template
            steps = "".join(f" -> '{p}'" for p in path[:-1])
            return f"({column}::json{steps} ->> '{path[-1]}')"
        return f"json_extract({column}, '$.{'.'.join(path)}')"

    def later(self, x: str, y: str) -> str:
        """The greater of two values, ignoring a NULL one (NULL when both are)."""
        return f"GREATEST({x}, {y})" if self.postgres else f"COALESCE(max({x}, {y}), {x}, {y})"

    def real(self, expression: str) -> str:
        """A fraction as a float (PostgreSQL's ROUND gives a numeric)."""
        return f"({expression})::float8" if self.postgres else expression

    @property
    def begin_snapshot(self) -> str:
        """Start a read transaction whose statements all see the same committed state."""
        return "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY" if self.postgres else "BEGIN"

    @property
    def rowid(self) -> str:
        """The insertion order of a table without an id of its own (messages, message_warnings)."""
        return "seq" if self.postgres else "rowid"


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgresql")

# SQL literal | "::" cast | ? | :name | % (a literal percent for psycopg)
_TOKENS = re.compile(r"'(?:[^']|'')*'|::|\?|:([A-Za-z_]\w*)|%")


@functools.lru_cache(maxsize=2048)
def psycopg_sql(sql: str) -> str:
    """The store's SQL with psycopg's placeholders: `?` -> `%s`, `:name` -> `%(name)s`, `%` -> `%%`."""

    def swap(match: re.Match) -> str:
        token = match.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if match.group(1):
            return f"%({match.group(1)})s"
        return token

    return _TOKENS.sub(swap, sql)
