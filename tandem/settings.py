"""One typed settings object, built from an explicit environment mapping and an optional TOML file.

Nothing here reads `os.environ`: the CLI passes it in, tests pass plain dicts.
Precedence, highest first: keyword overrides, `TANDEM_*` variables, the TOML file, defaults.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tandem.cascade import Gate, Policy
from tandem.errors import ConfigurationError
from tandem.keys import ApiKey, parse_keys
from tandem.logs import LogFormat
from tandem.runtime.classifier import Spin, ThreadPlan
from tandem.runtime.imaging import ImageLimits
from tandem.webhooks import WebhookPolicy

ENV_PREFIX = "TANDEM_"
CONFIG_ENV = "TANDEM_CONFIG"
# Read by `tandem predict` (the client), not by the server's settings.
CLIENT_ENV = frozenset({"TANDEM_URL", "TANDEM_API_KEY"})
SENTINEL_PORT = 26379  # where a Sentinel listens unless its entry says


class Settings(BaseSettings):
    """Everything configurable about a Tandem process."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tls_certfile: Path | None = Field(
        None,
        description="Serve HTTPS with this PEM certificate (its chain after it); with "
        "tls_keyfile. Unset: plain HTTP, for a proxy in front that speaks TLS.",
    )
    tls_keyfile: Path | None = Field(None, description="The certificate's private key (PEM).")
    root_path: str = Field(
        "",
        # Segments of RFC 3986's unreserved characters: uvicorn writes the path in front of
        # each raw path as ASCII, and with `ä` answered every request 400 "Invalid HTTP
        # request received", /health too; and the docs page names it inside a quoted string.
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="The path a reverse proxy serves Tandem under (/tandem), whether it strips "
        "it from each request or passes it on: /docs, the schema and each job's url then "
        "name it. Empty: served from the root.",
    )
    data_dir: Path = Field(description="Where the SQLite job store lives.")
    model_dir: Path = Field(description="Where built ONNX models and their manifests live.")

    fast_model: str = Field(
        "efficientnet_lite0",
        description="Built-in model name, a model directory, or a manifest.json path.",
    )
    accurate_model: str = "efficientnet_lite2"
    top_k: int = Field(5, ge=1, le=20)

    redis_url: str | None = Field(
        None, description="Use Redis as the job store (distributed mode); else embedded SQLite."
    )
    redis_prefix: str = Field("tandem", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    redis_sentinels: tuple[str, ...] = Field(
        (),
        description="Redis Sentinels (host or host:port, comma-separated) that name the"
        " primary of the service redis_url's host names; empty: that host is Redis itself.",
    )
    redis_sentinel_password: str | None = Field(
        None, description="The Sentinels' own password, where they ask for one."
    )
    redis_min_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must have a new job before its id goes out (Redis's WAIT),"
        " so that a failover loses no accepted job; 0: the primary alone.",
    )
    redis_replica_wait_s: float = Field(
        1.0, gt=0, le=60, description="How long a new job waits for those replicas."
    )
    embedded_worker: bool | None = Field(
        None,
        description="Run the accurate model's worker inside `tandem serve`; "
        "default: yes on SQLite, no on Redis.",
    )
    max_queue_length: int = Field(
        10_000,
        ge=0,
        description="Jobs waiting or running beyond which new ones are refused; 0 = no limit.",
    )
    max_queued_per_key: int = Field(
        0,
        ge=0,
        description="With API keys: jobs one client (a key, or the keys under one name) may "
        "have waiting or running; beyond, its new "
        "jobs are refused (429, with the fast answer), so that one client cannot fill the "
        "queue; 0 = no share.",
    )
    min_free_disk_mb: int = Field(
        128,
        ge=0,
        description="SQLite: while the data directory's disk has less free (in MiB), new jobs "
        "are refused (503 `disk_low`) and /health/all says so; 0 = no floor.",
    )
    retry_after_s: int = Field(5, ge=1, description="What a refused client is told to wait.")
    result_ttl_s: float = Field(24 * 3600.0, gt=0, description="How long finished jobs are kept.")
    visibility_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A claimed job whose worker stopped renewing its lease (it died or hung) "
        "this long ago is given to a worker again.",
    )
    max_attempts: int = Field(3, ge=1, description="Claims of one job before it is marked failed.")
    worker_batch_size: int = Field(4, ge=1, le=256)
    worker_lanes: int = Field(
        0,
        ge=0,
        description="Batches a standalone worker runs at once, each on its own thread; 0 = one "
        "per CPU. The embedded worker runs one, giving way to the fast model.",
    )
    worker_poll_s: float = Field(
        1.0, gt=0, description="Longest sleep of an idle worker before it looks for jobs again."
    )
    embedded_worker_gives_way: bool = Field(
        True,
        description="The embedded worker runs the accurate model only while the fast model "
        "is idle, and a fast-model call that starts stops its run (retried later).",
    )
    give_way_quiet_s: float = Field(
        0.005,
        ge=0,
        description="Idle time of the fast model that the embedded worker waits for: shorter "
        "gaps, such as a client's turnaround between requests, are not idle time.",
    )
    give_way_patience_s: float = Field(
        2.0,
        gt=0,
        description="Longest the embedded worker gives way for one image; then it runs beside "
        "the fast model, so that steady traffic slows the accurate model but never stops it.",
    )

    fast_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per fast-model call; 0 = adaptive: a call "
        "alone gets every CPU this process may use, calls side by side share them out.",
    )
    accurate_threads: int = Field(0, ge=0)
    fast_concurrency: int = Field(2, ge=1, description="Fast-model calls allowed to run at once.")
    fast_spin: Spin = Field(
        Spin.IN_RUN,
        description="How the fast model's threads wait for work: `in_run` spin within a run "
        "and sleep when it returns; `always` (ONNX Runtime's default) spin on for about 25 ms "
        "after it, which helps the tail of sporadic traffic where no embedded worker needs "
        "the cores; `never`.",
    )
    fast_pin: bool = Field(
        True,
        description="A fast-model call alone, on every CPU this process may use (as by "
        "default), runs each ONNX Runtime thread on a CPU of its own, its caller's included: "
        "left to the scheduler, a thread woken after an idle moment could land beside the "
        "caller and slow the run two- to threefold. `false` leaves them to the scheduler (a "
        "host where other busy processes share this process's CPUs).",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Larger images get 413, judged from the header."
    )
    min_image_side: int = Field(8, ge=1, description="Images with a shorter side get 422.")
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        description="Progressive JPEGs with more scans get 422: each scan costs the decoder a "
        "pass over the whole image, and a few bytes can hold one.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: LogFormat = Field("text", description="`json`: one JSON object per line.")

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_bodies_mb: int = Field(
        256,
        ge=1,
        description="Request bodies held in memory at once, all requests together (MiB); a "
        "body that would pass it gets 503 at once, or as soon as it would, if sent in chunks.",
    )
    api_keys: tuple[str, ...] = Field(
        (),
        description="If any, every route but /health, /health/all, the web page and the API's "
        "description (/docs, /openapi.json) needs one (comma-separated, printable ASCII); "
        "`name=key` names the client, and one name may hold several keys.",
    )
    private_jobs: bool = Field(
        False,
        description="With API keys: a job is read, followed or cancelled only by the client "
        "that sent it (its key, or the keys under its name); to others it is 404, as an "
        "unknown id, and so is a job sent while the service had no keys. Off: whoever holds "
        "a job's id.",
    )
    cors_origins: tuple[str, ...] = Field(
        (),
        description="Origins allowed by CORS (comma-separated), each scheme://host[:port] with"
        " no path, or *.",
    )
    max_in_flight: int = Field(
        32, ge=1, description="Inference requests served at once; beyond, 503 at once."
    )
    max_in_flight_per_key: int = Field(
        0,
        ge=0,
        description="With API keys: inference requests one client (a key, or the keys under one "
        "name) may have served at once; "
        "beyond, 429 at once, so that one client cannot take every place; 0 = no share. Its "
        "request bodies held at once, and its open streams and long-polls, get the same share "
        "of max_bodies_mb (at least one body of max_body_bytes) and of max_watches (at least "
        "one); beyond, 429 too.",
    )
    max_watches: int = Field(
        1000, ge=1, description="Open SSE streams and long-polls; beyond, 503 at once."
    )
    receive_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A request's head, or its body, still arriving after this long (a client "
        "that stalled): 408 and the connection closed. A body earns more time as it arrives: "
        "see receive_min_rate_kib_s.",
    )
    receive_min_rate_kib_s: float = Field(
        64.0,
        ge=0,
        description="Each KiB of a body received adds 1/this seconds to its receive_timeout_s, "
        "so a body that keeps arriving at least this fast is never cut off, however large, "
        "while one that trickles is; 0 = a body has receive_timeout_s in all.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request whose response has not begun by then: 504."
    )
    fast_timeout_s: float = Field(10.0, gt=0, description="Deadline of one fast-model call: 504.")
    job_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A worker batch running longer fails its jobs, and its model run stops.",
    )

    cascade_policy: Policy = Field(
        Policy.ALWAYS,
        description="`always` queues every request for the accurate model; `when_unsure` only "
        "those whose fast top-1 probability is below the threshold.",
    )
    cascade_threshold: float = Field(0.8, ge=0, le=1)
    cascade_margin: float | None = Field(
        None, ge=0, le=1, description="Also require top-1 to lead top-2 by this much."
    )

    webhook_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts (or host:port) a callback_url may name (comma-separated); "
        "empty: webhooks are off.",
    )
    webhook_secret: str | None = Field(
        None, min_length=16, description="HMAC-SHA256 key signing webhook bodies."
    )
    webhook_max_attempts: int = Field(5, ge=1, le=20)
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_backoff_s: float = Field(1.0, ge=0, description="First retry's wait; it doubles.")

    @field_validator("api_keys", "cors_origins", "webhook_hosts", "redis_sentinels", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _named_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_keys(value)
        return value

    @field_validator("webhook_hosts")
    @classmethod
    def _webhook_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(webhook_host(entry) for entry in value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(browser_origin(origin) for origin in value)

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, value: str | None) -> str | None:
        # redis-py reads the URL only when the store connects: a typo had stopped start-up
        # with a traceback. Its parser's messages never repeat the URL, which may hold a
        # password. Imported here: every command reads settings, `tandem predict` included,
        # and redis-py takes 0.14 s to import.
        from tandem.jobs.redis.url import check_url

        if not value:  # set empty, as a compose file unsets it: SQLite
            return None
        check_url(value)
        return value

    _environ: ClassVar[Mapping[str, str]] = {}

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            max_pixels=self.max_image_pixels,
            min_side=self.min_image_side,
            max_jpeg_scans=self.max_jpeg_scans,
        )

    @model_validator(mode="after")
    def _webhooks_need_a_secret(self) -> Settings:
        if self.webhook_hosts and not self.webhook_secret:
            raise ValueError("webhook_hosts needs webhook_secret, to sign what is sent")
        return self

    @model_validator(mode="after")
    def _one_body_fits_the_bodies(self) -> Settings:
        if self.max_bodies_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_bodies_mb ({self.max_bodies_mb} MiB) must hold one body of max_body_bytes"
                f" ({self.max_body_bytes}): a body that large could never be taken"
            )
        return self

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together")
        return self

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        sentinel_addresses(value)
        return value

    @model_validator(mode="after")
    def _sentinels_name_a_service(self) -> Settings:
        if not self.redis_sentinels:
            return self
        parts = urlsplit(self.redis_url or "")
        if parts.scheme not in ("redis", "rediss") or not parts.hostname or parts.port:
            raise ValueError(
                "redis_sentinels need a redis:// or rediss:// redis_url whose host, with no"
                " port, names the service they watch"
            )
        return self

    @model_validator(mode="after")
    def _replicas_need_redis(self) -> Settings:
        if self.redis_min_replicas and not self.redis_url:
            raise ValueError("redis_min_replicas needs redis_url: SQLite has no replicas")
        return self

    @model_validator(mode="after")
    def _per_client_needs_keys(self) -> Settings:
        # Without keys every client is one: a share or a private job set there would protect
        # nobody, silently.
        per_client = ("max_in_flight_per_key", "max_queued_per_key", "private_jobs")
        needing = [name for name in per_client if getattr(self, name)]
        if needing and not self.api_keys:
            raise ValueError(
                f"{' and '.join(needing)} need api_keys: clients are told apart by them"
            )
        return self

    @property
    def redis_sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        return sentinel_addresses(self.redis_sentinels)

    @property
    def max_bodies_bytes(self) -> int:
        return self.max_bodies_mb * 1024 * 1024

    @property
    def max_bodies_per_key_bytes(self) -> int:
        """One client's share of the bodies held at once, never less than one largest body."""
        return self._key_share(self.max_bodies_bytes, least=self.max_body_bytes)

    @property
    def max_watches_per_key(self) -> int:
        """One client's share of the open streams and long-polls, at least one."""
        return self._key_share(self.max_watches, least=1)

    def _key_share(self, whole: int, least: int) -> int:
        """A client's share of `whole`: the share of the places it has (max_in_flight_per_key
        of max_in_flight), and never less than `least`. 0 = no shares."""
        if not self.max_in_flight_per_key:
            return 0
        return max(least, whole * self.max_in_flight_per_key // self.max_in_flight)

    @property
    def webhooks(self) -> WebhookPolicy:
        return WebhookPolicy(
            allowed_hosts=frozenset(self.webhook_hosts),
            secret=self.webhook_secret or "",
            max_attempts=self.webhook_max_attempts,
            timeout_s=self.webhook_timeout_s,
            backoff_s=self.webhook_backoff_s,
        )

    @property
    def gate(self) -> Gate:
        return Gate(self.cascade_policy, self.cascade_threshold, self.cascade_margin)

    @property
    def fast_call_threads(self) -> int:
        """Threads per fast-model call made beside others. Several small batch-1 calls side
        by side, one CPU each, beat each call spreading over every CPU: on 2 cores, 2 calls
        of 1 thread gave about a quarter more requests/s at 16 clients."""
        if self.fast_threads:
            return self.fast_threads
        return max(1, usable_cpus() // self.fast_concurrency)

    @property
    def fast_solo_threads(self) -> int:
        """Threads for a fast-model call that finds no other running (see Classifier)."""
        return self.fast_threads or usable_cpus()

    @property
    def fast_plan(self) -> ThreadPlan:
        return ThreadPlan(
            self.fast_call_threads, self.fast_spin, self.fast_solo_threads, self.fast_pin
        )

    @property
    def accurate_all_threads(self) -> int:
        """Threads for the embedded worker's work with the cores to itself: preparing a
        batch's images, and its runs while the fast model is idle."""
        return self.accurate_threads or usable_cpus()

    @property
    def worker_lane_count(self) -> int:
        """Batches a standalone worker runs at once. One per CPU, each run on one thread: on 2
        cores, Lite2 gave 131 images/s as two single-threaded callers, 98 as one on both."""
        return self.worker_lanes or usable_cpus()

    @property
    def accurate_lane_threads(self) -> int:
        """Threads for each of a standalone worker's model runs: the CPUs shared out."""
        return self.accurate_threads or self.accurate_prepare_threads

    @property
    def accurate_prepare_threads(self) -> int:
        """Threads preparing one batch's images: its lane's share of the CPUs."""
        return max(1, usable_cpus() // self.worker_lane_count)

    @property
    def runs_worker(self) -> bool:
        if self.embedded_worker is not None:
            return self.embedded_worker
        return self.redis_url is None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keywords, then the mapping `load_settings` bound; never the process environment.
        return (init_settings, _MappingSource(settings_cls, cls._environ))


class _MappingSource(PydanticBaseSettingsSource):
    """`TANDEM_*` keys of an explicit mapping, lower-cased into field names."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._values = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in environ.items()
            if key.startswith(ENV_PREFIX) and key != CONFIG_ENV and key not in CLIENT_ENV
        }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._values.items() if k in self.settings_cls.model_fields}


def _default_dirs(environ: Mapping[str, str]) -> dict[str, Path]:
    home = _home(environ)
    data_home = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    cache_home = Path(environ.get("XDG_CACHE_HOME") or home / ".cache")
    return {"data_dir": data_home / "tandem", "model_dir": cache_home / "tandem" / "models"}


def _home(environ: Mapping[str, str]) -> Path:
    """HOME, or else the account's own: a service may start with no HOME (systemd's, a
    container's), and its store had gone under whatever its working directory was."""
    if home := environ.get("HOME"):
        return Path(home)
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a user id with no account (a container's arbitrary one)
        return Path()


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc
    section = data.get("tandem", data)
    if not isinstance(section, dict):
        raise ConfigurationError(f"config file {path}: [tandem] must be a table")
    return section


def _unknown_env_keys(environ: Mapping[str, str]) -> list[str]:
    known = (
        {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_ENV} | CLIENT_ENV
    )
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


def _config_path(env: Mapping[str, str], config_file: Path | None) -> Path | None:
    if config_file is None and env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return config_file


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build and validate settings; raise ConfigurationError with every problem at once."""
    env: Mapping[str, str] = {} if environ is None else environ
    config_file = _config_path(env, config_file)
    unknown = _unknown_env_keys(env)
    if unknown:
        raise ConfigurationError(f"unknown settings in the environment: {', '.join(unknown)}")
    file_values = _read_config_file(config_file) if config_file else {}
    env_source = _MappingSource(Settings, env)

    class _Bound(Settings):
        _environ: ClassVar[Mapping[str, str]] = env

    # Keyword values outrank every source, so the defaults and the file's values that the
    # environment also sets must be left out for the environment to win over them.
    lower = {k: v for k, v in (_default_dirs(env) | file_values).items() if k not in env_source()}
    values = lower | {k: v for k, v in overrides.items() if v is not None}
    try:
        bound = _Bound(**values)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid settings: {_problems(exc)}") from exc
    return Settings.model_construct(**bound.model_dump())


def _problems(exc: ValidationError) -> str:
    """Each problem on a line of its own, named by its setting and variable, with what was
    given unless it is a secret: pydantic's own text names a class and links to its docs."""
    lines = []
    for error in exc.errors(include_url=False):
        if not error["loc"]:  # a check across settings
            lines.append(f"\n  {error['msg'].removeprefix('Value error, ')}")
            continue
        name = str(error["loc"][0])
        given = "" if name in SECRETS | {"redis_url"} else f" (given: {error['input']!r})"
        lines.append(f"\n  {name} ({ENV_PREFIX}{name.upper()}): {error['msg']}{given}")
    return "".join(lines)


@dataclass(frozen=True, slots=True)
class Described:
    """One setting as `tandem config` shows it."""

    variable: str  # TANDEM_...
    value: str  # secrets hidden
    origin: str  # "default", the config file's path, or "environment"


# Shown only as whether they are set: a printed configuration ends up in tickets and logs.
SECRETS = frozenset({"api_keys", "webhook_secret", "redis_sentinel_password"})


def describe(
    settings: Settings, environ: Mapping[str, str], config_file: Path | None = None
) -> list[Described]:
    """Each setting's value, with where it came from (given the environment and config file
    `settings` was loaded from, and no keyword overrides)."""
    config_file = _config_path(environ, config_file)
    from_file = _read_config_file(config_file) if config_file else {}
    from_env = _MappingSource(Settings, environ)()
    described = []
    for name in Settings.model_fields:
        origin = "default"
        if name in from_env:
            origin = "environment"
        elif name in from_file:
            origin = str(config_file)
        value = _shown(name, getattr(settings, name))
        described.append(Described(ENV_PREFIX + name.upper(), value, origin))
    return described


def _shown(name: str, value: object) -> str:
    if name == "api_keys" and value:
        return _keys_shown(parse_keys(value))  # type: ignore[arg-type]
    if name in SECRETS:
        return _secret(value)
    if name == "redis_url" and isinstance(value, str):
        return redacted_url(value)
    return _plain(value)


def _keys_shown(keys: list[ApiKey]) -> str:
    """How many keys, and the clients' names: names are no secret."""
    names = sorted({key.identity for key in keys if key.named})
    unnamed = sum(not key.named for key in keys)
    whom = [*names, *([f"{unnamed} unnamed"] if unnamed else [])]
    return f"({len(keys)} set: {', '.join(whom)})"


def _secret(value: object) -> str:
    return "(set)" if value else "unset"


def _plain(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value.value) if isinstance(value, Enum) else str(value)


def sentinel_addresses(entries: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """`host` or `host:port` entries (an IPv6 host in brackets); ValueError names a bad one."""
    addresses = []
    for entry in entries:
        host, port = _address(entry, "a Sentinel")
        addresses.append((host, port or SENTINEL_PORT))
    return tuple(addresses)


def webhook_host(entry: str) -> str:
    """An allowlist entry as WebhookPolicy compares it with a URL: its host alone, as a URL's
    `hostname` (lower case, an IPv6 address without brackets), or with a port its netloc."""
    host, port = _address(entry, "a webhook host")
    return entry.lower() if port else host


def _address(entry: str, what: str) -> tuple[str, int | None]:
    """`host` or `host:port`, as its host (lower case, no brackets) and port if given."""
    parts = urlsplit(f"//{entry}")
    well_formed = not (parts.path or parts.query or parts.fragment or "@" in parts.netloc)
    if not parts.hostname or not well_formed or not _port_if_any(parts):
        raise ValueError(f"{what} is host or host:port, not {entry!r}")
    return parts.hostname, parts.port


def browser_origin(origin: str) -> str:
    """`origin` as a browser's Origin header writes it (`*` as is); ValueError if it is none.
    CORS compares the two as strings."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname or "@" in parts.netloc or not _port_if_any(parts):
        raise ValueError(f"{origin!r} is no origin: give scheme://host or scheme://host:port")
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"{origin!r} has a path: an origin is scheme://host[:port] alone")
    return origin.lower()


def _port_if_any(parts: SplitResult) -> bool:
    """Whether `parts` names no port or one in range (`.port` raises for any other)."""
    try:
        return parts.port != 0
    except ValueError:
        return False


def redacted_url(url: str) -> str:
    """`url` with its password, if any, replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), which can be fewer than the machine's."""
    return len(os.sched_getaffinity(0))
