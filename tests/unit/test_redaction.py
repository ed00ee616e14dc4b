"""The built-in redactors and the AFTERWRITE_REDACT rules, as pure functions."""

from __future__ import annotations

import pytest

from afterwrite.core import redaction
from afterwrite.core.errors import SettingsError
from afterwrite.core.settings import load_settings

ALL = redaction.builtin_redactor(redaction.BUILTIN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe+tag@example.co.uk today", "write to <EMAIL> today"),
        ("call +44 20 7946 0958", "call <PHONE>"),
        ("call (555) 123-4567 or 555.123.4567", "call <PHONE> or <PHONE>"),
        ("card 4111 1111 1111 1111.", "card <CARD>."),
        ("card 5500-0000-0000-0004", "card <CARD>"),
        ("amex 378282246310005", "amex <CARD>"),
        ("key sk-proj-Abcdefghijklmnop1234", "key <SECRET>"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws <SECRET>"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "gh <SECRET>"),
        ("slack xoxb-1234567890-abcdefghij", "slack <SECRET>"),
        ("Authorization: Bearer abcdef0123456789xyz==", "Authorization: Bearer <SECRET>"),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0",
            "jwt <SECRET>",
        ),
        ("from 192.168.1.20, to 10.0.0.1", "from <IP>, to <IP>"),
        ("v6 2001:db8::8a2e:370:7334 and ::1", "v6 <IP> and <IP>"),
    ],
)
def test_each_builtin_replaces_its_spans_with_a_typed_placeholder(text: str, expected: str) -> None:
    assert ALL(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # fails the Luhn check
        "released 2024-05-12 at 12:30:45",  # a date and a time
        "version 1.2.3.4.5, build 300.1.1.1",  # not addresses
        "order 12345678, epoch 1733250000",  # bare digit runs are ids, not phones
        "std::vector and a::b::c",
        "no secrets in sk-short",
    ],
)
def test_lookalikes_are_left_alone(text: str) -> None:
    assert ALL(text) == text


def test_only_the_named_redactors_run() -> None:
    only_email = redaction.builtin_redactor(["email"])
    text = "a@b.io from 10.0.0.1 card 4111111111111111"
    assert only_email(text) == "<EMAIL> from 10.0.0.1 card 4111111111111111"


def test_luhn() -> None:
    assert redaction.luhn_ok("4111111111111111")
    assert not redaction.luhn_ok("4111111111111112")


def test_a_kind_redactor_walks_json_fields_and_reports_what_ran() -> None:
    rules = redaction.parse_rules({"query.metadata": "email", "query.query": "all"}, hook=False)
    by_kind = redaction.redactors(rules, None, None)
    payload = {
        "id": "x",
        "query": "mail a@b.io",
        "metadata": {"to": ["c@d.io", 3], "n": 1},
        "user_id": "e@f.io",  # not named: left alone
    }
    out, ran = by_kind["query"].apply(payload)
    assert out == {
        "id": "x",
        "query": "mail <EMAIL>",
        "metadata": {"to": ["<EMAIL>", 3], "n": 1},
        "user_id": "e@f.io",
    }
    assert ran == ["card", "email", "ip", "phone", "secret"]
    assert payload["query"] == "mail a@b.io"  # the input is not changed


def test_a_raising_redactor_says_so_without_the_text() -> None:
    rules = redaction.parse_rules({"query.query": "custom"}, hook=True)
    hook = redaction.load_hook("tests.redactors:explode")
    by_kind = redaction.redactors(rules, None, hook)
    with pytest.raises(redaction.RedactionFailed) as caught:
        by_kind["query"].apply({"query": "secret text"})
    assert caught.value.code == "redaction_failed"
    assert "secret text" not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AFTERWRITE_REDACT": "query=all"}, "expected kind.field"),
        ({"AFTERWRITE_REDACT": "query.query=emails"}, "unknown redactor(s) emails"),
        ({"AFTERWRITE_REDACT": "query.query=custom"}, "'custom' needs AFTERWRITE_REDACTOR"),
        ({"AFTERWRITE_REDACT": "query.query"}, "expected kind.field=redactors"),
        ({"AFTERWRITE_REDACTOR": "not a spec"}, "AFTERWRITE_REDACTOR: 'not a spec' must be"),
    ],
)
def test_bad_redaction_settings_fail_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match="AFTERWRITE_REDACT") as caught:
        load_settings(env)
    assert message in str(caught.value)


def test_all_includes_the_hook_when_one_is_set() -> None:
    s = load_settings(
        {"AFTERWRITE_REDACT": "query.*=all", "AFTERWRITE_REDACTOR": "tests.redactors:names"}
    )
    assert s.redaction_rules() == {("query", "*"): frozenset({*redaction.BUILTIN, "custom"})}
