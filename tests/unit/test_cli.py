from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from PIL import Image

from tandem.cli import EXIT_CONFIG, _ensure_data_dir, _warn_if_unguarded, main
from tandem.runtime.classifier import Classifier
from tandem.settings import Settings
from tests.support import TinySpec, clean_env, free_port, python_output, tiny_model

pytestmark = pytest.mark.usefixtures("restored_logging")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=60,
        check=False,
    )


def test_help_explains_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "models"):
        assert command in result.stdout
    serve = run("serve", "--help").stdout
    for option in ("--host", "--port", "--data-dir", "--config", "--no-worker"):
        assert option in serve
    assert "build" in run("models", "--help").stdout


def test_bad_settings_exit_with_a_message_not_a_traceback() -> None:
    result = run("models", "list", env=clean_env(port="x"))
    assert result.returncode == EXIT_CONFIG
    assert "invalid settings" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_shows_each_setting_and_what_the_automatic_ones_come_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tandem.toml"
    config.write_text("[tandem]\nport = 7000\n")
    for key in [key for key in os.environ if key.startswith("TANDEM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "data"))
    assert main(["config", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["TANDEM_PORT", "7000", str(config)]
    assert f"  job store          SQLite at {tmp_path / 'data' / 'tandem.db'}" in lines
    assert "  embedded worker    yes" in lines
    monkeypatch.setenv("TANDEM_REDIS_URL", "redis://:hunter2@redis.internal:6380/1")
    assert main(["config"]) == 0
    resolved = capsys.readouterr().out.splitlines()
    assert "  job store          Redis at redis://:***@redis.internal:6380/1 (keys tandem:*)" in (
        resolved
    )
    assert "  embedded worker    no" in resolved
    monkeypatch.setenv("TANDEM_TOP_K", "0")
    assert main(["config"]) == EXIT_CONFIG
    assert "top_k (TANDEM_TOP_K): Input should be greater than or equal to 1" in (
        capsys.readouterr().err
    )


def test_a_data_directory_the_store_cannot_use_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "a-file" / "data"))
    assert main(["serve"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"tandem: the data directory {tmp_path / 'a-file' / 'data'} cannot")
    assert "Not a directory" in err
    assert not (tmp_path / "models").exists()  # refused before building any model


def test_a_port_another_process_listens_on_is_refused_before_the_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn found it only once the models had loaded and the worker had started."""
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "data"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        f"tandem: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
    assert not (tmp_path / "models").exists()  # refused before building any model


def test_a_host_that_names_no_address_is_refused_before_the_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn said only "[Errno -2] Name or service not known", once the models had loaded."""
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TANDEM_API_KEYS", "k" * 32)  # no warning about an open port first
    assert main(["serve", "--host", "999.1.1.1"]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith("tandem: cannot listen on 999.1.1.1:8000: ")
    assert not (tmp_path / "models").exists()


def _unusable_tls(kind: str, directory: Path) -> tuple[Path, Path]:
    """A certificate and key that cannot serve TLS, `kind` saying why."""
    ca = trustme.CA()
    issued, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(certfile))
    if kind == "missing":
        return certfile, directory / "nowhere.pem"
    if kind == "not its key":
        other.private_key_pem.write_to_path(str(keyfile))
        return certfile, keyfile
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), password=None)
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return certfile, keyfile


@pytest.mark.parametrize("kind", ["missing", "not its key", "a key with a passphrase"])
def test_a_certificate_and_key_that_cannot_serve_tls_are_refused_in_one_line(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn found them only once the models had loaded, with a traceback; a key with a
    passphrase had it ask for one on the terminal."""
    certfile, keyfile = _unusable_tls(kind, tmp_path)
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TANDEM_TLS_CERTFILE", str(certfile))
    monkeypatch.setenv("TANDEM_TLS_KEYFILE", str(keyfile))
    assert main(["serve", "--port", str(free_port())]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"tandem: cannot serve TLS with the certificate {certfile} and the key")
    assert err.count("\n") == 1
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_job_store_file_sqlite_cannot_read_is_refused_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """It was a traceback from inside the server's start-up, and the worker's."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tandem.db").write_text("these are notes, not a database\n" * 40)
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TANDEM_DATA_DIR", str(data))
    assert main([command]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert (
        err
        == f"tandem: the job store {data / 'tandem.db'} cannot be opened: file is not a database\n"
    )
    assert not (tmp_path / "models").exists()  # refused before building any model


@pytest.mark.parametrize(
    ("fault", "command"),
    [
        ("damaged", "serve"),
        ("another side", "serve"),
        ("another side inside", "serve"),
        ("another side inside", "worker"),
    ],
)
def test_a_model_it_cannot_run_is_refused_in_one_line_before_serving(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    command: str,
) -> None:
    """A graph that takes 16x16 images, where its manifest says 8, had stopped the server's
    start-up with a traceback. One whose input leaves the side free, but whose layers fix
    it at 16, had started: the server's start-up then stopped with a traceback, and a worker
    failed every job it claimed."""
    side = 16 if fault == "another side" else None
    inside = 16 if fault == "another side inside" else None
    spec = TinySpec(
        name="tiny", size=8, graph_size=side, any_side=bool(inside), fixed_inside=inside
    )
    manifest = tiny_model(tmp_path / "models" / "tiny", spec)
    model = manifest.parent / "tiny.onnx"
    if fault == "damaged":
        model.write_bytes(model.read_bytes() + b"\0")  # one byte more than its checksum covers
    for name, value in {
        "MODEL_DIR": tmp_path / "models",
        "DATA_DIR": tmp_path / "data",
        "FAST_MODEL": "tiny",
        "ACCURATE_MODEL": "tiny",
        "PORT": 0,
    }.items():
        monkeypatch.setenv(f"TANDEM_{name}", str(value))
    assert main([command]) == EXIT_CONFIG
    said = capsys.readouterr().err
    assert said.count("\n") == 1
    expected = {
        "damaged": f"tandem: {model} does not match the checksum in its manifest\n",
        "another side": "tandem: model tiny takes 16x16 images, but its manifest's"
        " preprocess.size is 8\n",
        # ONNX Runtime's own words follow
        "another side inside": "tandem: model tiny cannot classify the bundled sample photo: ",
    }[fault]
    assert said.startswith(expected)


def test_unknown_model_names_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path))
    assert main(["models", "build", "resnet9000"]) == EXIT_CONFIG
    assert "unknown built-in model" in capsys.readouterr().err


def test_models_list_shows_what_is_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model(tmp_path / "efficientnet_lite0", TinySpec(name="efficientnet_lite0", size=8))
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ready" in out[0]
    assert "missing" in out[1]


def test_models_list_names_a_model_it_could_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged file, or a graph its manifest does not describe, had been listed as built,
    and `tandem serve` then refused it."""
    tiny_model(tmp_path / "efficientnet_lite0", TinySpec(name="efficientnet_lite0", size=8))
    odd = tiny_model(tmp_path / "odd", TinySpec(name="odd", size=8, graph_size=16))
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("TANDEM_ACCURATE_MODEL", str(odd))
    assert main(["models", "list"]) == EXIT_CONFIG
    out = capsys.readouterr().out.splitlines()
    assert "ready" in out[0]
    assert "unusable" in out[1]
    assert out[2].strip() == "model odd takes 16x16 images, but its manifest's preprocess.size is 8"


def test_serving_code_never_imports_torch_nor_the_checkpoint_reader() -> None:
    # The proxy and workers run on ONNX Runtime; the checkpoint reader (which unpickles) is
    # for `tandem models build` only, and torch for the tests.
    code = (
        "import sys, tandem.cli, tandem.api.app, tandem.worker, tandem.runtime.build;"
        "tandem.cli.build_parser();"
        "print(sorted({'torch', 'onnx', 'tandem.runtime.torchfile'} & set(sys.modules)))"
    )
    assert python_output(code).strip() == "[]"


def test_the_data_directory_serve_makes_is_this_users_alone(tmp_path: Path) -> None:
    """It holds the queued photos; made with the usual umask, any user could list and read it."""
    data = tmp_path / "made" / "data"
    previous = os.umask(0o022)
    try:
        _ensure_data_dir(Settings(data_dir=data, model_dir=tmp_path / "models"))
    finally:
        os.umask(previous)
    assert data.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", (), True),
        ("::", (), True),
        ("10.1.2.3", (), True),
        ("0.0.0.0", ("k" * 32,), False),
        ("127.0.0.1", (), False),
        ("::1", (), False),
        ("localhost", (), False),
    ],
)
def test_a_server_others_reach_without_api_keys_is_warned_of(
    host: str, keys: tuple[str, ...], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    _warn_if_unguarded(
        Settings(data_dir=Path("/d"), model_dir=Path("/m"), host=host, api_keys=keys)
    )
    assert ("with no API keys" in caplog.text) is warned


def _bare_model(directory: Path, **spec: Any) -> Path:
    """A tiny model's .onnx with no manifest beside it, and a file of its ten labels."""
    manifest = tiny_model(directory, TinySpec(name="bare", size=8, **spec))
    manifest.unlink()
    # As a Windows editor may save it: a byte order mark first, a blank line last.
    text = "\ufeff" + "".join(f"class {i}\r\n" for i in range(10)) + "\r\n"
    (directory / "labels.txt").write_text(text, "utf-8", newline="")
    return directory / "bare.onnx"


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_models_manifest_describes_a_bare_model_and_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    """Its side and layout read from the graph, its checksum computed, its labels from a file."""
    model = _bare_model(tmp_path, layout=layout)
    labels = str(tmp_path / "labels.txt")
    assert main(["models", "manifest", str(model), "--labels", labels, "--scale", "1"]) == 0
    manifest_path = tmp_path / "manifest.json"
    assert capsys.readouterr().out == f"{manifest_path}: ready to serve (10 labels)\n"
    classifier = Classifier.from_manifest(manifest_path)
    assert classifier.manifest.preprocess.layout == layout
    assert classifier.manifest.preprocess.size == 8
    assert classifier.manifest.name == "bare"
    assert classifier.manifest.labels == tuple(f"class {i}" for i in range(10))
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    assert classifier.predict([red], 1)[0].label == "class 1"


def test_models_manifest_asks_for_the_side_a_graph_leaves_free(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _bare_model(tmp_path, any_side=True)
    command = ["models", "manifest", str(model), "--labels", str(tmp_path / "labels.txt")]
    assert main(command) == EXIT_CONFIG
    assert "does not fix the side of its images: give --size" in capsys.readouterr().err
    assert main([*command, "--size", "8"]) == 0
    manifest = Classifier.from_manifest(tmp_path / "manifest.json").manifest
    assert (manifest.preprocess.size, manifest.preprocess.layout) == (8, "NCHW")


def test_models_manifest_leaves_nothing_for_a_model_it_would_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _bare_model(tmp_path)
    (tmp_path / "three.txt").write_text("a\nb\nc\n", "utf-8")
    labels = str(tmp_path / "three.txt")
    assert main(["models", "manifest", str(model), "--labels", labels]) == EXIT_CONFIG
    assert "gives 10 scores an image in output logits, but its manifest lists 3 labels" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "manifest.json").exists()
    assert main(["models", "manifest", str(model), "--labels", str(tmp_path / "labels.txt")]) == 0
    again = ["models", "manifest", str(model), "--labels", str(tmp_path / "labels.txt")]
    assert main(again) == EXIT_CONFIG
    assert "exists (use --force to write it anew)" in capsys.readouterr().err
    assert main([*again, "--force"]) == 0
    kept = (tmp_path / "manifest.json").read_bytes()
    assert main(["models", "manifest", str(model), "--labels", labels, "--force"]) == EXIT_CONFIG
    assert (tmp_path / "manifest.json").read_bytes() == kept  # the refused one never took its place
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bare.onnx",
        "labels.txt",
        "manifest.json",
        "three.txt",
    ]
    capsys.readouterr()
    missing = ["models", "manifest", str(tmp_path / "gone.onnx"), "--labels", labels]
    assert main(missing) == EXIT_CONFIG  # had been a traceback
    assert capsys.readouterr().err == f"tandem: no model file at {tmp_path / 'gone.onnx'}\n"
