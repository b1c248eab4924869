"""Distributed mode on a real redis-server: separate proxy and worker processes, faults included.

Every test keeps a ledger: each job a proxy accepted (200 with a job id) must end with exactly
one final answer. Refusals (503, no job id) are not accepted jobs, and are counted apart.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from skimage import data as photos

from tandem.jobs.redis import connection_name
from tandem.worker import HEARTBEAT_S
from tests.support import (
    RedisServer,
    ServerProcess,
    UpProcess,
    WorkerProcess,
    b64,
    clean_env,
    encode,
    server_sent_events,
    wait_for_job,
)

pytestmark = pytest.mark.slow

_prefixes = itertools.count()
LEDGERS: list[str] = []  # printed at the end of the run by conftest.pytest_terminal_summary
BODY = {"image_data": b64(encode(photos.chelsea()))}
OTHER_BODY = {"image_data": b64(encode(photos.astronaut()))}
DONE_LINE = re.compile(r"job ([0-9a-f]{32}) done:")
# A finishing call whose reply the connection lost: Redis may have run it before it died.
LOST_REPLY = re.compile(r"queue unavailable while finishing (\d+) jobs?")


@dataclass
class Ledger:
    accepted: list[str] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, client: httpx.Client, headers: dict[str, str] | None = None) -> None:
        try:
            response = client.post("/predict", json=BODY, headers=headers)
        except httpx.TransportError:
            with self.lock:
                self.refused["transport"] += 1
            return
        body = response.json()
        with self.lock:
            if response.status_code == 200:
                self.accepted.append(body["job_id"])
                return
            # Not queued: the fast answer is still there, and the reason.
            assert response.status_code == 503, response.text
            assert body["job_id"] is None
            assert body["fast"]["label"]
            assert int(response.headers["retry-after"]) > 0
            self.refused[body["error"]["code"]] += 1


@dataclass
class Cluster:
    redis: RedisServer
    env: dict[str, str]
    tmp: Path
    processes: list[ServerProcess] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def proxy(self, *args: str) -> ServerProcess:
        log = self.tmp / f"proxy{next(self._names)}.log"
        process = ServerProcess(log, self.env, "--redis", self.redis.url, *args).start()
        self.processes.append(process)
        return process

    def worker(self) -> WorkerProcess:
        log = self.tmp / f"worker{next(self._names)}.log"
        process = WorkerProcess(log, self.env, "--redis", self.redis.url).start()
        self.processes.append(process)
        return process

    def submit(self, proxy: ServerProcess, count: int, pause_s: float = 0.0) -> Ledger:
        ledger = Ledger()

        def one(_: int) -> None:
            with proxy.client() as client:
                ledger.post(client)
            time.sleep(pause_s)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, range(count)))
        return ledger

    def settle(
        self, proxy: ServerProcess, ledger: Ledger, timeout: float = 120.0
    ) -> dict[str, int]:
        """Wait for every accepted job; count the outcomes the issue asks for and print them."""
        finals = {}
        with proxy.client() as client:
            for job_id in ledger.accepted:
                try:
                    finals[job_id] = wait_for_job(client, job_id, timeout)["status"]
                except AssertionError:
                    finals[job_id] = "lost"
        logs = [p.log_path.read_text() for p in self.processes if isinstance(p, WorkerProcess)]
        answers = collections.Counter(
            match.group(1) for log in logs for match in DONE_LINE.finditer(log)
        )
        counts = {
            "accepted": len(ledger.accepted),
            "refused": sum(ledger.refused.values()),
            "done": sum(1 for s in finals.values() if s == "done"),
            "failed": sum(1 for s in finals.values() if s == "failed"),
            "lost": sum(1 for s in finals.values() if s == "lost"),
            "duplicated": sum(1 for job_id in finals if answers[job_id] > 1),
            "answered": sum(1 for job_id in finals if answers[job_id] == 1),
            # Done in the store, but the worker that stored it never heard back.
            "unconfirmed": sum(
                1 for job_id, status in finals.items() if status == "done" and not answers[job_id]
            ),
            "lost_replies": sum(int(m.group(1)) for log in logs for m in LOST_REPLY.finditer(log)),
        }
        LEDGERS.append(" ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def cluster(model_dir: Path, tmp_path: Path) -> Iterator[Cluster]:
    redis = RedisServer(tmp_path / "redis").start()
    env = clean_env(
        model_dir=str(model_dir),
        data_dir=str(tmp_path),
        redis_prefix=f"t{next(_prefixes)}",
        visibility_timeout_s="3",
        worker_poll_s="0.2",
    )
    cluster = Cluster(redis, env, tmp_path)
    yield cluster
    cluster.stop()
    redis.kill()


def assert_every_accepted_job_answered_once(counts: dict[str, int], unlogged: int = 0) -> None:
    """`unlogged`: how many jobs a killed worker may have stored without its log lines."""
    assert counts["lost"] == 0
    assert counts["duplicated"] == 0
    assert counts["failed"] == 0
    assert counts["done"] == counts["accepted"]
    # Each job answered by exactly one worker's log line, except those a finishing call stored
    # just before Redis died, its reply lost (never without an outage: then lost_replies is 0),
    # and those of a worker killed between storing a batch and logging it.
    assert counts["done"] == counts["answered"] + counts["unconfirmed"]
    assert counts["unconfirmed"] <= counts["lost_replies"] + unlogged


def test_load_through_one_proxy_and_two_workers(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    cluster.worker()
    cluster.worker()
    ledger = cluster.submit(proxy, 300)
    counts = cluster.settle(proxy, ledger)
    assert counts["accepted"] == 300
    assert_every_accepted_job_answered_once(counts)
    per_worker = [
        len(DONE_LINE.findall(p.log_path.read_text()))
        for p in cluster.processes
        if isinstance(p, WorkerProcess)
    ]
    assert all(n > 0 for n in per_worker), per_worker  # both workers took a share


def held_by(cluster: Cluster, worker: WorkerProcess) -> list[str]:
    """Job ids delivered to this worker and not yet acknowledged, as Redis sees them."""
    # The whole log: `log()` keeps only its tail, from which the start line soon scrolls.
    match = re.search(r"worker (\S+) started for model", worker.log_path.read_text())
    assert match is not None
    queue = f"{cluster.env['TANDEM_REDIS_PREFIX']}:queue"
    with redis.Redis.from_url(cluster.redis.url) as client:
        pending = client.xpending_range(queue, "workers", "-", "+", 100, consumername=match[1])
        entries = [client.xrange(queue, p["message_id"], p["message_id"]) for p in pending]
    return [fields[b"id"].decode() for found in entries for _, fields in found]


def _until_holding(cluster: Cluster, worker: WorkerProcess, timeout: float = 30.0) -> None:
    """Wait until the worker holds jobs (a batch in hand), or the timeout: the caller checks."""
    deadline = time.monotonic() + timeout
    while not held_by(cluster, worker) and time.monotonic() < deadline:
        time.sleep(0.005)


def gone_for_redis(cluster: Cluster, process: WorkerProcess, timeout: float = 10.0) -> None:
    assert process.process is not None
    name = connection_name(process.process.pid)
    deadline = time.monotonic() + timeout
    with redis.Redis.from_url(cluster.redis.url) as client:
        while any(c["name"] == name for c in client.client_list()):
            assert time.monotonic() < deadline, f"Redis still serves {name}"
            time.sleep(0.01)


def test_stats_add_up_across_two_proxies_and_two_workers(cluster: Cluster) -> None:
    proxies = [cluster.proxy(), cluster.proxy()]
    cluster.worker()
    cluster.worker()
    ledgers = [cluster.submit(proxy, 20) for proxy in proxies]
    for proxy, ledger in zip(proxies, ledgers, strict=True):
        assert_every_accepted_job_answered_once(cluster.settle(proxy, ledger))
    deadline = time.monotonic() + 15  # the other proxy writes its request counts every 2 s
    with proxies[0].client() as client:
        while (stats := client.get("/stats").json())["requests"] < 40:
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
    assert stats["requests"] == 40
    assert stats["judged"] == 40  # counted by whichever worker stored each result
    assert stats["jobs"]["done"] == 40
    assert sum(b["judged"] for b in stats["buckets"]) == 40


def test_events_and_long_polls_reach_clients_of_another_proxy(cluster: Cluster) -> None:
    submitter, watcher = cluster.proxy(), cluster.proxy()
    with submitter.client() as client:
        job_ids = [client.post("/predict", json=BODY).json()["job_id"] for _ in range(3)]
    with watcher.client() as client, ThreadPoolExecutor(2) as pool:

        def events(job_id: str) -> list[str]:
            with client.stream("GET", f"/job/{job_id}/events") as response:
                return [name for name, _ in server_sent_events(response)]

        streams = [pool.submit(events, job_id) for job_id in job_ids[:2]]
        polled = pool.submit(lambda: client.get(f"/job/{job_ids[2]}", params={"wait": 25}))
        time.sleep(0.5)  # every watch open before any job can finish
        cluster.worker()  # only now can the jobs run, in another process
        for stream in streams:
            names = stream.result(timeout=60)
            assert names[0] == "queued"
            assert names[-1] == "done"
        assert polled.result(timeout=60).json()["status"] == "done"


def test_one_request_id_follows_an_image_through_proxy_and_worker(cluster: Cluster) -> None:
    cluster.env["TANDEM_LOG_FORMAT"] = "json"
    proxy, worker = cluster.proxy(), cluster.worker()
    with proxy.client() as client:
        response = client.post("/predict", json=BODY, headers={"X-Request-ID": "trace-4711"})
        job_id = response.json()["job_id"]
        assert client.get(f"/job/{job_id}", params={"wait": 25}).json()["status"] == "done"
    proxy.stop()
    worker.stop()
    lines = [
        json.loads(line)  # every line is one JSON object
        for process in (proxy, worker)
        for line in process.log_path.read_text().splitlines()
        if line.strip()
    ]
    traced = [line for line in lines if line.get("request_id") == "trace-4711"]
    assert {line["logger"] for line in traced} >= {"tandem.access", "tandem.worker"}
    assert any(line.get("job_id") == job_id and "done" in line["message"] for line in traced)
    # One access line for the request, naming the job it queued.
    [access] = [
        line
        for line in traced
        if line["logger"] == "tandem.access" and line.get("path") == "/predict"
    ]
    assert (access["method"], access["status"], access["job_id"]) == ("POST", 200, job_id)
    assert f"job {job_id} queued" in access["message"]
    # Each process says, as it starts, where the jobs are.
    for process in (proxy, worker):
        assert f"; jobs in Redis at {cluster.redis.url} (keys " in (process.log_path.read_text())


def test_sigkill_of_a_worker_mid_batch_loses_nothing(cluster: Cluster) -> None:
    cluster.env["TANDEM_WORKER_BATCH_SIZE"] = "8"
    proxy = cluster.proxy()
    doomed = cluster.worker()
    ledger = cluster.submit(proxy, 80)
    _until_holding(cluster, doomed)
    doomed.kill()  # mid-batch
    # Redis still runs what the worker sent just before it died; once Redis has closed its
    # connections, what it holds is exact: delivered to the dead worker, never acknowledged.
    gone_for_redis(cluster, doomed)
    held = held_by(cluster, doomed)
    assert held, "the worker died holding nothing; the test proved nothing"
    survivor = cluster.worker()
    counts = cluster.settle(proxy, ledger)
    assert counts["accepted"] == 80
    # The kill may fall between a batch's storing, which Redis carries out, and its log lines:
    # those jobs are done once, by the dead worker, with no line (8 of them, in one full run).
    assert_every_accepted_job_answered_once(counts, unlogged=8)
    # Finishing a job acknowledges its entry in the same script, so what the dead worker held
    # unacknowledged it never answered: the survivor answered each of them, on redelivery.
    # (Not checked through `attempts`: a kill between delivery and lease leaves it unbumped.)
    answered_by_survivor = set(DONE_LINE.findall(survivor.log_path.read_text()))
    assert set(held) <= answered_by_survivor, set(held) - answered_by_survivor


def test_a_worker_frozen_mid_batch_is_taken_over_and_its_late_answers_dropped(
    cluster: Cluster,
) -> None:
    """Workers renew the leases of what they hold; a frozen one (SIGSTOP: a paused VM, a
    process stuck in the kernel) renews nothing, so its jobs go to another worker once the
    timeout (3 s here) runs out. Woken, it finishes its batch, and the answers already stored
    stand: nothing is answered twice."""
    cluster.env["TANDEM_WORKER_BATCH_SIZE"] = "8"
    proxy = cluster.proxy()
    frozen = cluster.worker()
    ledger = cluster.submit(proxy, 80)
    _until_holding(cluster, frozen)
    frozen.signal(signal.SIGSTOP)  # mid-batch
    try:
        held = held_by(cluster, frozen)
        assert held, "the worker froze holding nothing; the test proved nothing"
        survivor = cluster.worker()
        cluster.settle(proxy, ledger)
    finally:
        frozen.signal(signal.SIGCONT)
    deadline = time.monotonic() + 20
    while "was already finished; result dropped" not in frozen.log_path.read_text():
        assert time.monotonic() < deadline, frozen.log()
        time.sleep(0.05)
    counts = cluster.settle(proxy, ledger)
    assert counts["accepted"] == 80
    assert_every_accepted_job_answered_once(counts)
    answered_by_survivor = set(DONE_LINE.findall(survivor.log_path.read_text()))
    assert set(held) <= answered_by_survivor, set(held) - answered_by_survivor
    assert "Traceback" not in frozen.log_path.read_text()


def test_redis_restarts_while_jobs_flow(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    cluster.worker()
    cluster.worker()
    with ThreadPoolExecutor(max_workers=1) as background:
        sending = background.submit(cluster.submit, proxy, 160, 0.02)
        time.sleep(1.0)
        cluster.redis.kill()  # appendonly + appendfsync always: acknowledged writes are on disk
        time.sleep(1.0)
        cluster.redis.start()
        ledger = sending.result(timeout=120)  # re-raises whatever went wrong while sending
    counts = cluster.settle(proxy, ledger)
    assert counts["accepted"] > 0
    assert counts["accepted"] + counts["refused"] == 160
    assert_every_accepted_job_answered_once(counts)
    with proxy.client() as client:  # both sides reconnected by themselves
        assert client.get("/health/all").json()["queue"] == "ok"


def test_an_open_event_stream_survives_a_redis_restart(cluster: Cluster) -> None:
    proxy = cluster.proxy()  # no worker yet: the job waits
    with proxy.client() as client, ThreadPoolExecutor(1) as pool:
        job_id = client.post("/predict", json=BODY).json()["job_id"]

        def events() -> list[str]:
            with client.stream("GET", f"/job/{job_id}/events") as response:
                return [name for name, _ in server_sent_events(response)]

        watching = pool.submit(events)
        time.sleep(0.5)
        cluster.redis.kill()
        time.sleep(1.0)
        cluster.redis.start()
        cluster.worker()  # the result is stored after the proxy's subscription came back
        assert watching.result(timeout=60)[-1] == "done"


def test_a_full_queue_refuses_with_the_fast_answer_and_recovers(cluster: Cluster) -> None:
    cluster.env["TANDEM_MAX_QUEUE_LENGTH"] = "5"
    proxy = cluster.proxy()  # no worker yet: the queue only fills
    ledger = cluster.submit(proxy, 12)
    assert len(ledger.accepted) == 5
    assert ledger.refused == {"queue_full": 7}
    cluster.worker()
    counts = cluster.settle(proxy, ledger)
    assert_every_accepted_job_answered_once(counts)
    later = cluster.submit(proxy, 3)
    assert len(later.accepted) == 3


def test_a_proxy_without_workers_stays_ready_and_queues_for_them(cluster: Cluster) -> None:
    """/health/all fails with no worker, at every proxy at once: the readiness probe is
    /health, which holds while the proxy gives fast answers and takes jobs for later."""
    proxy = cluster.proxy()
    with proxy.client() as client:
        response = client.post("/predict", json=BODY)
        ready = client.get("/health")
        health = client.get("/health/all")
    assert response.status_code == 200
    assert response.json()["job"]["status"] == "queued"
    assert ready.status_code == 200
    assert health.status_code == 503
    assert health.json()["efficientnet_lite2"] == "no live worker serves this model"


def test_redis_down_gives_the_fast_answer_and_says_so(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    cluster.redis.kill()
    with proxy.client() as client:
        response = client.post("/predict", json=BODY)
        health = client.get("/health/all")
        ready = client.get("/health")
    assert ready.status_code == 200  # the readiness probe: fast answers still come
    assert response.status_code == 503
    body = response.json()
    assert body["job_id"] is None
    assert body["efficientnet_lite0"]
    assert body["error"]["code"] == "queue_unavailable"
    assert body["error"]["message"] == "Redis is unavailable"  # not where Redis is
    assert health.status_code == 503
    # With no API keys anyone may ask: redis-py's own account follows.
    assert health.json()["queue"].startswith("Redis is unavailable: ")
    assert str(cluster.redis.port) in health.json()["queue"]
    assert health.json()["efficientnet_lite0"] == "ok"


def test_a_hung_redis_gives_the_fast_answer_within_seconds_and_all_recovers(
    cluster: Cluster,
) -> None:
    """Stopped, Redis accepts connections and answers nothing, as across a partition. A
    request then waited past its deadline for as long as TCP kept the connection (minutes),
    and got a plain-text 500."""
    outage = _through_an_outage(cluster, cluster.redis.pause, cluster.redis.resume)
    assert outage.took_s < 15, f"answered after {outage.took_s:.1f} s"


def test_a_redis_that_refuses_writes_gives_the_fast_answer_and_all_recovers(
    cluster: Cluster,
) -> None:
    """A Redis at its memory limit refuses every write (OOM), as a replica does after a
    failover (READONLY). The proxy answered 500 without the fast answer, /health/all said the
    queue was ok, and a worker exited at its next heartbeat."""
    with contextlib.closing(redis.Redis.from_url(cluster.redis.url)) as admin:
        outage = _through_an_outage(
            cluster,
            lambda: admin.config_set("maxmemory", "1"),  # the default policy: noeviction
            lambda: admin.config_set("maxmemory", "0"),
            linger_s=HEARTBEAT_S + 0.5,  # the worker's heartbeat meets the refusal
        )
    assert outage.error["message"] == "Redis refused the write"  # the why is the operator's
    assert "maxmemory" in outage.health["queue"]  # no API keys: anyone may read it


@dataclass
class Outage:
    error: dict[str, Any]  # the error of the request sent during the outage
    took_s: float
    health: dict[str, Any]


def _through_an_outage(
    cluster: Cluster,
    begin: Callable[[], object],
    end: Callable[[], object],
    linger_s: float = 0.0,
) -> Outage:
    """A request and a health check while the queue is out, and a job after: the request had
    the fast answer and 503, the health check 503, and the one worker answered the job."""
    proxy = cluster.proxy()
    cluster.worker()
    with proxy.client() as client:
        assert client.post("/predict", json=BODY).status_code == 200
        begin()
        try:
            started = time.monotonic()
            response = client.post("/predict", json=BODY)
            took_s = time.monotonic() - started
            health = client.get("/health/all")
            time.sleep(linger_s)
        finally:
            end()
        after = client.post("/predict", json=BODY)
        assert after.status_code == 200, after.text
        done = wait_for_job(client, after.json()["job_id"])
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "queue_unavailable"
    assert body["efficientnet_lite0"]  # the fast answer, whatever the queue
    assert health.status_code == 503
    assert health.json()["queue"] != "ok"
    assert done["status"] == "done"  # the worker came through
    return Outage(body["error"], took_s, health.json())


def test_sigterm_lets_a_worker_finish_and_exit(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    leaving = cluster.worker()
    staying = cluster.worker()
    ledger = cluster.submit(proxy, 40)
    leaving.signal(signal.SIGTERM)
    assert leaving.wait_exit(timeout=30) == 0
    assert "stopped" in leaving.log()
    counts = cluster.settle(proxy, ledger)
    assert_every_accepted_job_answered_once(counts)
    assert staying.process is not None
    assert staying.process.poll() is None


def test_idempotency_key_and_cancel_over_http(cluster: Cluster) -> None:
    proxy = cluster.proxy()  # no worker: jobs stay queued
    with proxy.client() as client:
        first = client.post("/predict", json=BODY, headers={"Idempotency-Key": "order-17"})
        retry = client.post("/predict", json=BODY, headers={"Idempotency-Key": "order-17"})
        other = client.post("/predict", json=BODY)
        assert first.json()["job_id"] == retry.json()["job_id"] != other.json()["job_id"]
        reused = client.post(
            "/predict", json=OTHER_BODY, headers={"Idempotency-Key": "order-17"}
        )  # another image under the same key: not a retry
        assert reused.status_code == 422
        assert reused.json()["error"]["code"] == "idempotency_key_reused"
        bad_key = client.post("/predict", json=BODY, headers={"Idempotency-Key": "x" * 200})
        assert bad_key.status_code == 400

        job_id = other.json()["job_id"]
        cancelled = client.delete(f"/job/{job_id}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert client.get(f"/job/{job_id}").json()["status"] == "cancelled"
        assert client.delete(f"/job/{'0' * 32}").status_code == 404
    cluster.worker()
    with proxy.client() as client:
        done = wait_for_job(client, first.json()["job_id"])
        assert done["status"] == "done"
        again = client.delete(f"/job/{first.json()['job_id']}")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"


def test_tandem_up_runs_the_topology_and_ctrl_c_stops_it(model_dir: Path, tmp_path: Path) -> None:
    env = clean_env(model_dir=str(model_dir), data_dir=str(tmp_path), worker_poll_s="0.2")
    up = UpProcess(tmp_path / "up.log", env, "--workers", "2").start()
    try:
        with up.client() as client:
            job_id = client.post("/predict", json=BODY).json()["job_id"]
            assert wait_for_job(client, job_id)["status"] == "done"
        children = [
            int(pid) for pid in re.findall(r"\(pid (\d+)\)", (tmp_path / "up.log").read_text())
        ]
        assert len(children) == 4  # redis, proxy, two workers
        # The Redis URL (it may carry a password) is in no command line, which any user reads.
        for pid in children:
            assert b"redis://" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        # The two workers share the machine's CPUs rather than each taking a lane per CPU.
        lanes = max(1, len(os.sched_getaffinity(0)) // 2)
        started = re.findall(
            r"started for model \S+, (\d+) lane", (tmp_path / "up.log").read_text()
        )
        assert started == [str(lanes)] * 2
        # Its Redis has a memory limit, evicts nothing and keeps an append-only file.
        # (Each of Tandem's warnings of a Redis set up otherwise begins "Redis at".)
        assert not re.search(r"WARNING [\w.]+: Redis at", (tmp_path / "up.log").read_text())
    finally:
        up.signal(signal.SIGINT)
        assert up.wait_exit(timeout=60) == 0
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Redis's files hold the queued images: this user's alone.
    assert (tmp_path / "redis").stat().st_mode & 0o777 == 0o700
    kept = [path for path in (tmp_path / "redis").rglob("*")]
    assert kept
    assert {path.stat().st_mode & 0o077 for path in kept} == {0}


def test_sigterm_lets_the_proxy_finish_requests_in_flight(cluster: Cluster) -> None:
    proxy = cluster.proxy()
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    first_answer = threading.Event()
    # The first 16 send together once their clients exist (making one takes a while under
    # the GIL): otherwise the first could be answered before the others had even connected,
    # and the signal would find no request in flight.
    together = threading.Barrier(16)

    def one(i: int) -> None:
        try:
            with proxy.client() as client:
                if i < 16:
                    together.wait(timeout=60)
                status = str(client.post("/predict", json=BODY).status_code)
        except httpx.ConnectError:
            status = "refused"  # arrived after the listener closed: never started
        except httpx.TransportError:
            # uvicorn closes connections whose request it has not read yet when shutdown
            # begins; such a request never started, so it must have created no job.
            status = "unanswered"
        with lock:
            outcomes[status] += 1
        first_answer.set()

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        # Signal only once the proxy is answering, so that the other clients' requests are
        # in flight; a fixed delay signalled before any had arrived on a slow CI machine.
        assert first_answer.wait(timeout=60)
        assert proxy.process is not None
        with lock:
            proxy.process.send_signal(signal.SIGTERM)
            answered_before = outcomes["200"]
        for future in futures:
            future.result()
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, as is conventional.
    assert proxy.wait_exit(timeout=30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in proxy.log()
    assert set(outcomes) <= {"200", "refused", "unanswered"}, outcomes
    assert outcomes["200"] > answered_before, (answered_before, outcomes)
    # No worker runs, so every job created is still queued: one per answered request, exactly.
    # A request started and then dropped would show as a job without a 200.
    with redis.Redis.from_url(cluster.redis.url) as client:
        assert client.xlen(f"{cluster.env['TANDEM_REDIS_PREFIX']}:queue") == outcomes["200"]
