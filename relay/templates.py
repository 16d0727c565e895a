"""Managing email templates: SES's CreateTemplate, GetTemplate, ListTemplates, UpdateTemplate, DeleteTemplate and
TestRenderTemplate (and their v2 forms), shared by the management API and `relay template`.

Failures are SesError with SES v1's codes and wording (relay/api/errors.py gives v2 its shapes). Each change is
one store work (one transaction). A template is checked when it is stored (Handlebars must compile it) and
rendered at send time: a later change applies to the next send.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from relay.config import Config
from relay.core import templates as core
from relay.core.compose import Simple, build
from relay.core.events import iso_ms, mint_message_id
from relay.core.templates import Template, TemplateError
from relay.sets import SesError
from relay.store import Store
from relay.store.templates import delete_template, get_template, insert_template, list_templates, update_template

# SES: "The name of the template. You will refer to this name when you send email ..." letters, digits, _ and -,
# at most 64 characters (the v1 model's TemplateName documentation).
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def no_such_template(name: str) -> SesError:
    return SesError("TemplateDoesNotExist", core.no_such_template(name))


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise SesError("InvalidTemplate", f"Invalid template name <{name}>: use 1-64 characters from A-Z a-z 0-9 _ -.")
    return name


def checked(cfg: Config, template: Template) -> Template:
    """A template as stored: named properly, within the size limit, each part compiling."""
    check_name(template.name)
    if not (template.subject or template.text or template.html):
        raise SesError("InvalidTemplate", f"Template {template.name} has no subject, text or HTML part.")
    if template.size() > cfg.api.max_template_size:
        raise SesError("InvalidTemplate", f"Template {template.name} is {template.size()} bytes: the limit is"
                       f" {cfg.api.max_template_size} bytes (subject, text and HTML parts together).")
    try:
        core.check(template)
    except TemplateError as exc:
        raise SesError("InvalidTemplate", f"Template {template.name}: {exc}") from exc
    return template


def _now() -> str:
    return iso_ms(int(time.time() * 1000))


def create(cfg: Config, store: Store, template: Template) -> None:
    checked(cfg, template)
    row = (template.name, template.subject, template.text, template.html, _now())
    outcome = store.submit(lambda conn: insert_template(conn, row, cfg.api.max_templates)).result()
    if outcome == "exists":
        raise SesError("AlreadyExists", f"Template {template.name} already exists.")
    if outcome == "full":
        raise SesError("LimitExceeded", f"Maximum number of templates ({cfg.api.max_templates}) reached.")


def update(cfg: Config, store: Store, template: Template) -> None:
    checked(cfg, template)
    row = (template.name, template.subject, template.text, template.html, _now())
    if not store.submit(lambda conn: update_template(conn, row)).result():
        raise no_such_template(template.name)


def delete(store: Store, name: str) -> None:
    if not store.submit(lambda conn: delete_template(conn, name)).result():
        raise no_such_template(name)


def get(store: Store, name: str) -> Template:
    """The stored template; TemplateDoesNotExist when there is none of that name."""
    row = store.read(get_template, name)
    if row is None:
        raise no_such_template(name)
    return Template(row[0], row[1], row[2], row[3])


def created_at(store: Store, name: str) -> str:
    row = store.read(get_template, name)
    if row is None:
        raise no_such_template(name)
    return row[4]


def listing(store: Store, after: str | None, limit: int) -> list[tuple[str, str]]:
    """(name, created_at) of up to `limit` templates after the name `after`, in name order."""
    return store.read(list_templates, after, limit)


def render(template: Template, data_text: str | None) -> core.Rendered:
    """TestRenderTemplate's rendering; SesError with SES's codes for bad data or a missing attribute."""
    try:
        data = core.parse_data(data_text)
    except core.TemplateDataError as exc:
        raise SesError("InvalidRenderingParameter", str(exc)) from exc
    try:
        return core.render(template, data)
    except core.RenderingFailure as exc:
        raise SesError("MissingRenderingAttribute", str(exc)) from exc


def rendered_message(cfg: Config, rendered: core.Rendered, now_ms: int | None = None) -> str:
    """TestRenderTemplate's answer: the whole MIME message SES would send (no sender or recipients yet)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    content = Simple(from_address="", subject=rendered.subject, text=rendered.text, html=rendered.html)
    data = build(content, message_id=f"{mint_message_id(now_ms)}@{cfg.hostname}",
                 date=format_datetime(datetime.fromtimestamp(now_ms / 1000, UTC)))
    return data.decode("utf-8", "replace")
