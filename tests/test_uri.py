"""relay.core.uri: a link's URI form for a Location header (IDNA host, UTF-8 %XX escapes, ASCII untouched)."""

from __future__ import annotations

from urllib.parse import unquote

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.uri import to_uri


@pytest.mark.parametrize("iri, uri", [
    ("https://bücher.example/straße?q=größe", "https://xn--bcher-kva.example/stra%C3%9Fe?q=gr%C3%B6%C3%9Fe"),
    # existing escapes stay as they are, only the raw characters beside them change
    ("https://bücher.example:8080/a%20b/ü?x=%E2%82%AC&y=€#ä",
     "https://xn--bcher-kva.example:8080/a%20b/%C3%BC?x=%E2%82%AC&y=%E2%82%AC#%C3%A4"),
    ("https://shop.example/ü?a=1&b=2#x", "https://shop.example/%C3%BC?a=1&b=2#x"),
    ("https://jörg:pä@bücher.example/", "https://j%C3%B6rg:p%C3%A4@xn--bcher-kva.example/"),
    ("http://[::1]:80/ü", "http://[::1]:80/%C3%BC"),
    ("https://BÜCHER.Example/", "https://xn--bcher-kva.example/"),  # UTS #46 maps case, as browsers do
    ("https://bücher。example/", "https://xn--bcher-kva.example/"),  # ideographic full stop: a label separator
    ("https://faß.de/", "https://xn--fa-hia.de/"),  # non-transitional: ß kept (IDNA 2003 would say fass.de)
    ("https://a_b.bücher.example/", "https://a_b.xn--bcher-kva.example/"),  # ASCII labels untouched
    ("https://☃.net/", "https://%E2%98%83.net/"),  # IDNA 2008 refuses it; a browser decodes and maps it itself
    ("https://bücher.example:/x", "https://xn--bcher-kva.example:/x"),
    ("https://bücher.example", "https://xn--bcher-kva.example"),
])
def test_examples(iri, uri):
    assert to_uri(iri) == uri


@pytest.mark.parametrize("uri", [
    "https://shop.example/p?q=a%20b&r=%E2%82%AC#frag?x=1&y",
    "https://xn--bcher-kva.example/path/",
    "HTTP://Shop.Example:8081/a;b,c/~d?e=f=g",
    "https://shop.example/%zz%/<>\"{}|\\^`?",  # not even a valid URI: sent as the sender wrote it
    "https://shop.example/a b",
    "",
])
def test_ascii_links_are_returned_byte_for_byte(uri):
    assert to_uri(uri) is uri


def test_a_lone_surrogate_cannot_be_sent():
    with pytest.raises(UnicodeEncodeError):
        to_uri("https://shop.example/\ud800")


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_label = st.text(st.characters(min_codepoint=0x61, max_codepoint=0x24F, blacklist_categories=("Cs",)),
                 min_size=1, max_size=12)


@given(st.text(st.characters(max_codepoint=0x7F), max_size=80))
def test_any_ascii_text_is_unchanged(text):
    assert to_uri(text) is text


@given(_text)
def test_the_result_is_ascii_and_idempotent(text):
    uri = to_uri(text)
    assert uri.isascii()
    assert to_uri(uri) == uri


@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="%"), max_size=40))
def test_path_query_and_fragment_decode_back_to_the_link(rest):
    # a server that decodes %XX as UTF-8 (every one does) reads the characters the link has
    assert unquote(to_uri("https://shop.example/" + rest), errors="strict") == "https://shop.example/" + rest


@given(st.lists(_label, min_size=1, max_size=3))
def test_the_host_reads_back_as_the_mapped_link_host(labels):
    host = ".".join(labels) + ".example"
    sent = to_uri(f"https://{host}/x")[len("https://"):-len("/x")]
    assert sent.isascii()
    if "%" in sent:  # a label IDNA refuses: the whole host escaped, for the browser to map
        assert unquote(sent, errors="strict") == host
    else:
        back = ".".join(idna.ulabel(label) if label.startswith("xn--") else label for label in sent.split("."))
        assert back == idna.uts46_remap(host, std3_rules=False, transitional=False)
