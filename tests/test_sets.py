"""Configuration sets and tracking levels: precedence, default sets, SES implicit tracking, the CLI's errors.

The precedence tests go through the real store and the management functions (relay/sets.py) with a parsed
TOML file; the CLI tests run `python3 -m relay.cli` as a subprocess against a temporary config and database.
The tests that touch the store run on both backends (SQLite, PostgreSQL), but for two CLI tests (see there).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay import sets
from relay.config import load, parse
from relay.core import resolve as core
from relay.core.headers import split_header_block
from relay.core.resolve import Destination, TrackingOptions
from relay.pipeline import Refusal
from relay.resolve import Resolver
from relay.store import open_store

from .conftest import sqlite_run_only, store_toml
from .harness import db_connection

ROOT = Path(__file__).resolve().parent.parent

BASE_TOML = """
[relay]
data_dir = "data"
[tracking]
default_host = "t.example.net"
pixel_position = "bottom"
require_verified_domains = false
[configuration_sets.filed]
open_tracking = true
[configuration_sets.bare]
[[configuration_sets.bare.destinations]]
name = "opens"
type = "file"
path = "opens.jsonl"
event_types = ["OPEN"]
[[configuration_sets.bare.destinations]]
name = "clicks-off"
type = "file"
path = "clicks.jsonl"
event_types = ["CLICK"]
enabled = false
[identities."news@example.com"]
default_configuration_set = "filed"
"""


@pytest.fixture
def env(tmp_path, store_url):
    cfg = parse(__import__("tomllib").loads(BASE_TOML + store_toml(store_url)), tmp_path, tmp_path / "relay.toml")
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_target)
    yield cfg, store
    store.close()


def resolve(cfg, store, header_set, sender):
    return Resolver(cfg, store).resolve(header_set, sender)


# --- precedence ------------------------------------------------------------------------------------------------

def test_set_beats_domain_beats_account_beats_file(env):
    cfg, store = env
    sets.create_set(cfg, store, "news")
    sets.put_tracking(cfg, store, "account", "", TrackingOptions(pixel_position="top", https_policy="OPTIONAL",
                                                                  custom_redirect_domain="acct.example.net"))
    sets.put_tracking(cfg, store, "domain", "a.example.com", TrackingOptions(pixel_position="auto"))
    r = resolve(cfg, store, "news", "x@a.example.com")
    assert r.settings.pixel_position == "auto" and r.provenance["pixel_position"].startswith("sending domain")
    assert r.settings.host == "acct.example.net" and r.provenance["custom_redirect_domain"] == "account (database)"
    assert r.provenance["https_policy"] == "account (database)"
    sets.put_tracking(cfg, store, "set", "news", TrackingOptions(pixel_position="bottom"))
    r = resolve(cfg, store, "news", "x@a.example.com")
    assert r.settings.pixel_position == "bottom"
    assert r.provenance["pixel_position"] == "configuration set news (database)"
    # Without the account level, the [tracking] table of the file is the last level.
    sets.delete_tracking(cfg, store, "account", "")
    r = resolve(cfg, store, "news", "x@b.example.com")
    assert r.settings.host == "t.example.net" and r.provenance["custom_redirect_domain"] == "[tracking] (config file)"


def test_a_domain_added_after_the_account_level_inherits_it(env):
    cfg, store = env
    sets.create_set(cfg, store, "news")
    sets.put_tracking(cfg, store, "account", "", TrackingOptions(open_tracking=True, pixel_position="top"))
    # A sending domain nobody configured, first seen after the account level was set.
    r = resolve(cfg, store, "news", "someone@brand-new.example")
    assert r.settings.open_tracking and r.settings.pixel_position == "top"
    assert r.provenance["open_tracking"] == "account (database)"
    # Configuring that domain later overrides only what it sets.
    sets.put_tracking(cfg, store, "domain", "Brand-New.example", TrackingOptions(open_tracking=False))
    r = resolve(cfg, store, "news", "someone@brand-new.example")
    assert not r.settings.open_tracking and r.settings.pixel_position == "top"
    assert r.provenance["open_tracking"] == "sending domain brand-new.example (database)"


def test_without_a_set_nothing_is_instrumented_whatever_the_levels_say(env):
    cfg, store = env
    sets.put_tracking(cfg, store, "account", "", TrackingOptions(open_tracking=True, click_tracking=True))
    r = resolve(cfg, store, None, "x@nowhere.example")
    assert r.set_name is None and not r.settings.enabled


# --- default configuration sets ---------------------------------------------------------------------------------

def test_default_sets_address_beats_domain_header_beats_both(env):
    cfg, store = env
    sets.create_set(cfg, store, "domainwide")
    sets.set_identity_default(cfg, store, "example.com", "domainwide")
    assert resolve(cfg, store, None, "news@example.com").set_name == "filed"  # address (file) over domain
    r = resolve(cfg, store, None, "other@example.com")
    assert r.set_name == "domainwide" and "identity example.com" in r.set_reason
    assert resolve(cfg, store, "bare", "news@example.com").set_name == "bare"  # the header wins
    assert resolve(cfg, store, None, "x@elsewhere.example").set_name is None


def test_a_deleted_default_set_refuses_the_mail(env):
    cfg, store = env
    sets.create_set(cfg, store, "gone")
    sets.set_identity_default(cfg, store, "ops@example.org", "gone")
    assert resolve(cfg, store, None, "ops@example.org").set_name == "gone"
    sets.delete_set(cfg, store, "gone")
    with pytest.raises(Refusal) as err:
        Resolver(cfg, store).resolve_or_refuse(None, "ops@example.org")
    assert err.value.reply == "554 Configuration Set does not exist: Configuration set <gone> does not exist."
    problems, _ = sets.check_database(cfg, store)
    assert any("ops@example.org" in p and "gone" in p for p in problems)


def test_sender_identity_is_the_from_address_else_mail_from():
    block = split_header_block(b'From: "News, Team" <News@Example.com>\r\nTo: a@b.c\r\n\r\nbody')
    assert core.sender_identity(block, "bounce+x@bounces.example.net") == "news@example.com"
    assert core.sender_identity(split_header_block(b"To: a@b.c\r\n\r\n"), "<App@Example.org>") == "app@example.org"


# --- SES implicit tracking -------------------------------------------------------------------------------------

def test_implicit_switches_follow_enabled_destinations(env):
    cfg, store = env
    r = resolve(cfg, store, "bare", "x@example.net")  # OPEN destination enabled, CLICK one disabled
    assert r.settings.open_tracking and not r.settings.click_tracking
    assert "opens" in r.provenance["open_tracking"] and r.provenance["click_tracking"].startswith("implicit: no")
    sets.create_set(cfg, store, "hooks")
    assert not resolve(cfg, store, "hooks", "x@example.net").settings.enabled  # no destination: no tracking
    dest = Destination("d", ("CLICK",), "webhook", url="http://127.0.0.1:9/")
    sets.add_destination(cfg, store, "hooks", dest)
    r = resolve(cfg, store, "hooks", "x@example.net")
    assert r.settings.click_tracking and not r.settings.open_tracking
    sets.update_destination(cfg, store, "hooks", "d", {"enabled": False})
    assert not resolve(cfg, store, "hooks", "x@example.net").settings.click_tracking
    sets.update_destination(cfg, store, "hooks", "d", {"enabled": True})
    sets.put_tracking(cfg, store, "set", "hooks", TrackingOptions(click_tracking=False))  # explicit beats implicit
    assert not resolve(cfg, store, "hooks", "x@example.net").settings.click_tracking
    # An explicit switch at the account level also beats the implicit rule (Tencent Cloud's account level).
    sets.put_tracking(cfg, store, "account", "", TrackingOptions(open_tracking=True))
    assert resolve(cfg, store, "hooks", "x@example.net").settings.open_tracking


def test_changes_reach_a_running_resolver_through_the_counter(env):
    cfg, store = env
    resolver = Resolver(cfg, store)
    with pytest.raises(core.UnknownSet):
        resolver.resolve("later", "a@b.example")
    other = open_store(cfg.store_target)  # another process's view: a separate connection and writer
    try:
        sets.create_set(cfg, other, "later")
    finally:
        other.close()
    assert resolver.resolve("later", "a@b.example").set_name == "later"


def test_nothing_half_written_at_the_destination_limit(env):
    cfg, store = env
    sets.create_set(cfg, store, "many")
    for i in range(core.MAX_DESTINATIONS):
        sets.add_destination(cfg, store, "many", Destination(f"d{i}", ("SEND",), "file", path=f"/tmp/d{i}"))
    with pytest.raises(sets.SesError) as err:
        sets.add_destination(cfg, store, "many", Destination("d10", ("SEND",), "file", path="/tmp/d10"))
    assert err.value.code == "LimitExceeded"
    rows = store.query("SELECT COUNT(*) FROM event_destinations WHERE configuration_set = 'many'")
    cursors = store.query("SELECT COUNT(*) FROM destination_cursors WHERE configuration_set = 'many'")
    assert rows[0][0] == 10 and cursors[0][0] == 10


# --- the CLI ---------------------------------------------------------------------------------------------------

def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config", str(tmp / "relay.toml")],
                          capture_output=True, text=True, cwd=tmp, env={"PYTHONPATH": str(ROOT)}, timeout=60)


@pytest.fixture
def cfgdir(tmp_path, store_url):
    (tmp_path / "relay.toml").write_text(BASE_TOML + store_toml(store_url))
    return tmp_path


def db_rows(tmp: Path, sql: str) -> list[tuple]:
    with contextlib.closing(db_connection(load(tmp / "relay.toml").store_target)) as conn:
        return conn.execute(sql).fetchall()


def expect_error(out: subprocess.CompletedProcess, code: str, *words: str) -> None:
    assert out.returncode != 0, out.stdout
    assert f"error: {code}: " in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


CLI_ERRORS = [
    (("config-set", "show", "nope"), "ConfigurationSetDoesNotExist", "Configuration set <nope> does not exist."),
    (("config-set", "delete", "nope"), "ConfigurationSetDoesNotExist", "<nope>"),
    (("config-set", "create", "news"), "ConfigurationSetAlreadyExists", "<news> already exists"),
    (("config-set", "create", "filed"), "ConfigurationSetAlreadyExists", "<filed>"),
    (("config-set", "create", "bad.name"), "InvalidConfigurationSet", "ConfigurationSetName"),
    (("config-set", "delete", "filed"), "InvalidConfigurationSet", "read-only"),
    (("config-set", "default", "a@example.com", "--set", "nope"), "ConfigurationSetDoesNotExist", "<nope>"),
    (("tracking", "set", "--config-set", "news", "--open", "on", "--create"), "TrackingOptionsAlreadyExists",
     "already has tracking options"),
    (("tracking", "set", "--domain", "x.example", "--open", "on", "--update"), "TrackingOptionsDoesNotExist",
     "sending domain x.example"),
    (("tracking", "delete", "--account"), "TrackingOptionsDoesNotExist", "the account"),
    (("tracking", "set", "--config-set", "news"), "InvalidTrackingOptions", "At least one field"),
    (("tracking", "set", "--account", "--custom-redirect-domain", "bad_label.example"), "InvalidTrackingOptions",
     "not a valid domain"),
    (("tracking", "set", "--account", "--https-policy", "SOMETIMES"), "InvalidTrackingOptions", "HttpsPolicy"),
    (("tracking", "set", "--account", "--https-policy", "REQUIRE"), "InvalidTrackingOptions", "https://t.example.net"),
    (("tracking", "set", "--config-set", "nope", "--open", "on"), "ConfigurationSetDoesNotExist", "<nope>"),
    (("tracking", "set", "--config-set", "filed", "--open", "off"), "InvalidConfigurationSet", "read-only"),
    (("tracking", "show", "--sender", "a@b.example", "--config-set", "nope"), "ConfigurationSetDoesNotExist", "<nope>"),
    (("destination", "add", "news", "d1", "--events", "OPEN", "--url", "http://127.0.0.1:9/"),
     "EventDestinationAlreadyExists", "<d1>"),
    (("destination", "add", "nope", "d1", "--events", "OPEN", "--url", "http://127.0.0.1:9/"),
     "ConfigurationSetDoesNotExist", "<nope>"),
    (("destination", "add", "bare", "d9", "--events", "OPEN", "--url", "http://127.0.0.1:9/"),
     "InvalidConfigurationSet", "read-only"),
    (("destination", "add", "news", "d2", "--events", "OPEN,BOGUS", "--url", "http://127.0.0.1:9/"),
     "ValidationError", "MatchingEventTypes", "BOGUS"),
    (("destination", "add", "news", "d2", "--events", "OPEN", "--url", "ftp://example.com/"),
     "ValidationError", "EventDestination.Url"),
    (("destination", "add", "news", "bad name", "--events", "OPEN", "--url", "http://127.0.0.1:9/"),
     "ValidationError", "EventDestination.Name"),
    (("destination", "add", "news", "d2", "--type", "file"), "ValidationError", "MatchingEventTypes"),
    (("destination", "update", "news", "zz", "--events", "SEND"), "EventDestinationDoesNotExist", "<zz>"),
    (("destination", "enable", "news", "zz"), "EventDestinationDoesNotExist", "<zz>"),
    (("destination", "disable", "nope", "d1"), "ConfigurationSetDoesNotExist", "<nope>"),
    (("destination", "delete", "news", "zz"), "EventDestinationDoesNotExist", "<zz>"),
    (("destination", "update", "news", "d1", "--url", "mailto:x@example.com"), "ValidationError", "Url"),
]


# The CLI's refusals and its output are the same on either backend and each call is a process (about a second
# on PostgreSQL): SQLite only. The same writes and reads run on both backends in the tests above and in
# test_relay_check_reports_database_problems_and_conflicts.
@sqlite_run_only
def test_every_cli_error_names_ses_error_and_writes_nothing(cfgdir):
    assert cli(cfgdir, "config-set", "create", "news").returncode == 0
    assert cli(cfgdir, "tracking", "set", "--config-set", "news", "--open", "on").returncode == 0
    ok = cli(cfgdir, "destination", "add", "news", "d1", "--events", "OPEN,click", "--url", "http://127.0.0.1:9/h",
             "--secret", "s3cret", "--sns-envelope")
    assert ok.returncode == 0, ok.stderr
    before = [db_rows(cfgdir, f"SELECT * FROM {t} ORDER BY 1, 2") for t in
              ("configuration_sets", "tracking_options", "identity_sets", "event_destinations", "destination_cursors")]
    for args, code, *words in CLI_ERRORS:
        expect_error(cli(cfgdir, *args), code, *words)
    after = [db_rows(cfgdir, f"SELECT * FROM {t} ORDER BY 1, 2") for t in
             ("configuration_sets", "tracking_options", "identity_sets", "event_destinations", "destination_cursors")]
    assert after == before


@sqlite_run_only  # as the test above
def test_cli_happy_path_and_show_provenance(cfgdir):
    assert cli(cfgdir, "config-set", "create", "news").returncode == 0
    out = cli(cfgdir, "tracking", "set", "--domain", "example.com", "--pixel-position", "top", "--create")
    assert out.returncode == 0 and json.loads(out.stdout)["TrackingOptions"] == {"pixel_position": "top"}
    assert cli(cfgdir, "config-set", "default", "example.com", "--set", "news").returncode == 0
    assert cli(cfgdir, "destination", "add", "news", "hook", "--events", "CLICK,SEND",
               "--url", "https://hooks.example/x").returncode == 0
    shown = json.loads(cli(cfgdir, "tracking", "show", "--sender", "a@example.com", "--json").stdout)
    assert shown["ConfigurationSet"] == "news" and "identity example.com" in shown["ChosenBy"]
    assert shown["Settings"]["click_tracking"] and not shown["Settings"]["open_tracking"]
    assert "hook" in shown["Provenance"]["click_tracking"]
    assert shown["Provenance"]["pixel_position"] == "sending domain example.com (database)"
    text = cli(cfgdir, "tracking", "show", "--sender", "a@example.com").stdout
    assert "pixel_position: top  [sending domain example.com (database)]" in text
    listed = cli(cfgdir, "config-set", "list").stdout.split("\n")
    assert "news\tdatabase" in listed and "filed\tconfig" in listed
    desc = json.loads(cli(cfgdir, "config-set", "show", "news").stdout)
    assert desc["EventDestinations"][0]["MatchingEventTypes"] == ["CLICK", "SEND"]
    assert desc["DefaultOf"] == ["example.com"]
    assert cli(cfgdir, "destination", "disable", "news", "hook").returncode == 0
    assert not json.loads(cli(cfgdir, "config-set", "show", "news").stdout)["EventDestinations"][0]["Enabled"]
    assert cli(cfgdir, "tracking", "delete", "--domain", "example.com").returncode == 0
    assert cli(cfgdir, "config-set", "delete", "news").returncode == 0
    assert db_rows(cfgdir, "SELECT COUNT(*) FROM event_destinations")[0][0] == 0


def test_relay_check_reports_database_problems_and_conflicts(cfgdir):
    assert cli(cfgdir, "config-set", "create", "clash").returncode == 0
    assert cli(cfgdir, "config-set", "create", "temp").returncode == 0
    assert cli(cfgdir, "config-set", "default", "x@example.org", "--set", "temp").returncode == 0
    assert cli(cfgdir, "config-set", "delete", "temp").returncode == 0
    with open(cfgdir / "relay.toml", "a") as f:
        f.write("\n[configuration_sets.clash]\nclick_tracking = true\n")
    out = subprocess.run([sys.executable, "-m", "relay.cli", "check", "--config", str(cfgdir / "relay.toml")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 1
    assert "conflict: configuration set clash is defined in both" in out.stderr
    assert "identity x@example.org" in out.stderr and "<temp> does not exist" in out.stderr


def test_toml_destinations_and_domains_are_validated(tmp_path):
    bad = """
[configuration_sets.a]
[[configuration_sets.a.destinations]]
name = "w"
type = "webhook"
url = "gopher://x"
event_types = ["OPEN"]
[[configuration_sets.a.destinations]]
name = "f"
type = "file"
path = "x.jsonl"
event_types = ["NOPE"]
[domains."example.com".tracking]
pixel_position = "middle"
[identities."a@example.com"]
default_configuration_set = ""
"""
    from relay.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse(__import__("tomllib").loads(bad), tmp_path)
    text = "\n".join(err.value.problems)
    assert "configuration_sets.a.destinations[0]: EventDestination.Url" in text
    assert "configuration_sets.a.destinations[1]: EventDestination.MatchingEventTypes" in text
    assert "domains.example.com.tracking.pixel_position" in text
    assert "identities.a@example.com.default_configuration_set" in text
