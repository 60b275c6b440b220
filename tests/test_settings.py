"""Configuration: one typed object, TOML + environment, refusing bad values by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings, SettingsError

#: An [mpp] section with no evm intent: what a Stripe-only gateway needs (no chain).
MPP = {"enabled": True, "secret": "s" * 32, "charge": False, "session": False}
BASE = {"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"upstream": "u", "output_per_mtok": "0.60"}}}


def test_defaults_load_and_secrets_are_masked() -> None:
    token = "s3cret-admin-token-42"
    settings = Settings.load(None, env={"TOLLSTREAM_ADMIN_TOKEN": token,
                                        "TOLLSTREAM_UPSTREAMS__SIM__API_KEY": "upkey"})
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == token
    assert token not in repr(settings) and "upkey" not in repr(settings)
    assert settings.upstreams["sim"].key() == "upkey"
    # Current model names route to the simulator, priced from the shipped table.
    assert [(r.match, r.dialect) for r in settings.routes] == [
        ("claude-*", "anthropic_messages"), ("gpt-*", "openai_responses"),
        ("gpt-*", "openai_chat")]


def test_env_overrides_toml(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('lease_tokens = 8\n[upstreams.u]\nbase_url = "http://x/v1"\n'
                      '[models.m]\nupstream = "u"\noutput_per_mtok = "1"\n')
    settings = Settings.load(config, env={"TOLLSTREAM_LEASE_TOKENS": "32"})
    assert settings.lease_tokens == 32


@pytest.mark.parametrize(("patch", "key"), [
    ({"models": {"m": {"upstream": "nope", "output_per_mtok": "1"}}}, "models.m.upstream"),
    ({"models": {"m": {"upstream": "u", "output_per_mtok": "-1"}}}, "models.m.output_per_mtok"),
    ({"models": {"m": {"upstream": "u", "output_per_mtok": "0.0000001"}}},
     "models.m.output_per_mtok"),
    ({"models": {"m": {"upstream": "u", "output_per_mtok": "1", "tokenizer": "x"}}},
     "models.m.tokenizer"),
    ({"lease_tokens": 0}, "lease_tokens"),
    ({"surprise": 1}, "surprise"),
    ({"x402": {"enabled": True, "pay_to": "0x1"}}, "pay_to"),
    ({"routes": [{"match": "x*", "upstream": "nope"}]}, "routes.0.upstream"),
    ({"routes": [{"match": "x*", "upstream": "u", "input_per_mtok": "1"}]},
     "routes.0.output_per_mtok"),
    ({"routes": [{"match": "x*", "upstream": "u", "output_per_mtok": "0.0000001"}]},
     "routes.0.output_per_mtok"),
    ({"prices": {"m2": {"output_per_mtok": "abc"}}}, "prices.m2.output_per_mtok"),
    ({"admin_token": ""}, "admin_token"),
    ({"admin_token": "short"}, "admin_token"),
    ({"admin_token": "   padded-with-blanks-0123   "}, "admin_token"),
    ({"stripe": {"enabled": True, "secret_key_env": "TOLLSTREAM_TEST_NO_SUCH_VAR"}},
     "TOLLSTREAM_TEST_NO_SUCH_VAR"),
    ({"stripe": {"enabled": True, "secret_key_env": "PATH", "network_id": "p"}}, "[mpp]"),
    ({"stripe": {"enabled": True, "secret_key_env": "PATH"}, "mpp": MPP}, "network_id"),
    ({"stripe": {"enabled": True, "secret_key_env": "PATH", "network_id": "p",
                 "credit": "1.001"}, "mpp": MPP}, "stripe.credit"),
    ({"stripe": {"enabled": True, "secret_key_env": "PATH", "network_id": "p",
                 "currency": "USD"}, "mpp": MPP}, "stripe.currency"),
    ({"mpp": {**MPP, "charge": True}}, "network"),
])
def test_bad_config_is_refused_naming_the_key(patch: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_mapping({**BASE, **patch})
    assert key in str(info.value)


def test_serve_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[upstreams.u]\nbase_url = "http://x"\n'
                      '[models.m]\nupstream = "u"\noutput_per_mtok = "abc"\n')
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "models.m.output_per_mtok" in result.stderr


@pytest.mark.parametrize("token", ["", "123456789012345"])
def test_serve_refuses_an_empty_or_short_admin_token(tmp_path: Path, token: str) -> None:
    """An empty TOLLSTREAM_ADMIN_TOKEN used to open the admin API to anyone."""
    import os
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TOLLSTREAM_ADMIN_TOKEN": token})
    assert result.returncode == 2
    assert "TOLLSTREAM_ADMIN_TOKEN" in result.stderr and "admin_token" in result.stderr
    assert token == "" or token not in result.stderr  # the secret is never echoed


def test_the_example_config_is_valid() -> None:
    """tollstream.example.toml shows every key: it must load as it is."""
    example = Path(__file__).resolve().parents[1] / "tollstream.example.toml"
    settings = Settings.load(example, env={"TOLLSTREAM_ADMIN_TOKEN": "x" * 20})
    assert settings.routes and settings.prices and settings.rate_limit.enabled


def test_variables_settings_name_are_not_settings() -> None:
    """TOLLSTREAM_MPP_SECRET and friends are read by the settings that name them; they are no
    setting of their own (they used to be refused as unknown keys)."""
    settings = Settings.load(None, env={"TOLLSTREAM_MPP_SECRET": "x" * 32,
                                        "TOLLSTREAM_STRIPE_SECRET_KEY": "sk_test_1",
                                        "TOLLSTREAM_RELAYER_KEY": "0x" + "11" * 32,
                                        "TOLLSTREAM_LEASE_TOKENS": "8"})
    assert settings.lease_tokens == 8
