"""HTTP API tokens and Kafka secrets in Settings (issue 24), without a broker."""

from __future__ import annotations

import pytest

from app.api_auth import ApiTokensError, parse_tokens, required_role, role_of
from app.settings import Settings, SettingsError


def test_tokens_parse_with_their_roles():
    tokens = parse_tokens("read:r1, write:w1\nadmin:a1")
    assert [t.role for t in tokens] == ["read", "write", "admin"]
    assert role_of("w1", tokens) == "write"
    assert role_of("a1", tokens) == "admin"
    assert role_of("nope", tokens) is None
    assert role_of("", tokens) is None
    assert parse_tokens("") == []


@pytest.mark.parametrize("bad", ["r1", "boss:x", "read:", ":x"])
def test_a_malformed_entry_is_refused_without_showing_the_token(bad):
    with pytest.raises(ApiTokensError) as caught:
        parse_tokens(f"read:ok,{bad}")
    assert "entry 2" in str(caught.value)
    secret = bad.partition(":")[2]
    if secret:
        assert secret not in str(caught.value)


@pytest.mark.parametrize("method,path,role", [
    ("GET", "/api/v1/pipelines", "read"),
    ("GET", "/api/v1/aggregate/w", "read"),
    ("POST", "/api/v1/produce", "write"),
    ("POST", "/api/v1/process", "write"),
    ("POST", "/api/v1/aggregate", "write"),
    ("POST", "/api/v1/patterns", "admin"),
    ("DELETE", "/api/v1/patterns/p", "admin"),
    ("PUT", "/api/v1/reference/users", "admin"),
])
def test_each_route_needs_its_role(method, path, role):
    assert required_role(method, path) == role


def test_secrets_come_from_files_and_are_never_shown(tmp_path):
    (tmp_path / "password").write_text("s3cret-pass\n")
    (tmp_path / "tokens").write_text("admin:tok-123\n")
    settings = Settings.from_env({
        "STREAMETL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAMETL_KAFKA_SASL_USERNAME": "me",
        "STREAMETL_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "password"),
        "STREAMETL_API_TOKENS_FILE": str(tmp_path / "tokens"),
    })
    assert settings.kafka_sasl_password == "s3cret-pass"
    assert settings.api_tokens == "admin:tok-123"
    shown = settings.shown()
    assert shown["kafka_sasl_password"] == "****" and shown["api_tokens"] == "****"
    assert "s3cret" not in repr(settings) and "tok-123" not in repr(settings)


@pytest.mark.parametrize("env,named", [
    ({"STREAMETL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "kafka_sasl_username"),
    ({"STREAMETL_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka_security_protocol"),
    ({"STREAMETL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMETL_KAFKA_SASL_USERNAME": "u",
      "STREAMETL_KAFKA_SASL_PASSWORD": "p", "STREAMETL_KAFKA_SASL_MECHANISM": "GSSAPI"}, "kafka_sasl_mechanism"),
    ({"STREAMETL_KAFKA_SSL_CAFILE": "/nowhere/ca.pem"}, "kafka_ssl_cafile"),
    ({"STREAMETL_WEB_SSL_CERTFILE": "/nowhere/cert.pem"}, "web_ssl_certfile"),
    ({"STREAMETL_KAFKA_SASL_PASSWORD_FILE": "/nowhere/secret"}, "STREAMETL_KAFKA_SASL_PASSWORD_FILE"),
])
def test_incomplete_security_settings_name_the_setting(env, named):
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_every_kafka_client_of_the_app_gets_the_security_options():
    """A client built without them cannot reach a secured broker (issue 24)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    missing = []
    for folder in ("app", "agents", "tables", "web", "operators"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"AIOKafka(Consumer|Producer|AdminClient)\(", text):
                call = text[match.start():text.find("\n\n", match.start())]
                if "client_options(" not in call[: call.find(")\n") + 2 if ")\n" in call else len(call)]:
                    missing.append(f"{path.relative_to(root)}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not missing, missing
