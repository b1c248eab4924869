"""API keys and whom they name: `name=key`, or a bare key.

A client's identity is what the service files its things under (its idempotency keys, its
share of the places and of the queue) and what the access log names. A named key's identity
is its name, so that a client's old and new keys, listed under one name while it moves from
one to the other, are one client. A bare key's identity is the first 16 hex digits of its
SHA-256: never the key itself, which must stay out of logs and stores.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

# A name starts with a letter, so that `name=key` cannot be read out of a generated key
# (hex and token_urlsafe keys have no `=`, base64 keys only as padding at their end); 16 hex
# digits would read as a digest.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{16}")
# What every client can send in a header as written: a server reads a header's other bytes
# as Latin-1, and with `kä` configured, curl's UTF-8 `kä` got 401 by either header.
_SENDABLE = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True, slots=True)
class ApiKey:
    identity: str
    digest: bytes  # SHA-256 of the key: what a request's key is compared with
    named: bool

    def __repr__(self) -> str:  # the digest stays out of reprs and tracebacks too
        return f"ApiKey({self.identity!r})"


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key(entry: str) -> ApiKey:
    """One configured entry: `name=key` when what precedes the first `=` is a name and a key
    follows it; otherwise a bare key."""
    name, sep, key = entry.partition("=")
    # A key of only `=` is a base64 key's padding: `YWJjZA==` is no name and key.
    if sep and key.strip("=") and _NAME.fullmatch(name):
        return ApiKey(name, digest_of(key), named=True)
    digest = digest_of(entry)
    return ApiKey(digest[:8].hex(), digest, named=False)


def parse_keys(entries: Iterable[str]) -> list[ApiKey]:
    """Every entry, checked as a whole: ValueError names what is wrong, never a key."""
    entries = list(entries)
    _refuse_unsendable(entries)
    keys = [parse_key(entry) for entry in entries]
    names = {key.identity for key in keys if key.named}
    if looks_digest := sorted(name for name in names if _DIGEST.fullmatch(name)):
        raise ValueError(
            f"API key names that read as a key's digest (16 hex digits): {', '.join(looks_digest)}"
        )
    owners: dict[bytes, str] = {}
    for key in keys:
        if owners.setdefault(key.digest, key.identity) != key.identity:
            raise ValueError(
                f"one API key is listed as both {owners[key.digest]} and {key.identity}"
            )
    return keys


def sendable(key: str) -> bool:
    """Whether every client can send `key` in a header as it is written."""
    return _SENDABLE.fullmatch(key) is not None


def _refuse_unsendable(entries: list[str]) -> None:
    """Entries a header cannot carry, by their place in the list: a key is never shown."""
    unsendable = [str(n) for n, entry in enumerate(entries, 1) if not sendable(entry)]
    if unsendable:
        raise ValueError(
            "API keys that a header cannot carry (printable ASCII only): "
            f"entry {', '.join(unsendable)} of the list"
        )
