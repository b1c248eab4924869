"""API keys and whom they name."""

from __future__ import annotations

import base64
import hashlib
import secrets

import pytest

from tandem.errors import ConfigurationError
from tandem.keys import parse_key, parse_keys
from tandem.settings import load_settings


def test_a_named_key_names_its_client_and_a_bare_one_its_digest() -> None:
    named = parse_key("ci-bot=s3cret-value-0123456789")
    assert (named.identity, named.named) == ("ci-bot", True)
    assert named.digest == hashlib.sha256(b"s3cret-value-0123456789").digest()
    bare = parse_key("s3cret-value-0123456789")
    assert bare.identity == hashlib.sha256(b"s3cret-value-0123456789").hexdigest()[:16]
    assert not bare.named
    assert "s3cret" not in repr(named) + repr(bare)


@pytest.mark.parametrize(
    "key",
    [
        secrets.token_urlsafe(32),
        secrets.token_hex(32),
        base64.b64encode(secrets.token_bytes(31)).decode(),  # ends in =
        base64.b64encode(secrets.token_bytes(32)).decode(),  # ends in ==
        "YWJjZA==",  # base64 with no + or /: its part before the padding reads as a name
        "YWJjZGU=",
        "=starts-with-an-equals",
        "9lives=a-name-starts-with-a-letter",
        "a name=spaces-are-no-name",
        "trailing=",
    ],
)
def test_what_is_no_name_and_key_is_a_bare_key(key: str) -> None:
    parsed = parse_key(key)
    assert not parsed.named
    assert parsed.digest == hashlib.sha256(key.encode()).digest()


def test_one_name_may_hold_several_keys_but_one_key_one_name() -> None:
    keys = parse_keys(["alice=old-key-0123", "alice=new-key-4567", "bob=bob-key-89ab"])
    assert [key.identity for key in keys] == ["alice", "alice", "bob"]
    with pytest.raises(ValueError, match="listed as both alice and bob") as caught:
        parse_keys(["alice=shared-key-0123", "bob=shared-key-0123"])
    assert "shared-key" not in str(caught.value)


def test_a_name_that_reads_as_a_digest_is_refused() -> None:
    with pytest.raises(ValueError, match="read as a key's digest"):
        parse_keys(["abcdef0123456789=some-key-0123"])


def test_settings_refuse_keys_that_name_two_clients_without_showing_them() -> None:
    with pytest.raises(ConfigurationError, match="api_keys") as caught:
        load_settings({"TANDEM_API_KEYS": "alice=shared-key-0123,bob=shared-key-0123"})
    assert "shared-key" not in caught.value.message


@pytest.mark.parametrize(
    "entries", ["k\u00e4-0123", "alice=ok-key-0123,bob=caf\u00e9-0123", "tab\there"]
)
def test_a_key_that_a_header_cannot_carry_is_refused_without_showing_it(entries: str) -> None:
    """With `kä` configured, a client sending `kä` by either header got 401."""
    with pytest.raises(ConfigurationError, match="printable ASCII only") as caught:
        load_settings({"TANDEM_API_KEYS": entries})
    assert "0123" not in caught.value.message
    assert "here" not in caught.value.message
