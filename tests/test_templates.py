"""Template rendering and message building, pure: SES's documented template examples (the Developer Guide's
send-personalized-email-api and send-personalized-email-advanced pages) rendered as SES shows them, Rendering
Failure texts, escaping per part, and messages built from Simple content that parse back and keep to 998 octets.
"""

from __future__ import annotations

import email
import email.policy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core import compose
from relay.core.templates import (
    RenderingFailure,
    Template,
    TemplateDataError,
    TemplateError,
    check,
    merge,
    parse_data,
    render,
)

# --- SES's examples (Developer Guide), with the output SES documents for them ------------------------------------

MY_TEMPLATE = Template(
    "MyTemplate", "Greetings, {{name}}!",
    "Dear {{name}},\r\nYour favorite animal is {{favoriteanimal}}.",
    "<h1>Hello {{name}},</h1><p>Your favorite animal is {{favoriteanimal}}.</p>")

PREFERENCES = Template(
    "Preferences", "Subscription Preferences for {{contact.firstName}} {{contact.lastName}}",
    "Your Preferences\n\nYou have indicated that you are interested in receiving information about the following"
    " subjects:\n{{#each subscription}}- {{interest}}\n{{/each}}\nYou can change these settings at any time by"
    " visiting the Preference Center at https://www.example.com/prefererences/i.aspx?id={{meta.userId}}",
    "<h1>Your Preferences</h1><p>You have indicated that you are interested in receiving information about the"
    " following subjects:</p><ul>{{#each subscription}}<li>{{interest}}</li>{{/each}}</ul><p>You can change these"
    " settings at any time by visiting the <a href=https://www.example.com/prefererences/i.aspx?id={{meta.userId}}>"
    "Preference Center</a>.</p>")

PREFERENCES2_HTML = (
    "<h1>Your Preferences</h1><p>Dear {{contact.firstName}},</p>{{#if subscription}}<p>You have indicated that you"
    " are interested in receiving information about the following subjects:</p><ul>{{#each subscription}}"
    "<li>{{interest}}</li>{{/each}}</ul><p>You can change these settings at any time by visiting the <a href="
    "https://www.example.com/prefererences/i.aspx?id={{meta.userId}}>Preference Center</a>.</p>{{else}}<p>Please"
    " update your subscription preferences by visiting the <a href=https://www.example.com/prefererences/i.aspx?id="
    "{{meta.userId}}>Preference Center</a>.{{/if}}")

PREFERENCES3 = Template(
    "Preferences3", "{{firstName}}'s Subscription Preferences",
    '{{#* inline "fullName"}}{{firstName}}{{#if lastName}} {{lastName}}{{/if}}{{/inline~}}\n'
    "Hello {{> fullName}}! You have listed the following people as your friends:\n"
    "{{#each friends}}- {{> fullName}}\n{{/each}}",
    '{{#* inline "fullName"}}{{firstName}}{{#if lastName}} {{lastName}}{{/if}}{{/inline~}}\n'
    "<h1>Hello {{> fullName}}!</h1><p>You have listed the following people as your friends:</p><ul>"
    "{{#each friends}}<li>{{> fullName}}</li>{{/each}}</ul>")

ANAYA = json.loads('{"meta":{"userId":"51806220607"},"contact":{"firstName":"Anaya","lastName":"Iyengar"},'
                   '"subscription":[{"interest":"Sports"},{"interest":"Travel"},{"interest":"Cooking"}]}')
SHIRLEY = json.loads('{"meta":{"userId":"1981624758263"},"contact":{"firstName":"Shirley","lastName":"Rodriguez"}}')
DEFAULTS = json.loads('{"meta":{"userId":""},"contact":{"firstName":"Friend","lastName":""},"subscription":[]}')


def test_the_basic_example():
    data = parse_data('{ "name":"Alejandro", "favoriteanimal": "alligator" }')
    out = render(MY_TEMPLATE, data)
    assert out.subject == "Greetings, Alejandro!"
    assert out.text == "Dear Alejandro,\r\nYour favorite animal is alligator."
    assert out.html == "<h1>Hello Alejandro,</h1><p>Your favorite animal is alligator.</p>"


def test_bulk_defaults_fill_an_empty_replacement():
    default = parse_data('{ "name":"friend", "favoriteanimal":"unknown" }')
    assert render(MY_TEMPLATE, merge(default, parse_data("{}"))).subject == "Greetings, friend!"
    liu = render(MY_TEMPLATE, merge(default, parse_data('{ "name":"Liu", "favoriteanimal":"lion" }')))
    assert liu.html == "<h1>Hello Liu,</h1><p>Your favorite animal is lion.</p>"


def test_nested_attributes_and_each():
    out = render(PREFERENCES, ANAYA)
    assert out.subject == "Subscription Preferences for Anaya Iyengar"
    assert "<ul><li>Sports</li><li>Travel</li><li>Cooking</li></ul>" in out.html
    assert "- Sports\n- Travel\n- Cooking\n" in out.text
    assert "i.aspx?id=51806220607>" in out.html


def test_if_else_and_a_missing_list_is_no_failure():
    template = Template("Preferences2", PREFERENCES.subject, None, PREFERENCES2_HTML)
    with_list = render(template, merge(DEFAULTS, {**ANAYA, "subscription": [{"interest": "Sports"},
                                                                           {"interest": "Cooking"}]}))
    assert "<ul><li>Sports</li><li>Cooking</li></ul>" in with_list.html
    # Shirley's data has no subscription at all: the {{else}} branch, not a Rendering Failure
    without = render(template, SHIRLEY)
    assert "<p>Dear Shirley,</p><p>Please update your subscription preferences" in without.html
    assert "<ul>" not in without.html


def test_inline_partials():
    data = {"firstName": "Jane", "lastName": "Doe",
            "friends": [{"firstName": "John", "lastName": "Doe"}, {"firstName": "Jack"}]}
    out = render(PREFERENCES3, data)
    assert out.subject == "Jane's Subscription Preferences"
    assert out.html == ("<h1>Hello Jane Doe!</h1><p>You have listed the following people as your friends:</p>"
                        "<ul><li>John Doe</li><li>Jack</li></ul>")
    assert out.text == ("Hello Jane Doe! You have listed the following people as your friends:\n"
                        "- John Doe\n- Jack\n")


def test_helpers_with_unless_lookup_and_each_data():
    template = Template("h", "{{#with contact}}{{firstName}}{{/with}}",
                        "{{#unless vip}}regular{{/unless}} {{lookup contact 'firstName'}}"
                        " {{#each tags}}{{@index}}={{this}}{{#unless @last}},{{/unless}}{{/each}}")
    out = render(template, {"contact": {"firstName": "Ann"}, "vip": False, "tags": ["a", "b"]})
    assert out.subject == "Ann" and out.text == "regular Ann 0=a,1=b"


def test_values_are_escaped_in_html_only():
    template = Template("e", "{{v}}", "{{v}}", "<p>{{v}}</p><p>{{{v}}}</p>")
    out = render(template, {"v": "Tom & Jerry <b>\"hi\"</b>"})
    assert out.subject == out.text == "Tom & Jerry <b>\"hi\"</b>"
    assert out.html == ("<p>Tom &amp; Jerry &lt;b&gt;&quot;hi&quot;&lt;/b&gt;</p>"
                        "<p>Tom & Jerry <b>\"hi\"</b></p>")


def test_a_missing_attribute_is_a_rendering_failure_in_ses_words():
    with pytest.raises(RenderingFailure) as exc:
        render(MY_TEMPLATE, {"name": "Alejandro"})
    assert str(exc.value) == "Attribute 'favoriteanimal' is not present in the rendering data."
    with pytest.raises(RenderingFailure) as exc:
        render(PREFERENCES, {"contact": {"firstName": "A", "lastName": "B"}, "meta": {"userId": "1"},
                             "subscription": [{"topic": "x"}]})
    assert str(exc.value) == "Attribute 'interest' is not present in the rendering data."
    with pytest.raises(RenderingFailure):
        render(Template("s", "{{missing}}"), {})  # in the subject too
    # present but empty, false or null: rendered, not a failure
    assert render(Template("z", "[{{a}}][{{b}}][{{c}}]"), {"a": "", "b": False, "c": None}).subject == "[][false][]"


def test_bad_data_and_bad_templates():
    for text in ("not json", "[1, 2]", '"a string"'):
        with pytest.raises(TemplateDataError):
            parse_data(text)
    assert parse_data(None) == {} and parse_data("") == {}
    for bad in ("{{#if x}}never closed", "{{#each}}{{/if}}", "{{", "{{#if a}}A{{else if b}}B{{/if}}"):
        with pytest.raises(TemplateError):
            check(Template("bad", bad))
    check(MY_TEMPLATE)
    check(PREFERENCES3)


# --- messages built from Simple content -------------------------------------------------------------------------

def _parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def test_a_simple_message_is_well_formed():
    content = compose.Simple(
        "Mary Major <mary@example.com>", "Grüße, Ålejandro! " + "x" * 120,
        text="Dear A,\r\n" + "é" * 3000, html="<p>" + "a" * 5000 + "</p><img src=\"cid:logo\">",
        to=("Ålex <a@example.org>", "b@example.org"), cc=("c@example.org",), reply_to=("r@example.com",),
        headers=(("X-Campaign", "spring"),),
        attachments=(compose.Attachment(bytes(range(256)) * 10, "data.bin"),
                     compose.Attachment(b"GIF89a...", "logo.gif", disposition="INLINE", content_id="logo")))
    data = compose.build(content, message_id="0100abc@relay.test", date="Tue, 08 Dec 2026 00:00:00 +0000")
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 78 and b"\n" not in data.replace(b"\r\n", b"")
    assert all(line.isascii() for line in lines)
    message = _parse(data)
    assert message["Subject"] == content.subject and message["To"] == "Ålex <a@example.org>, b@example.org"
    assert message["Message-ID"] == "<0100abc@relay.test>" and message["Date"] == "Tue, 08 Dec 2026 00:00:00 +0000"
    assert message["X-Campaign"] == "spring" and message["Reply-To"] == "r@example.com"
    assert message.get_content_type() == "multipart/mixed"
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n").rstrip() == "Dear A,\n" + "é" * 3000
    assert message.get_body(("html",)).get_content().startswith("<p>aaa")
    attached = list(message.iter_attachments())
    assert [a.get_filename() for a in attached] == ["data.bin"] and attached[0].get_content() == bytes(range(256)) * 10
    related = next(p for p in message.walk() if p.get_content_type() == "multipart/related")
    assert related.get_payload()[1]["Content-ID"] == "<logo>"


def test_a_plain_ascii_message_is_7bit_and_has_no_date_unless_given():
    data = compose.build(compose.Simple("a@example.com", "Hi", text="Hello\r\n", to=("b@example.org",)))
    message = _parse(data)
    assert message["Content-Transfer-Encoding"] == "7bit" and message.get_content_type() == "text/plain"
    assert message["Date"] is None and message["Message-ID"] is None  # acceptance adds them (relay/core/intake.py)
    html_only = _parse(compose.build(compose.Simple("a@example.com", "Hi", html="<p>x</p>")))
    assert html_only.get_content_type() == "text/html"


def test_a_charset_the_client_names_is_used_when_it_can_write_the_text():
    data = compose.build(compose.Simple("a@example.com", "Hi", text="café", text_charset="ISO-8859-1"))
    assert _parse(data).get_content_charset() == "iso-8859-1"
    data = compose.build(compose.Simple("a@example.com", "Hi", text="日本", text_charset="ISO-8859-1"))
    assert _parse(data).get_content_charset() == "utf-8"


def test_addresses_as_ses_checks_them():
    assert compose.addr_spec("Mary <mary@example.com>") == "mary@example.com"
    with pytest.raises(compose.AddressError, match="Missing final '@domain'"):
        compose.addr_spec("mary")
    for bad in ("a@b.c, d@e.f", "", "x\r\n@example.com", "@example.com"):
        with pytest.raises(compose.AddressError):
            compose.addr_spec(bad)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=3000), st.text(max_size=3000), st.text(min_size=1, max_size=300))
def test_any_text_is_written_within_998_octets_and_reads_back(text, html, subject):
    data = compose.build(compose.Simple("a@example.com", subject, text=text, html=html, to=("b@example.org",)))
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    message = _parse(data)
    assert message["Subject"].split() == compose.one_line(subject).split()  # folding may change the whitespace
    normalised = text.replace("\r\n", "\n").replace("\r", "\n")
    got = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert got.rstrip("\n") == normalised.rstrip("\n") or got == normalised + "\n"
