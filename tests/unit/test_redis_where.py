"""How a Redis server is named in errors and logs: never with the password its URL carries."""

from __future__ import annotations

import pytest

from tandem.jobs.redis.connect import Sentinels, where
from tandem.settings import sentinel_addresses


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://cache:7000/0", "cache:7000"),
        ("redis://cache", "cache:6379"),
        ("rediss://:s3cret@cache:6380/2", "cache:6380"),
        ("redis://[::1]:6380", "[::1]:6380"),  # read back as a URL would write it
        ("unix:///run/redis.sock", "/run/redis.sock"),
    ],
)
def test_a_server_is_named_by_its_address(url: str, named: str) -> None:
    assert where(url) == named


def test_a_service_is_named_with_the_sentinels_asked() -> None:
    sentinels = Sentinels(sentinel_addresses(("a", "b:26380", "[::1]:5")))
    assert (
        where("redis://:pw@jobs/0", sentinels) == "service jobs (Sentinels a:26379,b:26380,[::1]:5)"
    )
