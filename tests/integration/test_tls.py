"""HTTPS from `tandem serve` itself, for a deployment with no proxy in front to speak TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from tandem.client import Client
from tandem.jobs.records import JobStatus
from tests.support import ServerProcess, clean_env, encode, solid

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
    env = clean_env(
        model_dir=str(tiny_dir),
        data_dir=str(tmp_path / "data"),
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
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
