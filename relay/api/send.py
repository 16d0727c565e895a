"""The sending operations of both protocols, as plans: what to send, checked with SES's limits and errors.

A request becomes a `Plan`, a list of `Outgoing` messages (one, or one per bulk destination), built in a worker
thread: parameters checked, Raw content decoded, Simple content and templates rendered and written as MIME
(relay/core/compose.py, relay/core/templates.py). The server then hands each message to the pipeline, the same
path as SMTP (relay/api/sending.py), and shapes the results per protocol. Anything wrong with the request as a
whole is a SesError before anything is sent; a bulk destination that fails fails alone.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
from dataclasses import dataclass, field

from relay import templates as stored
from relay.api.common import Context, invalid, required, structure
from relay.core import compose
from relay.core import templates as core
from relay.core.compose import AddressError, Attachment, Simple
from relay.core.headers import HeaderError, parse_message_tags, split_header_block, to_crlf
from relay.core.templates import Template
from relay.sets import SesError

BULK_STATUS_V1 = {"SUCCESS": "Success", "MESSAGE_REJECTED": "MessageRejected",
                  "CONFIGURATION_SET_NOT_FOUND": "ConfigurationSetDoesNotExist",
                  "TEMPLATE_NOT_FOUND": "TemplateDoesNotExist", "INVALID_PARAMETER": "InvalidParameterValue",
                  "TRANSIENT_FAILURE": "TransientFailure", "FAILED": "Failed"}
# SesError code -> the status of a bulk destination (v2 names; BULK_STATUS_V1 gives v1's)
_STATUS_OF = {"MessageRejected": "MESSAGE_REJECTED", "ConfigurationSetDoesNotExist": "CONFIGURATION_SET_NOT_FOUND",
              "TemplateDoesNotExist": "TEMPLATE_NOT_FOUND", "InvalidParameterValue": "INVALID_PARAMETER",
              "ValidationError": "INVALID_PARAMETER", "ServiceUnavailable": "TRANSIENT_FAILURE"}


@dataclass
class Outgoing:
    """One message to send. `data` None: not sent, because of `error` (SES's error for it) or a Rendering Failure
    of `template` (`rendering_failure`), or both (a template that does not exist)."""

    mail_from: str
    recipients: list[str]
    data: bytes | None
    configuration_set: str | None
    tags: dict[str, list[str]] | None  # the API's tags (they replace X-SES-MESSAGE-TAGS); None: the message's
    template: str | None = None
    rendering_failure: str | None = None  # SES's errorMessage: not sent; the set's Rendering Failure event instead
    error: SesError | None = None  # refused before the pipeline (a bulk destination's own error)


@dataclass
class Result:
    message_id: str | None = None
    error: SesError | None = None


@dataclass
class Plan:
    operation: str  # ses:operation: SendEmail, SendRawEmail, SendTemplatedEmail, SendBulkTemplatedEmail, ...
    messages: list[Outgoing] = field(default_factory=list)
    bulk: bool = False


def bulk_status(error: SesError | None) -> str:
    return "SUCCESS" if error is None else _STATUS_OF.get(error.code, "FAILED")


# --- checks -------------------------------------------------------------------------------------------------------

def parameter_error(message: str) -> SesError:
    """A request SES refuses as such (v1 InvalidParameterValue, v2 BadRequestException)."""
    return SesError("InvalidParameterValue", message)


def addr(address: object, where: str) -> str:
    if not isinstance(address, str):
        raise invalid(address, where, "Member must be a string")
    try:
        return compose.addr_spec(address)
    except AddressError as exc:
        raise parameter_error(str(exc)) from exc


def address_list(value: object, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(value, where, "Member must be a list of strings")
    for i, v in enumerate(value, 1):
        addr(v, f"{where}.{i}.member")
    return list(value)


@dataclass(frozen=True)
class Destination:
    to: list[str]
    cc: list[str]
    bcc: list[str]

    def recipients(self) -> list[str]:
        """Envelope recipients: every address once, in the order given."""
        return list(dict.fromkeys(compose.addr_spec(a) for a in self.to + self.cc + self.bcc))


def destination(raw: object, where: str, optional: bool = False) -> Destination | None:
    if raw is None and optional:
        return None
    if not isinstance(raw, dict):
        required(None, where)
        raise invalid(raw, where, "Member must be a structure")
    return Destination(address_list(raw.get("ToAddresses"), f"{where}.toAddresses"),
                       address_list(raw.get("CcAddresses"), f"{where}.ccAddresses"),
                       address_list(raw.get("BccAddresses"), f"{where}.bccAddresses"))


def check_recipients(ctx: Context, recipients: list[str]) -> list[str]:
    if not recipients:
        raise parameter_error("Missing required header 'To'.")  # no recipient anywhere (SES's wording)
    if len(recipients) > ctx.config.api.max_recipients:
        raise parameter_error(f"Recipient count exceeds {ctx.config.api.max_recipients}.")
    return recipients


def check_size(size: int, limit: int) -> None:
    if size > limit:
        raise SesError("MessageRejected", f"Message length is more than {limit} bytes long: '{size}'.")


def tags(pairs: object, where: str) -> dict[str, list[str]] | None:
    """MessageTags (v1 Tags, v2 EmailTags): the same rules as X-SES-MESSAGE-TAGS (relay/core/headers.py)."""
    if pairs is None or pairs == "":
        return None
    if not isinstance(pairs, list):
        raise invalid(pairs, where, "Member must be a list")
    text = []
    for i, p in enumerate(pairs, 1):
        if not isinstance(p, dict):
            raise invalid(p, f"{where}.{i}.member", "Member must be a structure")
        name = str(required(p.get("Name"), f"{where}.{i}.member.name"))
        value = str(required(p.get("Value"), f"{where}.{i}.member.value"))
        text.append(f"{name}={value}")
    try:
        return parse_message_tags(", ".join(text)) if text else {}
    except HeaderError as exc:
        raise SesError("MessageRejected", str(exc).removeprefix("Message rejected: ")) from exc


def merged_tags(default: dict[str, list[str]] | None, own: dict[str, list[str]] | None) -> dict | None:
    """A bulk destination's tags: its ReplacementTags over the DefaultTags, name by name."""
    if default is None and own is None:
        return None
    return {**(default or {}), **(own or {})}


def set_name(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


def base64_data(value: object, where: str) -> bytes:
    if not isinstance(value, str) or not value:
        required(None, where)
    try:
        return base64.b64decode(str(value).encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise parameter_error(f"Invalid base64 data in {where}.") from exc


def header_list(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    """v2 Simple/Template Headers: at most 15, names and values as the model constrains them."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 15:
        raise invalid(raw, where, "Member must have length less than or equal to 15")
    out = []
    for i, h in enumerate(raw, 1):
        h = h if isinstance(h, dict) else {}
        name = str(required(h.get("Name"), f"{where}.{i}.member.name"))
        value = str(required(h.get("Value"), f"{where}.{i}.member.value"))
        if not (0 < len(name) <= 126 and all(33 <= ord(c) <= 126 and c != ":" for c in name)):
            raise invalid(name, f"{where}.{i}.member.name", "Member must satisfy regular expression pattern:"
                          " ^[!-9;-@A-~]+$")
        if not (0 < len(value) <= 995 and all(32 <= ord(c) <= 126 for c in value)):
            raise invalid(value, f"{where}.{i}.member.value", "Member must satisfy regular expression pattern:"
                          " [ -~]*")
        if name.lower() in ("from", "to", "cc", "bcc", "subject", "reply-to", "mime-version", "content-type",
                            "content-transfer-encoding"):
            raise parameter_error(f"Header {name} is set from the request's own parameters.")
        out.append((name, value))
    return tuple(out)


def attachments(raw: object, where: str) -> tuple[Attachment, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid(raw, where, "Member must be a list")
    out = []
    for i, a in enumerate(raw, 1):
        a = a if isinstance(a, dict) else {}
        here = f"{where}.{i}.member"
        disposition = str(a.get("ContentDisposition") or "ATTACHMENT")
        if disposition not in compose.DISPOSITIONS:
            raise invalid(disposition, f"{here}.contentDisposition", "Member must satisfy enum value set:"
                          " [ATTACHMENT, INLINE]")
        encoding = a.get("ContentTransferEncoding")
        if encoding is not None and encoding not in compose.TRANSFER_ENCODINGS:
            raise invalid(encoding, f"{here}.contentTransferEncoding", "Member must satisfy enum value set:"
                          " [BASE64, QUOTED_PRINTABLE, SEVEN_BIT]")
        out.append(Attachment(base64_data(a.get("RawContent"), f"{here}.rawContent"),
                              str(required(a.get("FileName"), f"{here}.fileName")),
                              str(a.get("ContentType") or ""), disposition, a.get("ContentId") or None,
                              a.get("ContentDescription") or None, encoding))
    return tuple(out)


def content_text(raw: object, where: str) -> tuple[str | None, str | None]:
    """A Content structure (Data, Charset) -> (text, charset); absent: (None, None)."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        raise invalid(raw, where, "Member must be a structure")
    return str(required(raw.get("Data"), f"{where}.data")), raw.get("Charset") or None


# --- building the messages ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Envelope:
    """What every message of a request shares: sender, Reply-To, set and tags."""

    source: str  # the From header as given (may have a display name)
    mail_from: str  # the envelope sender (addr-spec)
    reply_to: tuple[str, ...]
    configuration_set: str | None
    tags: dict[str, list[str]] | None
    headers: tuple[tuple[str, str], ...] = ()


def simple_message(ctx: Context, env: Envelope, dest: Destination, subject: str, text: str | None,
                   html: str | None, charsets: tuple[str | None, str | None, str | None] = (None, None, None),
                   files: tuple[Attachment, ...] = ()) -> Outgoing:
    """A message written from Simple content (or a rendered template)."""
    recipients = check_recipients(ctx, dest.recipients())
    if text is None and html is None:
        raise parameter_error("The message body must have a Text part, an Html part, or both.")
    data = compose.build(Simple(env.source, subject, text, html, tuple(dest.to), tuple(dest.cc), env.reply_to,
                                env.headers, files, *charsets))
    check_size(len(data), ctx.config.api.max_message_size)
    return Outgoing(env.mail_from, recipients, data, env.configuration_set, env.tags)


def raw_message(ctx: Context, env_source: str | None, dest: Destination | None, data: bytes,
                configuration_set: str | None, message_tags: dict | None) -> Outgoing:
    """A Raw message, sent as it is; sender and recipients from the request, else from its header block."""
    check_size(len(data), ctx.config.api.max_raw_message_size)
    block = split_header_block(to_crlf(data))
    if env_source:
        mail_from = addr(env_source, "source")
    else:
        sender = block.get("from")
        if sender is None:
            raise parameter_error("Missing required header 'From'.")
        mail_from = addr(sender.value, "From")
    if dest is not None and (dest.to or dest.cc or dest.bcc):
        recipients = dest.recipients()
    else:
        found = [f.value for name in ("to", "cc", "bcc") for f in block.fields if f.lname == name]
        recipients = list(dict.fromkeys(addr(a, "header") for a in _split_addresses(found)))
    return Outgoing(mail_from, check_recipients(ctx, recipients), data, configuration_set, message_tags)


def _split_addresses(values: list[str]) -> list[str]:
    return [f"<{spec}>" if spec else name for name, spec in email.utils.getaddresses(values)]


def stored_or_inline(ctx: Context, name: object, inline: object) -> Template:
    """A v2 Template: the stored one named (TemplateName), or the one given (TemplateContent)."""
    if inline is not None:
        if not isinstance(inline, dict):
            raise invalid(inline, "content.template.templateContent", "Member must be a structure")
        template = Template("inline", inline.get("Subject"), inline.get("Text"), inline.get("Html"))
        if template.size() > ctx.config.api.max_template_size:
            raise parameter_error(f"The template is more than {ctx.config.api.max_template_size} bytes.")
        return template
    return stored.get(ctx.store, str(required(name, "content.template.templateName")))


def templated(ctx: Context, env: Envelope, dest: Destination, template: Template, data: dict,
              files: tuple[Attachment, ...] = ()) -> Outgoing:
    """A message rendered from a template; a Rendering Failure is a message not sent (SES accepts it, then
    publishes the failure), never an error of the request."""
    try:
        rendered = core.render(template, data)
    except core.RenderingFailure as exc:
        return Outgoing(env.mail_from, check_recipients(ctx, dest.recipients()), None, env.configuration_set,
                        env.tags, template.name, str(exc))
    text = "" if rendered.text is None and rendered.html is None else rendered.text  # a subject-only template
    out = simple_message(ctx, env, dest, rendered.subject, text, rendered.html, files=files)
    out.template = template.name
    return out


def missing_template(ctx: Context, env: Envelope, dest: Destination, name: str) -> Outgoing:
    """A send whose template does not exist: not sent, and the set's Rendering Failure event says so."""
    return Outgoing(env.mail_from, check_recipients(ctx, dest.recipients()), None, env.configuration_set, env.tags,
                    name, core.no_such_template(name), stored.no_such_template(name))


def template_data(text: object, where: str) -> dict:
    if text is not None and not isinstance(text, str):
        raise invalid(text, where, "Member must be a string")
    if text is not None and len(text) > 262144:
        raise invalid("...", where, "Member must have length less than or equal to 262144")
    try:
        return core.parse_data(text)
    except core.TemplateDataError as exc:
        raise parameter_error(str(exc)) from exc


# --- SES v2 -------------------------------------------------------------------------------------------------------

def _v2_envelope(body: dict, headers: tuple[tuple[str, str], ...] = (), raw: bool = False) -> Envelope:
    source = body.get("FromEmailAddress")
    if not raw:
        required(source, "fromEmailAddress")
    feedback = body.get("FeedbackForwardingEmailAddress")
    mail_from = addr(feedback, "feedbackForwardingEmailAddress") if feedback else \
        (addr(source, "fromEmailAddress") if source else "")
    if body.get("ListManagementOptions") is not None:
        required(structure(body["ListManagementOptions"], "listManagementOptions").get("ContactListName"),
                 "listManagementOptions.contactListName")
    return Envelope(str(source or ""), mail_from, tuple(address_list(body.get("ReplyToAddresses"),
                                                                     "replyToAddresses")),
                    set_name(body.get("ConfigurationSetName")), tags(body.get("EmailTags"), "emailTags"), headers)


def v2_send_email(ctx: Context, body: dict) -> Plan:
    content = structure(required(body.get("Content"), "content"), "content")
    given = [k for k in ("Simple", "Raw", "Template") if content.get(k) is not None]
    if len(given) != 1:
        raise parameter_error("Content must have exactly one of Simple, Raw or Template.")
    kind = given[0]
    if kind == "Raw":
        env = _v2_envelope(body, raw=True)
        data = base64_data(structure(content["Raw"], "content.raw").get("Data"), "content.raw.data")
        dest = destination(body.get("Destination"), "destination", optional=True)
        return Plan("SendEmail", [raw_message(ctx, env.source or None, dest, data, env.configuration_set,
                                              env.tags)])
    dest = destination(required(body.get("Destination"), "destination"), "destination")
    if kind == "Simple":
        simple = structure(content["Simple"], "content.simple")
        env = _v2_envelope(body, header_list(simple.get("Headers"), "content.simple.headers"))
        subject, subject_charset = content_text(required(simple.get("Subject"), "content.simple.subject"),
                                                "content.simple.subject")
        message_body = structure(required(simple.get("Body"), "content.simple.body"), "content.simple.body")
        text, text_charset = content_text(message_body.get("Text"), "content.simple.body.text")
        html, html_charset = content_text(message_body.get("Html"), "content.simple.body.html")
        files = attachments(simple.get("Attachments"), "content.simple.attachments")
        return Plan("SendEmail", [simple_message(ctx, env, dest, subject or "", text, html,
                                                 (subject_charset, text_charset, html_charset), files)])
    spec = structure(content["Template"], "content.template")
    env = _v2_envelope(body, header_list(spec.get("Headers"), "content.template.headers"))
    data = template_data(spec.get("TemplateData"), "content.template.templateData")
    files = attachments(spec.get("Attachments"), "content.template.attachments")
    try:
        template = stored_or_inline(ctx, spec.get("TemplateName"), spec.get("TemplateContent"))
    except SesError as exc:
        if exc.code != "TemplateDoesNotExist":
            raise
        return Plan("SendEmail", [missing_template(ctx, env, dest, str(spec.get("TemplateName")))])
    return Plan("SendEmail", [templated(ctx, env, dest, template, data, files)])


def v2_send_bulk(ctx: Context, body: dict) -> Plan:
    content = structure(required(body.get("DefaultContent"), "defaultContent"), "defaultContent")
    default = structure(content.get("Template"), "defaultContent.template")
    required(default or None, "defaultContent.template")
    default_headers = header_list(default.get("Headers"), "defaultContent.template.headers")
    env = _v2_envelope(body, default_headers)
    default_tags = tags(body.get("DefaultEmailTags"), "defaultEmailTags")
    default_data = template_data(default.get("TemplateData"), "defaultContent.template.templateData")
    files = attachments(default.get("Attachments"), "defaultContent.template.attachments")
    entries = required(body.get("BulkEmailEntries"), "bulkEmailEntries")
    if not isinstance(entries, list) or not entries:
        raise invalid(entries, "bulkEmailEntries", "Member must be a non-empty list")
    if len(entries) > ctx.config.api.max_bulk_destinations:
        raise parameter_error(f"Destination count exceeds {ctx.config.api.max_bulk_destinations}.")
    name = default.get("TemplateName")
    try:
        template = stored_or_inline(ctx, name, default.get("TemplateContent"))
    except SesError as exc:
        if exc.code != "TemplateDoesNotExist":
            raise
        template = None
    plan = Plan("SendBulkEmail", bulk=True)
    for i, entry in enumerate(entries, 1):
        where = f"bulkEmailEntries.{i}.member"
        plan.messages.append(_bulk_entry(ctx, env, entry, where, template, str(name), default_data, default_tags,
                                         default_headers, files))
    return plan


def _bulk_entry(ctx: Context, env: Envelope, entry: object, where: str, template: Template | None, name: str,
                default_data: dict, default_tags: dict | None, default_headers: tuple, files: tuple) -> Outgoing:
    """One destination of a bulk send: rendered on its own, so its failure is its own."""
    entry = structure(entry, where)
    try:
        dest = destination(entry.get("Destination"), f"{where}.destination")
        own_tags = tags(entry.get("ReplacementTags"), f"{where}.replacementTags")
        replacement = structure(structure(entry.get("ReplacementEmailContent"), f"{where}.replacementEmailContent")
                           .get("ReplacementTemplate"), f"{where}.replacementEmailContent.replacementTemplate")
        data = core.merge(default_data, template_data(replacement.get("ReplacementTemplateData"),
                                                      f"{where}.replacementTemplateData"))
        own = header_list(entry.get("ReplacementHeaders"), f"{where}.replacementHeaders")
        names = {n.lower() for n, _ in own}
        headers = tuple(h for h in default_headers if h[0].lower() not in names) + own
        here = Envelope(env.source, env.mail_from, env.reply_to, env.configuration_set,
                        merged_tags(default_tags or env.tags, own_tags), headers)
        if template is None:
            return missing_template(ctx, here, dest, name)
        return templated(ctx, here, dest, template, data, files)
    except SesError as exc:
        return Outgoing(env.mail_from, [], None, env.configuration_set, env.tags, error=exc)


# --- SES v1 -------------------------------------------------------------------------------------------------------

def _list(value: object) -> list:
    return value if isinstance(value, list) else [] if value in (None, "") else [value]


def _v1_envelope(p: dict) -> Envelope:
    source = str(required(p.get("Source"), "source"))
    return_path = p.get("ReturnPath")
    mail_from = addr(return_path, "returnPath") if return_path else addr(source, "source")
    return Envelope(source, mail_from, tuple(address_list(_list(p.get("ReplyToAddresses")), "replyToAddresses")),
                    set_name(p.get("ConfigurationSetName")), tags(_list(p.get("Tags")) or None, "tags"))


def _v1_destination(raw: object, where: str) -> Destination:
    raw = raw if isinstance(raw, dict) else required(None, where)
    return Destination(*(address_list(_list(raw.get(k)), f"{where}.{k[0].lower()}{k[1:]}")
                         for k in ("ToAddresses", "CcAddresses", "BccAddresses")))


def v1_send_email(ctx: Context, p: dict) -> Plan:
    env = _v1_envelope(p)
    dest = _v1_destination(p.get("Destination"), "destination")
    message = p.get("Message") if isinstance(p.get("Message"), dict) else required(None, "message")
    subject, subject_charset = content_text(required(message.get("Subject"), "message.subject"), "message.subject")
    body = message.get("Body") if isinstance(message.get("Body"), dict) else required(None, "message.body")
    text, text_charset = content_text(body.get("Text"), "message.body.text")
    html, html_charset = content_text(body.get("Html"), "message.body.html")
    return Plan("SendEmail", [simple_message(ctx, env, dest, subject or "", text, html,
                                             (subject_charset, text_charset, html_charset))])


def v1_send_raw(ctx: Context, p: dict) -> Plan:
    raw = p.get("RawMessage") if isinstance(p.get("RawMessage"), dict) else required(None, "rawMessage")
    data = base64_data(raw.get("Data"), "rawMessage.data")
    destinations = address_list(_list(p.get("Destinations")), "destinations")
    dest = Destination(destinations, [], []) if destinations else None
    return Plan("SendRawEmail", [raw_message(ctx, p.get("Source") or None, dest, data,
                                             set_name(p.get("ConfigurationSetName")),
                                             tags(_list(p.get("Tags")) or None, "tags"))])


def v1_send_templated(ctx: Context, p: dict) -> Plan:
    env = _v1_envelope(p)
    dest = _v1_destination(p.get("Destination"), "destination")
    name = str(required(p.get("Template"), "template"))
    data = template_data(required(p.get("TemplateData"), "templateData"), "templateData")
    try:
        template = stored.get(ctx.store, name)
    except SesError:
        return Plan("SendTemplatedEmail", [missing_template(ctx, env, dest, name)])
    return Plan("SendTemplatedEmail", [templated(ctx, env, dest, template, data)])


def v1_send_bulk_templated(ctx: Context, p: dict) -> Plan:
    env = _v1_envelope(p)
    name = str(required(p.get("Template"), "template"))
    default_data = template_data(required(p.get("DefaultTemplateData"), "defaultTemplateData"),
                                 "defaultTemplateData")
    default_tags = tags(_list(p.get("DefaultTags")) or None, "defaultTags")
    entries = _list(required(p.get("Destinations"), "destinations"))
    if len(entries) > ctx.config.api.max_bulk_destinations:
        raise parameter_error(f"Destination count exceeds {ctx.config.api.max_bulk_destinations}.")
    try:
        template: Template | None = stored.get(ctx.store, name)
    except SesError:
        template = None
    plan = Plan("SendBulkTemplatedEmail", bulk=True)
    for i, entry in enumerate(entries, 1):
        where = f"destinations.{i}.member"
        entry = entry if isinstance(entry, dict) else {}
        try:
            dest = _v1_destination(entry.get("Destination"), f"{where}.destination")
            own_tags = tags(_list(entry.get("ReplacementTags")) or None, f"{where}.replacementTags")
            data = core.merge(default_data, template_data(entry.get("ReplacementTemplateData"),
                                                          f"{where}.replacementTemplateData"))
            here = Envelope(env.source, env.mail_from, env.reply_to, env.configuration_set,
                            merged_tags(default_tags or env.tags, own_tags))
            plan.messages.append(missing_template(ctx, here, dest, name) if template is None
                                 else templated(ctx, here, dest, template, data))
        except SesError as exc:
            plan.messages.append(Outgoing(env.mail_from, [], None, env.configuration_set, env.tags, error=exc))
    return plan
