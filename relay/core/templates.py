"""SES email templates: Handlebars (pybars3, a port of Handlebars.js) rendered with a recipient's data (pure).

SES renders a template's subject, text and HTML parts with Handlebars: `{{name}}`, nested paths, `{{#if}}`,
`{{#unless}}`, `{{#each}}`, `{{#with}}`, `{{lookup}}`, inline partials, `{{else}}`. Values are HTML-escaped in the
HTML part (`{{{name}}}` does not escape) and never in the subject and text parts. Where Handlebars renders a
name the data lacks as nothing, SES fails the send with a Rendering Failure ("Attribute 'name' is not present
in the rendering data."): a lookup for a missing name yields a marker instead of nothing, so the rendered text
says which names were missing. A missing name used as a condition (`{{#if}}`, `{{#each}}`) is false or empty,
as in Handlebars, and no failure.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pybars import Compiler, PybarsError
from pybars._compiler import prepare

PARTS = ("subject", "text", "html")
_compile_lock = threading.Lock()  # pybars' Compiler keeps its code builder in class state: one compile at a time


class TemplateError(ValueError):
    """A template Handlebars cannot compile (SES: InvalidTemplate)."""


class RenderingFailure(ValueError):
    """A template that could not be rendered with the data given; the message is SES's wording."""


class TemplateDataError(ValueError):
    """Rendering data that is not a JSON object."""


@dataclass(frozen=True)
class Template:
    name: str
    subject: str | None = None
    text: str | None = None
    html: str | None = None

    def size(self) -> int:
        """Octets of the template's parts, as SES counts its 500 KB per template."""
        return sum(len((getattr(self, p) or "").encode("utf-8")) for p in PARTS)


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None


def missing_attribute(name: str) -> str:
    return f"Attribute '{name}' is not present in the rendering data."


def no_such_template(name: str) -> str:
    return f"Template {name} does not exist."


# pybars drops the line end before a block tag that ends the template (`- {{x}}\n{{/each}}` loses the \n);
# Handlebars.js keeps it, and SES's examples depend on it. A mark after the last tag keeps it; it is taken off
# the output again.
_END = "\ue002"
_ELSE_IF = re.compile(r"\{\{~?\s*else\s+(if|unless)\b")


@functools.lru_cache(maxsize=256)  # a template is compiled once for all its sends; 256 holds the working set
def _compiled(source: str, html: bool) -> Callable:
    """The template function of `source`; `html`: values are HTML-escaped (else output as they are)."""
    if _ELSE_IF.search(source):  # pybars3 reads `{{else if x}}` as a plain {{else}}: refused, not misrendered
        raise TemplateError("{{else if ...}} is not supported here: nest an {{#if}} inside the {{else}}")
    with _compile_lock:
        try:
            function = Compiler().compile(source + _END)
        except PybarsError as exc:
            raise TemplateError(str(exc)) from exc
        except Exception as exc:  # the grammar's own parse errors are not PybarsErrors
            raise TemplateError(f"cannot parse the template: {exc}") from exc
    # pybars registers every compiled template as a module; the function keeps what it needs, so an inline
    # template sent once does not stay in memory for the life of the process.
    sys.modules.pop(function.__module__, None)
    if not html:  # the generated code (blocks included) prepares every value through its module's `prepare`
        function.__globals__["prepare"] = _prepare_unescaped
    return function


def _prepare_unescaped(value, should_escape: bool):
    return prepare(value, False)


_COMMENT = re.compile(r"\{\{!--.*?--\}\}|\{\{![^}]*\}\}", re.S)


def _unclosed(source: str) -> bool:
    """Whether a block is opened and never closed: pybars takes `{{#if x}}...` to the end as an empty block, where
    Handlebars.js refuses the template."""
    tags = _COMMENT.sub("", source)
    return len(re.findall(r"\{\{~?#", tags)) != len(re.findall(r"\{\{~?/", tags))


def check(template: Template) -> None:
    """Raises TemplateError for a part Handlebars cannot compile (CreateTemplate refuses it)."""
    for part in PARTS:
        source = getattr(template, part)
        if source:
            body, inline = split_inline_partials(source)
            try:
                for text in (body, *inline.values()):
                    if _unclosed(text):
                        raise TemplateError("a block is opened and not closed")
                    _compiled(text, part == "html")
            except TemplateError as exc:
                raise TemplateError(f"Invalid template {part} part: {exc}") from exc


def parse_data(text: str | None) -> dict:
    """TemplateData as SES takes it: a JSON object (absent or empty: no data)."""
    if text is None or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TemplateDataError(f"Template data is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TemplateDataError("Template data must be a JSON object.")
    return data


def merge(default: dict, replacement: dict) -> dict:
    """A bulk destination's data: its ReplacementTemplateData over the DefaultTemplateData, name by name."""
    return {**default, **replacement}


# --- rendering ------------------------------------------------------------------------------------------------

class _Missing:
    """What a lookup finds for a name the data lacks: a marker when output, false and empty as a condition."""

    __slots__ = ("marker",)

    def __init__(self, marker: str):
        self.marker = marker

    def __bool__(self) -> bool:
        return False

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())

    def __getitem__(self, name):  # a path below a missing name is missing by that name
        return self

    def get(self, name, default=None):
        return self

    def __str__(self) -> str:
        return self.marker


class _Lookups:
    """The missing names of one rendering, each with its marker (private-use characters and a random nonce, which
    no data contains and HTML escaping leaves alone)."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.names: list[str] = []
        self.pattern = re.compile(f"\ue000{self.nonce}(\\d+)\ue001")

    def missing(self, name: str) -> _Missing:
        self.names.append(name)
        return _Missing(f"\ue000{self.nonce}{len(self.names) - 1}\ue001")

    def first_missing(self, rendered: str) -> str | None:
        found = self.pattern.search(rendered)
        return self.names[int(found.group(1))] if found else None


class _Data(dict):
    """A JSON object of the rendering data whose absent names are _Missing (pybars asks `data[name]` first)."""

    lookups: _Lookups

    def __getitem__(self, name):
        try:
            return dict.__getitem__(self, name)
        except KeyError:
            return self.lookups.missing(str(name))

    def get(self, name, default=None):
        return self[name]


def _wrap(value: object, lookups: _Lookups) -> object:
    if isinstance(value, dict):
        data = _Data({k: _wrap(v, lookups) for k, v in value.items()})
        data.lookups = lookups
        return data
    if isinstance(value, list):
        return [_wrap(v, lookups) for v in value]
    return value


# Handlebars 4's inline partials, which SES documents and pybars3 (Handlebars 2) lacks: each definition is taken
# out of the part and handed to pybars as an ordinary partial. The line end after a definition is not output
# (SES's guide); `{{/inline~}}` takes all the whitespace after it.
_INLINE = re.compile(r'\{\{~?#\*\s*inline\s+"([^"]+)"\s*~?\}\}(.*?)\{\{~?/inline\s*(~?)\}\}(\r?\n)?', re.S)


def split_inline_partials(source: str) -> tuple[str, dict[str, str]]:
    """(the part without its inline partial definitions, {name: partial source})."""
    partials: dict[str, str] = {}

    def take(match: re.Match) -> str:
        partials[match.group(1)] = match.group(2)
        return "\x00" if match.group(3) else ""  # `~`: whitespace after it goes too (marked, removed below)

    body = _INLINE.sub(take, source)
    return re.sub(r"\x00\s*", "", body), partials


def render_part(source: str, data: dict, html: bool) -> str:
    """One part rendered; raises RenderingFailure for the first name the data lacks."""
    body, inline = split_inline_partials(source)
    lookups = _Lookups()
    try:
        function = _compiled(body, html)
        partials = {name: _compiled(text, html) for name, text in inline.items()}
        out = str(function(_wrap(data, lookups), helpers={}, partials=partials)).replace(_END, "")
    except TemplateError as exc:  # an inline template of SendEmail is compiled here first
        raise RenderingFailure(f"The template could not be compiled: {exc}") from exc
    except PybarsError as exc:
        raise RenderingFailure(str(exc)) from exc
    except (TypeError, ValueError, IndexError, AttributeError, KeyError, RecursionError) as exc:
        raise RenderingFailure(f"The template could not be rendered: {exc}") from exc
    name = lookups.first_missing(out)
    if name is not None:
        raise RenderingFailure(missing_attribute(name))
    return out


def render(template: Template, data: dict) -> Rendered:
    """The template rendered with `data`; RenderingFailure names the first attribute the data lacks."""
    subject = render_part(template.subject, data, html=False) if template.subject else ""
    text = render_part(template.text, data, html=False) if template.text else None
    html = render_part(template.html, data, html=True) if template.html else None
    return Rendered(subject, text, html)
