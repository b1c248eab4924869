"""`tandem.client` and `tandem predict` against a real server (conftest's `working` and
`idle` servers on the tiny models)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tandem.client import AsyncClient, Client
from tandem.errors import IdempotencyKeyReused, InvalidImage, JobNotFound, ServerUnreachable
from tandem.jobs.records import JobStatus
from tests.support import ServerProcess, clean_env, encode, free_port, solid, tiny_env

pytestmark = pytest.mark.slow

PNG = encode(solid((10, 200, 10)), "PNG")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "green.png"
    path.write_bytes(PNG)
    return path


def test_predict_then_result_gives_both_answers(working: ServerProcess, image: Path) -> None:
    with Client(working.url) as client:
        fast = client.predict(image)
        assert fast.queued
        assert fast.fast.model == "tiny_fast"
        assert fast.request_id
        job = client.result(fast.job_id or "", wait=20)
    assert job.status is JobStatus.DONE
    assert job.accurate is not None
    assert job.accurate.model == "tiny_accurate"
    assert job.final_label == job.accurate.label


def test_events_iterate_to_the_finished_job(working: ServerProcess) -> None:
    with Client(working.url) as client:
        fast = client.predict(PNG)
        states = list(client.events(fast.job_id or ""))
    assert states[-1].status is JobStatus.DONE
    assert states[-1].accurate is not None


def test_a_retry_with_the_same_key_gets_the_same_job(idle: ServerProcess, image: Path) -> None:
    with Client(idle.url) as client:
        first = client.predict(image, idempotency_key="order-20")
        retry = client.predict(PNG, idempotency_key="order-20")  # the same bytes
        other = client.predict(PNG)
        with pytest.raises(IdempotencyKeyReused) as refused:
            client.predict(encode(solid((200, 10, 10)), "PNG"), idempotency_key="order-20")
    assert first.job_id == retry.job_id != other.job_id
    assert refused.value.status == 422


async def test_the_async_client_does_the_same(working: ServerProcess) -> None:
    async with AsyncClient(working.url) as client:
        fast = await client.predict(PNG)
        states = [state async for state in client.events(fast.job_id or "")]
        again = await client.result(fast.job_id or "", wait=5)
    assert states[-1].status is JobStatus.DONE
    assert again.status is JobStatus.DONE
    assert again.accurate == states[-1].accurate


def test_server_errors_arrive_typed(working: ServerProcess) -> None:
    with Client(working.url) as client:
        with pytest.raises(InvalidImage) as bad:
            client.predict(b"\x89PNG\r\n\x1a\n broken")
        assert bad.value.status == 422
        assert bad.value.request_id
        with pytest.raises(JobNotFound):
            client.result("0" * 32)
        with pytest.raises(JobNotFound):
            list(client.events("0" * 32))


async def test_no_server_is_server_unreachable_at_once_even_with_a_wait() -> None:
    """A wait or a stream is taken up again only after the server has answered once."""
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(url) as client:
        with pytest.raises(ServerUnreachable):
            client.predict(PNG)
        with pytest.raises(ServerUnreachable):
            client.result("0" * 32, wait=30)
        with pytest.raises(ServerUnreachable):
            list(client.events("0" * 32))
    async with AsyncClient(url) as client:
        with pytest.raises(ServerUnreachable):
            await client.predict(PNG)
        with pytest.raises(ServerUnreachable):
            await client.result("0" * 32, wait=30)
        with pytest.raises(ServerUnreachable):
            [state async for state in client.events("0" * 32)]
    assert time.monotonic() - started < 10  # not one wait of 30 s


def test_a_wait_that_runs_out_returns_the_unfinished_job(idle: ServerProcess) -> None:
    with Client(idle.url) as client:
        fast = client.predict(PNG)
        job = client.result(fast.job_id or "", wait=0.3)
        assert job.status is JobStatus.QUEUED
        assert client.cancel(job.job_id).status is JobStatus.CANCELLED


def tandem_predict(
    *args: str, url: str | None = None, stdin: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", "predict", *args],
        env=clean_env() | ({"TANDEM_URL": url} if url else {}),
        stdin=stdin.open("rb") if stdin else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@contextlib.contextmanager
def _one_watch_each(tiny_dir: Path, data_dir: Path, **settings: str) -> Iterator[ServerProcess]:
    """A server with no worker where client alpha (key `a-key`) may hold one watch."""
    env = tiny_env(
        tiny_dir,
        data_dir,
        api_keys="alpha=a-key",
        max_in_flight="4",
        max_in_flight_per_key="1",
        max_watches="4",
        **settings,
    )
    server = ServerProcess(data_dir / "server.log", env, "--no-worker").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _watch_held(client: Client, job_id: str) -> Iterator[None]:
    """The client's one watch, held by a stream of its own."""
    with client._http.stream("GET", f"/job/{job_id}/events") as stream:
        # Held, not dropped: an iterator closed half read closes its connection.
        lines = stream.iter_lines()
        assert next(lines) == "event: queued"
        yield


async def test_a_long_poll_the_server_has_no_place_for_becomes_a_read_after_a_pause(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """With a share of one watch, the client's second long-poll gets 429: `result` had raised
    it, where the job could still be read without a watch."""
    with (
        _one_watch_each(tiny_dir, tmp_path) as server,
        Client(server.url, api_key="a-key") as client,
    ):
        job_id = client.predict(PNG).job_id or ""
        with _watch_held(client, job_id):
            started = time.monotonic()
            waited = client.result(job_id, wait=1.0)
            took = time.monotonic() - started
            async with AsyncClient(server.url, api_key="a-key") as other:
                awaited = await other.result(job_id, wait=1.0)
    assert waited.status is awaited.status is JobStatus.QUEUED
    assert 0.9 < took < 5  # the wait asked for, not the Retry-After of 5 s


async def test_events_the_server_has_no_stream_for_are_read_after_each_pause(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """`events` had raised the 429 too: now it reads the job, and again after each
    Retry-After, until the job is finished."""
    with (
        _one_watch_each(tiny_dir, tmp_path, retry_after_s="1") as server,
        Client(server.url, api_key="a-key") as client,
    ):
        job_id = client.predict(PNG).job_id or ""
        with _watch_held(client, job_id):
            states = client.events(job_id)
            assert next(states).status is JobStatus.QUEUED
            async with AsyncClient(server.url, api_key="a-key") as other:
                following = other.events(job_id)
                assert (await anext(following)).status is JobStatus.QUEUED
                client.cancel(job_id)
                assert [state.status async for state in following] == [JobStatus.CANCELLED]
            assert [state.status for state in states] == [JobStatus.CANCELLED]


def test_cli_prints_both_answers_and_exits_0(working: ServerProcess, image: Path) -> None:
    done = tandem_predict(str(image), str(image), "--wait", "20", "--json", url=working.url)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 2
    assert all(line["status"] == "done" for line in lines)
    assert all(line["fast"]["model"] == "tiny_fast" for line in lines)
    assert all(line["accurate"]["model"] == "tiny_accurate" for line in lines)
    text = tandem_predict(str(image), "--wait", url=working.url)  # TANDEM_URL, as a user sets it
    assert text.returncode == 0, text.stderr
    assert "-> accurate" in text.stdout


def test_cli_run_again_with_idempotent_gets_the_same_jobs(
    idle: ServerProcess, image: Path, tmp_path: Path
) -> None:
    other = tmp_path / "red.png"
    other.write_bytes(encode(solid((200, 10, 10)), "PNG"))

    def job_ids(*flags: str) -> list[str]:
        done = tandem_predict(str(image), str(other), "--json", *flags, url=idle.url)
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["job_id"] for line in done.stdout.splitlines()]

    first = job_ids("--idempotent")
    assert len(set(first)) == 2  # each file its own job
    assert job_ids("--idempotent") == first  # run again: the same jobs, none new
    assert set(job_ids()).isdisjoint(first)  # without the flag, new jobs


def test_cli_exit_codes_tell_scripts_what_happened(
    working: ServerProcess, idle: ServerProcess, image: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    refused = tandem_predict(str(image), str(bad), "--url", working.url)
    assert refused.returncode == 1
    assert "error invalid_image" in refused.stdout or "unsupported" in refused.stdout
    missing = tandem_predict(str(tmp_path / "nowhere.jpg"), "--url", working.url)
    assert missing.returncode == 1
    assert "error unreadable_file" in missing.stdout  # had been internal_error, the server's
    unreachable = tandem_predict(str(image), "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3
    unfinished = tandem_predict(str(image), "--url", idle.url, "--wait", "0.3")
    assert unfinished.returncode == 4
    assert "queued" in unfinished.stdout


def test_cli_reads_an_image_of_dash_from_standard_input(
    working: ServerProcess, image: Path
) -> None:
    """As `curl --data-binary @-` does: an image made by another command, piped in."""
    piped = tandem_predict("-", "--json", "--idempotent", url=working.url, stdin=image)
    assert piped.returncode == 0, piped.stdout + piped.stderr
    [answer] = [json.loads(line) for line in piped.stdout.splitlines()]
    assert answer["image"] == "-"
    named = tandem_predict(str(image), "--json", "--idempotent", url=working.url)
    assert json.loads(named.stdout)["job_id"] == answer["job_id"]  # the same bytes were sent
    twice = tandem_predict("-", "-", url=working.url, stdin=image)
    assert twice.returncode == 2
    assert "may be given once" in twice.stderr


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://127.0.0.1", "notaurl"])
def test_cli_refuses_a_server_url_that_is_not_http_once(image: Path, url: str) -> None:
    """It had been tried for each image, each one's error `server_unreachable` (exit 3)."""
    refused = tandem_predict(str(image), str(image), url=url)
    assert refused.returncode == 2
    assert "not an http:// or https:// URL" in refused.stderr
    assert refused.stdout == ""


def test_cli_progress_bar_when_asked(working: ServerProcess, image: Path) -> None:
    shown = tandem_predict(str(image), str(image), str(image), "--progress", url=working.url)
    assert shown.returncode == 0
    assert "3/3" in shown.stderr


def test_a_job_is_followed_across_a_restart_of_its_proxy(own_idle: ServerProcess) -> None:
    """A proxy shutting down ends its streams and long-polls (a rolling restart, a scale-in),
    and is unreachable for a while: events() opens the stream again, without the state it
    had seen given twice, and result() polls again while its wait lasts; sync and async."""
    with Client(own_idle.url) as client:
        job_id = client.predict(PNG).job_id or ""

    def follow() -> list[JobStatus]:
        with Client(own_idle.url) as client:
            return [state.status for state in client.events(job_id)]

    async def follow_async() -> list[JobStatus]:
        async with AsyncClient(own_idle.url) as client:
            return [state.status async for state in client.events(job_id)]

    def wait() -> JobStatus:
        with Client(own_idle.url) as client:
            return client.result(job_id, wait=60).status

    async def wait_async() -> JobStatus:
        async with AsyncClient(own_idle.url) as client:
            return (await client.result(job_id, wait=60)).status

    with ThreadPoolExecutor(4) as pool:
        followed = pool.submit(follow)
        followed_async = pool.submit(asyncio.run, follow_async())
        waited = pool.submit(wait)
        waited_async = pool.submit(asyncio.run, wait_async())
        time.sleep(1.0)  # all four are waiting on the queued job
        own_idle.stop()
        own_idle.start()  # the same port and store
        with Client(own_idle.url) as client:
            client.cancel(job_id)
        assert followed.result(timeout=30) == [JobStatus.QUEUED, JobStatus.CANCELLED]
        assert followed_async.result(timeout=30) == [JobStatus.QUEUED, JobStatus.CANCELLED]
        assert waited.result(timeout=30) is JobStatus.CANCELLED
        assert waited_async.result(timeout=30) is JobStatus.CANCELLED
