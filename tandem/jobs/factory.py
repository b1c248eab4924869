"""The one place that picks a store backend from settings."""

from __future__ import annotations

from pathlib import Path

from tandem.jobs.redis import RedisJobStore, Replication
from tandem.jobs.redis.connect import Sentinels, where
from tandem.jobs.sqlite import MIB, SQLiteJobStore
from tandem.jobs.store import JobStore, StorePolicy
from tandem.settings import Settings, redacted_url

DB_NAME = "tandem.db"


def policy_from(settings: Settings) -> StorePolicy:
    return StorePolicy(
        result_ttl_s=settings.result_ttl_s,
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
        max_queue_length=settings.max_queue_length,
        max_queued_per_owner=settings.max_queued_per_key,
    )


def sqlite_path(settings: Settings) -> Path:
    return settings.data_dir / DB_NAME


def store_location(settings: Settings) -> str:
    """Where the jobs are, for people: a Redis URL without its password."""
    if settings.redis_url:
        sentinels = sentinels_of(settings)
        server = (
            f"at {redacted_url(settings.redis_url)}"
            if sentinels is None
            else where(settings.redis_url, sentinels)
        )
        return f"Redis {server} (keys {settings.redis_prefix}:*)"
    return f"SQLite at {sqlite_path(settings)}"


def sentinels_of(settings: Settings) -> Sentinels | None:
    if not settings.redis_sentinels:
        return None
    return Sentinels(settings.redis_sentinel_addresses, settings.redis_sentinel_password)


def make_store(settings: Settings) -> JobStore:
    if settings.redis_url:
        return RedisJobStore(
            settings.redis_url,
            policy_from(settings),
            prefix=settings.redis_prefix,
            replication=Replication(settings.redis_min_replicas, settings.redis_replica_wait_s),
            sentinels=sentinels_of(settings),
        )
    return SQLiteJobStore(
        sqlite_path(settings),
        policy_from(settings),
        min_free_bytes=settings.min_free_disk_mb * MIB,
    )
