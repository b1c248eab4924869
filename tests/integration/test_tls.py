"""TLS: HTTPS from `tandem serve` itself, for a deployment with no proxy in front to speak
it, and the Redis store over TLS (`rediss://`), as a managed Redis asks."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from tandem.client import Client
from tandem.errors import QueueUnavailable
from tandem.jobs.records import JobStatus
from tandem.jobs.redis import RedisJobStore
from tests.support import (
    RedisServer,
    ServerProcess,
    WorkerProcess,
    clean_env,
    encode,
    solid,
    tiny_env,
)

pytestmark = pytest.mark.slow


def _files(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("127.0.0.1")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    issued.private_key_pem.write_to_path(str(keyfile))
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(certfile), append=i > 0)
    return certfile, keyfile


def test_tandem_serves_https_with_the_configured_certificate(
    tiny_dir: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    certfile, keyfile = _files(ca, tmp_path)
    env = tiny_env(
        tiny_dir,
        tmp_path / "data",
        tls_certfile=str(certfile),
        tls_keyfile=str(keyfile),
    )
    server = ServerProcess(tmp_path / "server.log", env)
    plain = server.url
    server.url = plain.replace("http://", "https://")
    server.verify = trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    server.start()
    try:
        with Client(server.url, verify=trusting) as client:
            fast = client.predict(encode(solid((200, 30, 30))))
            assert fast.job_id is not None
            assert client.result(fast.job_id, wait=30).status is JobStatus.DONE
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.url}/health")  # a client that does not trust the issuer
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{plain}/health")  # plain HTTP is not served on the port
    finally:
        server.stop()


def test_proxy_and_worker_reach_redis_over_tls_with_client_certificates(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The CA and the client's certificate in the URL's query (redis-py's `ssl_*` options): a
    job through a proxy and a worker, its answer pushed to the proxy's subscription."""
    redis = RedisServer(tmp_path / "redis", tls=trustme.CA()).start()
    env = clean_env(
        model_dir=str(tiny_dir),
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
        redis_url=redis.url,
    )
    proxy = ServerProcess(tmp_path / "proxy.log", env)
    worker = WorkerProcess(tmp_path / "worker.log", env)
    try:
        proxy.start()
        worker.start()
        with proxy.client() as client:
            answer = client.post(
                "/predict",
                content=encode(solid((200, 30, 30))),
                headers={"Content-Type": "image/jpeg"},
            )
            assert answer.status_code == 200, answer.text
            job = client.get(f"/job/{answer.json()['job_id']}", params={"wait": 30}).json()
            assert job["status"] == "done", job
            health = client.get("/health/all")
            assert health.status_code == 200, health.text
        assert "Traceback" not in proxy.log() + worker.log()
        # The server does speak TLS alone, and asks for the client's certificate.
        without_certificate = redis.url.split("&ssl_certfile=")[0]
        plain = f"redis://127.0.0.1:{redis.port}/0"
        for url, reason in (
            (without_certificate, "CERTIFICATE_REQUIRED|reset|closed|EOF"),
            (plain, "reset|closed"),
        ):
            with pytest.raises(QueueUnavailable, match=reason):
                asyncio.run(_ping(url))
    finally:
        worker.stop()
        proxy.stop()
        redis.stop()


async def _ping(url: str) -> None:
    store = RedisJobStore(url)
    await store.open()
    try:
        await store.ping()
    finally:
        await store.close()
