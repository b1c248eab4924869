from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tandem.errors import ConfigurationError
from tandem.jobs.factory import sentinels_of, store_location
from tandem.runtime.classifier import Spin, ThreadPlan
from tandem.settings import Described, Settings, describe, load_settings


def test_defaults_live_under_the_users_home() -> None:
    settings = load_settings({"HOME": "/home/ada"})
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.data_dir == Path("/home/ada/.local/share/tandem")
    assert settings.model_dir == Path("/home/ada/.cache/tandem/models")
    assert settings.fast_model == "efficientnet_lite0"
    assert settings.accurate_model == "efficientnet_lite2"


def test_without_home_the_defaults_live_under_the_accounts_home() -> None:
    """A service started with no HOME (systemd's, a container's) had its job store under its
    working directory, `./.local/share/tandem`, wherever that was."""
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    settings = load_settings({})
    assert settings.data_dir == home / ".local" / "share" / "tandem"
    assert settings.model_dir == home / ".cache" / "tandem" / "models"


def test_xdg_directories_are_honoured() -> None:
    settings = load_settings({"XDG_DATA_HOME": "/d", "XDG_CACHE_HOME": "/c"})
    assert settings.data_dir == Path("/d/tandem")
    assert settings.model_dir == Path("/c/tandem/models")


def test_precedence_is_keywords_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "tandem.toml"
    config.write_text('[tandem]\nport = 7000\ntop_k = 3\nhost = "0.0.0.0"\n')
    env = {"TANDEM_PORT": "7100", "TANDEM_TOP_K": "4"}
    settings = load_settings(env, config, top_k=2, host=None)
    assert settings.top_k == 2  # keyword
    assert settings.port == 7100  # environment over file
    assert settings.host == "0.0.0.0"  # file over default; a None keyword means "not given"


def test_the_config_file_can_be_named_in_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text("top_k = 7\n")
    assert load_settings({"TANDEM_CONFIG": str(config)}).top_k == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TANDEM_PORTT": "1"}, "unknown settings"),
        ({"TANDEM_PORT": "eighty"}, "port"),
        ({"TANDEM_TOP_K": "0"}, "top_k"),
        ({"TANDEM_CONFIG": "/no/such/file.toml"}, "cannot read config file"),
        # The bodies held at once must hold one of the largest: else it is never taken.
        ({"TANDEM_MAX_BODIES_MB": "15"}, "max_bodies_mb .15 MiB. must hold one body"),
        # A root path is absolute, with no trailing slash: uvicorn joins it to each path.
        ({"TANDEM_ROOT_PATH": "tandem"}, "root_path"),
        ({"TANDEM_ROOT_PATH": "/tandem/"}, "root_path"),
        ({"TANDEM_ROOT_PATH": "/tan dem"}, "root_path"),
        # uvicorn writes it as ASCII in front of each request's raw path.
        ({"TANDEM_ROOT_PATH": "/tändem"}, "root_path"),
        ({"TANDEM_ROOT_PATH": "/t%C3%A4ndem"}, "root_path"),
        ({"TANDEM_ROOT_PATH": "/it's"}, "root_path"),  # inside the docs page's quotes
    ],
)
def test_bad_settings_are_refused_at_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_settings(env)


@pytest.mark.parametrize(
    ("origin", "problem"),
    [
        # A browser's Origin header never ends in a slash: it had matched no request, silently.
        ("https://app.example/", "'https://app.example/' has a path"),
        ("https://app.example/app", "'https://app.example/app' has a path"),
        ("app.example", "'app.example' is no origin"),
        ("https://app.example:99999", "'https://app.example:99999' is no origin"),
        ("https://@app.example", "'https://@app.example' is no origin"),
    ],
)
def test_a_cors_origin_no_browser_sends_is_refused(origin: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        load_settings({"TANDEM_CORS_ORIGINS": f"https://ok.example,{origin}"})


def test_cors_origins_are_taken_as_a_browser_writes_them() -> None:
    """In lower case, as each browser sends the Origin header: `App.Example` had never matched."""
    given = "*, https://App.Example, http://localhost:3000"
    expected = ("*", "https://app.example", "http://localhost:3000")
    assert load_settings({"TANDEM_CORS_ORIGINS": given}).cors_origins == expected


@pytest.mark.parametrize(
    "entry", ["https://hooks.example", "hooks.example/hook", "hooks.example:99999", "user@hooks"]
)
def test_a_webhook_host_no_callback_could_name_is_refused(entry: str) -> None:
    """Each had refused every callback_url (422, not on the allowlist), however right."""
    env = {"TANDEM_WEBHOOK_HOSTS": f"ok.example,{entry}", "TANDEM_WEBHOOK_SECRET": "s" * 16}
    with pytest.raises(ConfigurationError, match=f"host or host:port, not '{entry}'"):
        load_settings(env)


@pytest.mark.parametrize(
    ("entry", "url"),
    [
        ("Hooks.Example", "https://hooks.example/hook"),
        ("hooks.example:8443", "https://HOOKS.example:8443/hook"),
        ("[::1]", "http://[::1]:9000/hook"),  # had matched no URL: a URL's host has no brackets
        ("[::1]:9000", "http://[::1]:9000/hook"),
    ],
)
def test_a_webhook_host_allows_the_callbacks_it_names(entry: str, url: str) -> None:
    env = {"TANDEM_WEBHOOK_HOSTS": entry, "TANDEM_WEBHOOK_SECRET": "s" * 16}
    assert load_settings(env).webhooks.check(url) == url


@pytest.mark.parametrize("root_path", ["", "/tandem", "/ml/tandem-v2", "/a_b.c~d/V2"])
def test_a_root_path_of_unreserved_characters_is_taken(root_path: str) -> None:
    assert load_settings({"TANDEM_ROOT_PATH": root_path}).root_path == root_path


def test_each_problem_is_named_by_its_variable_and_a_secret_is_never_repeated() -> None:
    env = {
        "TANDEM_PORT": "eighty",
        "TANDEM_WEBHOOK_SECRET": "too-short",
        "TANDEM_REDIS_URL": "redis://:hunter2@h:1/0",
        "TANDEM_REDIS_PREFIX": "no spaces",
    }
    with pytest.raises(ConfigurationError) as caught:
        load_settings(env)
    lines = caught.value.message.splitlines()
    assert lines[0] == "invalid settings: "
    assert lines[1].startswith("  port (TANDEM_PORT): Input should be a valid integer")
    assert lines[1].endswith("(given: 'eighty')")
    assert lines[2] == "  redis_prefix (TANDEM_REDIS_PREFIX): String should match pattern " + (
        "'^[A-Za-z0-9_.:-]{1,64}$' (given: 'no spaces')"
    )
    assert lines[3] == (
        "  webhook_secret (TANDEM_WEBHOOK_SECRET): String should have at least 16 characters"
    )
    assert "too-short" not in caught.value.message
    with pytest.raises(ConfigurationError, match=r"^invalid settings: \n  webhook_hosts needs"):
        load_settings({"TANDEM_WEBHOOK_HOSTS": "example.com"})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "must specify one of the following schemes"),
        ("redis://:hunter2-password@redis:port", "Port could not be cast to integer"),
        # Options the connection does not take: redis-py raised a TypeError at every command.
        ("redis://:hunter2@h/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs needs TLS: .* rediss://"),
        ("rediss://h/0?ssl_ca_cert=/ca.pem&socket_timout=hunter2", "socket_timout, ssl_ca_cert$"),
        # A path that is no number had been taken for none: database 0, another's perhaps.
        ("redis://:hunter2@h:6379/abc", "names a database by number .*'abc'"),
        ("rediss://h/O", "names a database by number .*'O'"),
    ],
)
def test_a_redis_url_redis_cannot_read_is_refused_at_start_up(url: str, problem: str) -> None:
    """redis-py had read it only at the store's first connection: start-up ended in a traceback."""
    with pytest.raises(ConfigurationError, match=problem) as caught:
        load_settings({"TANDEM_REDIS_URL": url})
    assert "hunter2" not in caught.value.message
    for fine in (
        "redis://:pw@redis.internal:6380/2",
        "redis://redis/",
        "redis://redis/15",
        "rediss://redis",
        "rediss://redis/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
        "redis://redis/0?socket_keepalive=true&max_connections=20",
        "unix:///run/r.sock?db=2",
    ):
        assert load_settings({"TANDEM_REDIS_URL": fine}).redis_url == fine
    assert load_settings({"TANDEM_REDIS_URL": ""}).redis_url is None  # set empty: unset


def test_a_tls_certificate_goes_with_its_key() -> None:
    with pytest.raises(ConfigurationError, match="tls_certfile and tls_keyfile go together"):
        load_settings({"TANDEM_TLS_CERTFILE": "/etc/tandem/cert.pem"})
    with pytest.raises(ConfigurationError, match="tls_certfile and tls_keyfile go together"):
        load_settings({"TANDEM_TLS_KEYFILE": "/etc/tandem/key.pem"})


def test_replicas_to_confirm_each_job_need_redis() -> None:
    with pytest.raises(ConfigurationError, match="redis_min_replicas needs redis_url"):
        load_settings({"TANDEM_REDIS_MIN_REPLICAS": "1"})
    settings = load_settings(
        {"TANDEM_REDIS_URL": "redis://r:6379/0", "TANDEM_REDIS_MIN_REPLICAS": "1"}
    )
    assert (settings.redis_min_replicas, settings.redis_replica_wait_s) == (1, 1.0)


def test_sentinels_name_the_primary_of_the_service_the_url_s_host_names() -> None:
    secret = "sentinel-secret"  # noqa: S105 (a test's)
    env = {
        "TANDEM_REDIS_URL": "rediss://:hunter2@jobs/2?ssl_ca_certs=/ca.pem",
        "TANDEM_REDIS_SENTINELS": "s1, s2:26380,[fd00::5]:26381",
        "TANDEM_REDIS_SENTINEL_PASSWORD": secret,
    }
    settings = load_settings(env)
    sentinels = sentinels_of(settings)
    assert sentinels is not None
    assert sentinels.addresses == (("s1", 26379), ("s2", 26380), ("fd00::5", 26381))
    assert sentinels.password == secret
    assert store_location(settings) == (
        "Redis service jobs (Sentinels s1:26379,s2:26380,[fd00::5]:26381) (keys tandem:*)"
    )
    described = {row.variable: row for row in describe(settings, env)}
    assert described["TANDEM_REDIS_SENTINEL_PASSWORD"].value == "(set)"
    assert sentinels_of(load_settings({"TANDEM_REDIS_URL": "redis://r/0"})) is None
    # No URL; a URL with a port, as for Redis itself; a socket.
    for url in ({}, {"TANDEM_REDIS_URL": "redis://jobs:6379/0"}, {"TANDEM_REDIS_URL": "unix:///r"}):
        with pytest.raises(ConfigurationError, match="whose host, with no port, names"):
            load_settings({"TANDEM_REDIS_SENTINELS": "s1", **url})
    with pytest.raises(ConfigurationError, match="host or host:port, not 's1:port'"):
        load_settings({"TANDEM_REDIS_URL": "redis://jobs/0", "TANDEM_REDIS_SENTINELS": "s1:port"})


def test_what_is_per_client_without_api_keys_is_refused() -> None:
    """Without keys every client is one: a share, or private jobs, would protect nobody."""
    with pytest.raises(ConfigurationError, match="max_queued_per_key need api_keys"):
        load_settings({"TANDEM_MAX_QUEUED_PER_KEY": "10"})
    with pytest.raises(ConfigurationError, match="max_in_flight_per_key and max_queued_per_key"):
        load_settings({"TANDEM_MAX_IN_FLIGHT_PER_KEY": "4", "TANDEM_MAX_QUEUED_PER_KEY": "10"})
    with pytest.raises(ConfigurationError, match="private_jobs need api_keys"):
        load_settings({"TANDEM_PRIVATE_JOBS": "true"})
    keyed = load_settings({"TANDEM_MAX_QUEUED_PER_KEY": "10", "TANDEM_API_KEYS": "k" * 32})
    assert keyed.max_queued_per_key == 10


def test_each_setting_is_described_with_where_it_came_from(tmp_path: Path) -> None:
    config = tmp_path / "tandem.toml"
    config.write_text('[tandem]\nport = 7000\ntop_k = 3\nhost = "0.0.0.0"\n')
    env = {
        "TANDEM_CONFIG": str(config),
        "TANDEM_TOP_K": "4",
        "TANDEM_API_KEYS": "key-one,ci=key-two,ci=key-three",
        "TANDEM_WEBHOOK_HOSTS": "hooks.example.com",
        "TANDEM_WEBHOOK_SECRET": "a-secret-of-16-chars",
        "TANDEM_REDIS_URL": "redis://tandem:hunter2@redis.internal:6380/1",
    }
    described = {row.variable: row for row in describe(load_settings(env), env)}
    assert set(described) == {"TANDEM_" + name.upper() for name in Settings.model_fields}
    assert described["TANDEM_PORT"] == Described("TANDEM_PORT", "7000", str(config))
    assert described["TANDEM_TOP_K"] == Described("TANDEM_TOP_K", "4", "environment")
    assert described["TANDEM_LOG_LEVEL"] == Described("TANDEM_LOG_LEVEL", "info", "default")
    assert described["TANDEM_FAST_PIN"].value == "true"
    assert described["TANDEM_CASCADE_POLICY"].value == "always"
    assert described["TANDEM_CASCADE_MARGIN"].value == "unset"
    assert described["TANDEM_CORS_ORIGINS"].value == "none"
    assert described["TANDEM_WEBHOOK_HOSTS"].value == "hooks.example.com"
    # Secrets only as set: a printed configuration ends up in tickets.
    assert described["TANDEM_API_KEYS"].value == "(3 set: ci, 1 unnamed)"  # names are no secret
    assert described["TANDEM_WEBHOOK_SECRET"].value == "(set)"
    assert described["TANDEM_REDIS_URL"].value == "redis://tandem:***@redis.internal:6380/1"
    shown = " ".join(row.value for row in described.values())
    for secret in ("key-one", "key-two", "key-three", "a-secret-of-16-chars", "hunter2"):
        assert secret not in shown


def test_giving_way_may_outlast_a_lease_which_its_worker_renews() -> None:
    """Refused until workers renewed their leases: a batch in hand could give way longer than
    the visibility timeout, and its jobs went to a second worker."""
    env = {"TANDEM_GIVE_WAY_PATIENCE_S": "10", "TANDEM_VISIBILITY_TIMEOUT_S": "30"}
    assert load_settings(env).give_way_patience_s == 10


def test_settings_built_directly_ignore_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TANDEM_PORT", "9999")
    settings = Settings(data_dir=Path("/d"), model_dir=Path("/m"))
    assert settings.port == 8000


def test_fast_calls_share_the_cpus_unless_told(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    dirs = {"data_dir": tmp_path, "model_dir": tmp_path}
    auto = load_settings({}, **dirs)
    assert auto.fast_call_threads == max(1, cpus // auto.fast_concurrency)
    one_call = load_settings({"TANDEM_FAST_CONCURRENCY": "1"}, **dirs)
    assert one_call.fast_call_threads == cpus
    told = load_settings({"TANDEM_FAST_THREADS": "3"}, **dirs)
    assert told.fast_call_threads == 3


def test_the_fast_models_plan_gives_a_lone_call_every_cpu(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    dirs = {"data_dir": tmp_path, "model_dir": tmp_path}
    auto = load_settings({}, **dirs).fast_plan
    assert auto == ThreadPlan(max(1, cpus // 2), Spin.IN_RUN, solo=cpus, pin_solo=True)
    told = load_settings({"TANDEM_FAST_THREADS": "1", "TANDEM_FAST_PIN": "false"}, **dirs)
    assert told.fast_plan == ThreadPlan(1, Spin.IN_RUN, solo=1, pin_solo=False)
    assert not told.fast_plan.has_solo  # one session: every call on one thread


def test_a_standalone_worker_runs_a_lane_per_cpu_unless_told(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    dirs = {"data_dir": tmp_path, "model_dir": tmp_path}
    auto = load_settings({}, **dirs)
    assert (auto.worker_lane_count, auto.accurate_lane_threads) == (cpus, 1)
    assert auto.accurate_prepare_threads == 1  # each lane prepares its own batch
    one = load_settings({"TANDEM_WORKER_LANES": "1"}, **dirs)
    assert (one.worker_lane_count, one.accurate_lane_threads) == (1, cpus)
    assert one.accurate_prepare_threads == cpus  # one batch's images side by side
    told = load_settings({"TANDEM_WORKER_LANES": "2", "TANDEM_ACCURATE_THREADS": "3"}, **dirs)
    assert (told.worker_lane_count, told.accurate_lane_threads) == (2, 3)


def test_the_image_limits_come_from_the_settings() -> None:
    env = {"TANDEM_MAX_IMAGE_PIXELS": "1000", "TANDEM_MIN_IMAGE_SIDE": "3"}
    limits = load_settings({**env, "TANDEM_MAX_JPEG_SCANS": "12"}).image_limits
    assert (limits.max_pixels, limits.min_side, limits.max_jpeg_scans) == (1000, 3, 12)


def test_a_client_s_share_of_the_bodies_is_its_share_of_the_places() -> None:
    keyed = {
        "TANDEM_API_KEYS": "k" * 32,
        "TANDEM_MAX_IN_FLIGHT": "32",
        "TANDEM_MAX_BODIES_MB": "256",
    }
    assert load_settings(keyed).max_bodies_per_key_bytes == 0  # no share of the places
    shared = load_settings({**keyed, "TANDEM_MAX_IN_FLIGHT_PER_KEY": "8"})
    assert shared.max_bodies_per_key_bytes == 64 * 1024 * 1024  # a quarter of each
    # Never less than one largest body, which a client could otherwise never send.
    small = load_settings({**keyed, "TANDEM_MAX_IN_FLIGHT_PER_KEY": "1"})
    assert small.max_bodies_per_key_bytes == small.max_body_bytes == 16 * 1024 * 1024


def test_a_client_s_share_of_the_watches_is_its_share_of_the_places() -> None:
    keyed = {
        "TANDEM_API_KEYS": "k" * 32,
        "TANDEM_MAX_IN_FLIGHT": "32",
        "TANDEM_MAX_WATCHES": "1000",
    }
    assert load_settings(keyed).max_watches_per_key == 0
    assert load_settings({**keyed, "TANDEM_MAX_IN_FLIGHT_PER_KEY": "8"}).max_watches_per_key == 250
    few = {**keyed, "TANDEM_MAX_WATCHES": "2", "TANDEM_MAX_IN_FLIGHT_PER_KEY": "1"}
    assert load_settings(few).max_watches_per_key == 1  # never none
