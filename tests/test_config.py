import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay import config
from relay.config import ConfigError, check_password, hash_password
from relay.core import resolve as core_resolve
from relay.core.settings import TrackingSettings
from relay.resolve import build_model
from relay.store import StoredConfiguration

ROOT = Path(__file__).resolve().parent.parent


def settings_of(cfg, set_name):
    """The settings delivery resolves for a set of this file (no database)."""
    model, _ = build_model(cfg, StoredConfiguration([], [], [], [], 0))
    return core_resolve.resolve(model, set_name, "sender@example.com", cfg.https_available).settings


def parse(text: str, tmp_path: Path):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def test_example_config_is_valid_and_defines_marketing():
    cfg = config.load(ROOT / "config.example.toml")
    s = settings_of(cfg, "marketing")
    assert s.open_tracking and s.click_tracking
    assert cfg.smtp.max_message_size == 40 * 1024 * 1024
    assert cfg.upstream.type == "capture"
    assert not settings_of(cfg, None).enabled


def test_every_problem_is_named_by_its_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse("""
[smtp]
listen = "nowhere"
max_message_size = -1
trusted_networks = ["10.0.0.0/8", "not-a-net"]
colour = "blue"
[[smtp.users]]
username = "app"
password_hash = "plaintext"
[upstream]
type = "smtp"
tls = "sometimes"
[delivery]
max_age = "forever"
[configuration_sets."bad name"]
open_tracking = "yes"
[configuration_sets.ok]
https_policy = "ALWAYS"
custom_redirect_domain = "not a host"
""", tmp_path)
    text = "\n".join(err.value.problems)
    for key in ("smtp.listen", "smtp.max_message_size", "smtp.trusted_networks[1]", "smtp.colour: unknown key",
                "smtp.users[0].password_hash", "upstream.tls", "upstream.host", "delivery.max_age",
                "configuration_sets.bad name", "configuration_sets.bad name.open_tracking",
                "configuration_sets.ok.https_policy", "configuration_sets.ok.custom_redirect_domain"):
        assert key in text, key


def test_durations_paths_and_precedence(tmp_path):
    cfg = parse("""
[relay]
data_dir = "d"
[delivery]
max_age = "2h"
retry_initial = 5
[tracking]
default_host = "t.example.com"
https_policy = "REQUIRE"
https_hosts = ["t.example.com", "click.example.com"]
[configuration_sets.a]
open_tracking = true
custom_redirect_domain = "click.example.com"
""", tmp_path)
    assert cfg.delivery.max_age == 7200 and cfg.delivery.retry_initial == 5
    assert cfg.data_dir == tmp_path / "d"
    s = settings_of(cfg, "a")
    assert (s.host, s.https_policy, s.open_tracking, s.click_tracking) == ("click.example.com", "REQUIRE", True, False)
    assert s.is_tracking_host("t.example.com") and s.is_tracking_host("CLICK.example.com")


def test_passwords_are_salted_hashes():
    a, b = hash_password("pw"), hash_password("pw")
    assert a != b and "pw" not in a
    assert check_password("pw", a) and not check_password("PW", a) and not check_password("pw", "garbage")


def test_tracking_keys_file_created_private_and_rotatable(tmp_path):
    path = tmp_path / "keys"
    ring = config.load_or_create_keyring(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("new " + "11" * 32 + "\n" + path.read_text())
    rotated = config.load_or_create_keyring(path)
    assert rotated.signing.kid == "new" and rotated.secret(ring.signing.kid) == ring.signing.secret


def test_relay_check_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's relay, not whichever one is installed
    ok = subprocess.run([sys.executable, "-m", "relay.cli", "check", "--config", str(ROOT / "config.example.toml")],
                        capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 0\n")
    out = subprocess.run([sys.executable, "-m", "relay.cli", "check", "--config", str(bad)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "smtp.max_recipients" in out.stderr


def test_https_policy_needs_https_on_the_host(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse('[configuration_sets.a]\nhttps_policy = "REQUIRE_OPEN_ONLY"\ncustom_redirect_domain = "c.example.com"\n',
              tmp_path)
    assert "configuration_sets.a.https_policy" in err.value.problems[0] and "c.example.com" in err.value.problems[0]


def test_https_links_are_not_pointed_at_a_host_without_https(tmp_path):
    plain = parse("[configuration_sets.a]\nclick_tracking = true\n", tmp_path)
    s = settings_of(plain, "a")
    assert not s.https_available and s.click_base("https") == "http://localhost:8080/c/"
    assert any("has no HTTPS" in w for w in config.warnings(plain))
    proxied = parse('[tracking]\ndefault_host = "t.example.com"\nhttps_hosts = ["t.example.com"]\n'
                    "[configuration_sets.a]\nclick_tracking = true\n", tmp_path)
    s = settings_of(proxied, "a")
    assert s.click_base("https") == "https://t.example.com/c/" and s.click_base("http") == "http://t.example.com/c/"
    assert config.warnings(proxied) == []


def test_one_click_unsubscribe_without_https_is_warned_about(tmp_path):
    plain = parse("[configuration_sets.a]\nlist_unsubscribe = true\n[configuration_sets.b]\n", tmp_path)
    notes = [w for w in config.warnings(plain) if "list_unsubscribe" in w]
    assert len(notes) == 1 and notes[0].startswith("configuration_sets.a:")
    account = parse("[bounces]\nlist_unsubscribe = true\n[configuration_sets.b]\nlist_unsubscribe = false\n"
                    "[configuration_sets.c]\n", tmp_path)
    assert [w.split(":")[0] for w in config.warnings(account) if "list_unsubscribe" in w] == ["configuration_sets.c"]
    proxied = parse('[tracking]\ndefault_host = "t.example.com"\nhttps_hosts = ["t.example.com"]\n'
                    "[configuration_sets.a]\nlist_unsubscribe = true\n", tmp_path)
    assert config.warnings(proxied) == []


def test_bounce_and_suppression_settings_resolve_per_set(tmp_path):
    cfg = parse('[bounces]\ndomain = "Bounces.Example.COM."\ncomplaints_addresses = ["FBL@example.com"]\n'
                '[suppression]\nreasons = ["bounce", "COMPLAINT"]\n'
                '[configuration_sets.plain]\n'
                '[configuration_sets.own]\nverp = false\nlist_unsubscribe = true\nsuppression_reasons = []\n',
                tmp_path)
    assert cfg.feedback.bounce_domain == "bounces.example.com" and cfg.complaints_addresses == ("fbl@example.com",)
    plain, own = settings_of(cfg, "plain"), settings_of(cfg, "own")
    assert (plain.return_path_domain, plain.list_unsubscribe, plain.suppression_reasons) == (
        "bounces.example.com", False, ("BOUNCE", "COMPLAINT"))
    assert (own.return_path_domain, own.list_unsubscribe, own.suppression_reasons) == ("", True, ())
    no_set = settings_of(cfg, None)  # not instrumented, but its bounces come back through VERP
    assert no_set.return_path_domain == "bounces.example.com" and not no_set.list_unsubscribe
    assert TrackingSettings.from_json(own.to_json()) == own


def test_bounce_and_suppression_mistakes_name_their_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse('[bounces]\ndomain = "not a domain"\ncomplaints_addresses = ["nobody"]\nverp = "yes"\n'
              '[suppression]\nreasons = ["SPAM"]\n[configuration_sets.a]\nsuppression_reasons = ["X"]\n', tmp_path)
    text = "\n".join(err.value.problems)
    for key in ("bounces.domain", "bounces.complaints_addresses[0]", "bounces.verp", "suppression.reasons",
                "configuration_sets.a.suppression_reasons"):
        assert key in text, key
