"""The benchmark command runs and writes its table. Its numbers are not checked: they belong to
the machine that made them, and are read from the table, never asserted in tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _started(module: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m module args` from the repository's root, in a session of its own: on the
    way out it is killed with every server it started, which a timeout had left running."""
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _run(module: str, *args: str, timeout: float) -> str:
    """`python -m module args`, which must exit 0 within `timeout`; its output."""
    with _started(module, *args) as process:
        out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-6000:]
    return out


def _bench(model_dir: Path, out: Path, *args: str, timeout: float) -> None:
    _run(
        "bench", "--quick", "--model-dir", str(model_dir), "--out", str(out), *args, timeout=timeout
    )


@pytest.mark.timeout(300)
def test_the_benchmark_runs_and_writes_its_table(model_dir: Path, tmp_path: Path) -> None:
    _bench(model_dir, tmp_path, timeout=280)
    (markdown,) = tmp_path.glob("bench-*.md")
    (raw,) = tmp_path.glob("bench-*.json")
    table = markdown.read_text()
    for heading in ("Floor", "Sync path", "Async path and interference", "Memory", "Targets"):
        assert heading in table
    assert table.count(" met") + table.count("MISSED") == 8  # every target got a ratio
    assert table.count("; turns redrawn: ") == 2  # each interference ratio with its spread
    results = json.loads(raw.read_text())
    assert set(results) >= {"floor", "sync", "async", "interference", "machine"}
    assert results["sync"]["raw"] is not None  # raw image bodies were accepted
    # Each 1-client row says where its time went, beside the floor's steps.
    assert "Where a 1-client request's time goes" in table
    for kind in ("json", "raw"):
        one = results["sync"][kind][0]
        assert set(one["floor_split"]) == {"decode_s", "preprocess_s", "inference_s"}
        assert set(one["split"]) == {"decode_s", "preprocess_s", "inference_s", "outside_s"}
        assert all(seconds > 0 for seconds in one["split"].values())
    # The floor's best throughput is a ceiling: its scan had callers side by side too.
    assert "The scan behind the best throughput" in table
    assert "Single-threaded callers side by side against one, batch 1: " in table
    cores = os.cpu_count() or 1
    for row in results["floor"].values():
        assert {setting["callers"] for setting in row["best"]["scan"]} == {1, cores}
    # Both throughputs were compared with the floor's best of the same turns.
    for kind in ("json", "raw"):
        sixteen = next(row for row in results["sync"][kind] if row["clients"] == 16)
        assert sixteen["ok"] > 0
        assert sixteen["floor_per_s"] > 0
    # One client sending sporadically, beside a floor called after the same pauses.
    sporadic = results["sync"]["sporadic"]
    assert sporadic["ok"] == sporadic["requests"] > 0
    assert sporadic["floor_s"] > 0
    assert sporadic["pause_ms"] > 0
    assert "| raw, sporadic | 1 |" in table
    assert "the floor called as sporadically, in turns" in table
    assert results["async"]["jobs"] > 0
    assert results["async"]["floor_per_s"] > 0
    assert results["async"]["queue_left"] > 0  # the worker never ran out of jobs in a turn
    # Interference's two sides were each sampled, in turns, at 1 and at 4 clients.
    for side in ("empty", "full"):
        rows = results["interference"][side]
        assert [row["clients"] for row in rows] == [1, 4]
        assert all(row["ok"] == row["requests"] > 0 for row in rows)


@pytest.mark.timeout(120)
def test_the_profile_says_where_a_proxy_s_time_goes(model_dir: Path, tmp_path: Path) -> None:
    _bench(model_dir, tmp_path, "--profile", "--clients", "2", timeout=100)
    (report,) = tmp_path.glob("profile-*.md")
    (stacks,) = tmp_path.glob("profile-*.txt")
    text = report.read_text()
    assert text.startswith("# Where a proxy's time goes: 2 clients, raw image bodies")
    assert re.search(r"^\d+ requests, [\d.]+ a second\.", text, re.MULTILINE)
    # The whole proxy, and the load generator beside it on the same cores.
    for row in ("all of the proxy", "the load generator"):
        assert re.search(rf"^\| {row} \| \d+\.\d\d ms \|$", text, re.MULTILINE)
    assert "| the load generator | 0.00 ms |" not in text
    # CPU by thread: the event loop, the fast model's pool, the store's thread, ONNX Runtime's.
    for thread in ("| MainThread |", "| tandem-fast_0 |", "| tandem-sqlite_0 |", "native thread"):
        assert thread in text
    # py-spy saw the model run inside the service, and the request pass the guards.
    assert "`TandemService._classify (tandem/service.py)`" in text
    assert "`RequestIdMiddleware.__call__ (tandem/api/middleware.py)`" in text
    assert stacks.read_text().startswith("thread (")


def _ab(model_dir: Path, out: Path, *args: str, timeout: float) -> str:
    """Run `python -m bench.ab` for 2 turns of 3 requests; the report it wrote."""
    options = ["--model-dir", str(model_dir), "--out", str(out), "--turns", "2", "--requests", "3"]
    _run("bench.ab", *options, *args, timeout=timeout)
    (report,) = out.glob("ab-*.md")
    return report.read_text()


@pytest.mark.timeout(120)
def test_the_ab_command_compares_two_servers_in_turns(model_dir: Path, tmp_path: Path) -> None:
    setting = ["--b-env", "TANDEM_CASCADE_POLICY=when_unsure"]
    text = _ab(model_dir, tmp_path, *setting, "--pause-ms", "5", timeout=100)
    assert "a pause of about 5 ms before each request" in text
    assert "- B: " in text
    assert "TANDEM_CASCADE_POLICY=when_unsure" in text
    assert text.count("| A | ") == text.count("| B | ") == 1
    assert "of 2 turns;" in text
    # Each side got its own server, with its own settings and log.
    logs = sorted(path.name for path in tmp_path.glob("ab-*/serve-*.log"))
    assert logs == ["serve-A.log", "serve-B.log"]


@pytest.mark.timeout(150)
def test_the_ab_command_compares_two_busy_servers(model_dir: Path, tmp_path: Path) -> None:
    text = _ab(model_dir, tmp_path, "--busy", "8", timeout=130)
    assert "each server's worker draining 8 queued jobs" in text
    assert "median of the turns' p99 ratios" in text
    # Each side queued its jobs with no worker, then served them with its embedded worker.
    logs = sorted(path.name for path in tmp_path.glob("ab-*/*.log"))
    assert logs == ["fill-A.log", "fill-B.log", "serve-A.log", "serve-B.log"]
    for side in "AB":
        serve = next(tmp_path.glob(f"ab-*/serve-{side}.log")).read_text()
        assert "started for model" in serve  # the embedded worker ran


@pytest.mark.timeout(120)
def test_the_versus_command_measures_tandem_against_the_plain_way(
    model_dir: Path, tmp_path: Path
) -> None:
    options = ["--quick", "--model-dir", str(model_dir), "--out", str(tmp_path)]
    _run("bench.versus", *options, timeout=100)
    (raw,) = tmp_path.glob("versus-*.json")
    results = json.loads(raw.read_text())
    # Both servers gave the photo the same label: the same work was asked of each.
    assert results["label"] == "Egyptian cat"
    assert [row["clients"] for row in results["rows"]] == [1, 16]
    for row in results["rows"]:
        for side in ("tandem", "plain"):
            numbers = row["sides"][side]
            assert numbers["ok"] == numbers["requests"] == row["turns"] * row["requests_per_turn"]
        assert row["tandem_over_plain"]["per_s"] > 0
    assert set(results["peak_rss_mb"]) == {"tandem", "plain"}
    # The plain server stored a job for every request it answered, as Tandem does: the warm-up's
    # 30, the label's one, and the turns'.
    (jobs,) = tmp_path.glob("versus-*/data-plain/jobs.db")
    with sqlite3.connect(jobs) as db:
        (stored,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
    answered = sum(row["sides"]["plain"]["ok"] for row in results["rows"])
    assert stored == 2 * 30 + 1 + answered  # a warm-up before each client count's turns
    text = next(tmp_path.glob("versus-*.md")).read_text()
    assert "both servers labelled the photo 'Egyptian cat'" in text
    assert text.count("| tandem |") == text.count("| plain |") == 2


@pytest.mark.timeout(60)
def test_the_session_options_command_times_each_setting_against_tandem_s(tiny_dir: Path) -> None:
    options = ["--model-dir", str(tiny_dir), "--model", "tiny_fast", "--turns", "2", "--runs", "3"]
    output = _run("bench.session_options", *options, timeout=50)
    rows = [line for line in output.splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| Tandem's: ORT_ENABLE_ALL, arena and patterns on",
        "| ORT_ENABLE_EXTENDED",
        "| ORT_ENABLE_BASIC",
        "| ORT_DISABLE_ALL",
        "| no memory arena",
        "| no memory patterns",
    ]
    assert rows[0].endswith("| 1.000 |")  # Tandem's own, against itself


def _soak(model_dir: Path, out: Path, *args: str, timeout: float) -> dict[str, Any]:
    """Run `python -m bench.soak` for a quarter of a minute; the report it wrote. Its exit
    status is 0 only if every answer was one its request expects and no log has a traceback."""
    options = ["--model-dir", str(model_dir), "--out", str(out), "--minutes", "0.25"]
    _run("bench.soak", *options, "--every", "2", "--ttl", "5", *args, timeout=timeout)
    (raw,) = out.glob("soak*.json")
    report: dict[str, Any] = json.loads(raw.read_text())
    # Every kind of request was sent and answered as expected; the webhooks came back.
    kinds = {key.split()[0] for key in report["tally"]["answers"]}
    assert kinds >= {"json", "raw", "wait", "stream", "cancel", "idempotent", "refused"}
    assert report["tally"]["webhooks"] > 0
    assert len(report["samples"]) >= 3
    return report


@pytest.mark.timeout(120)
def test_the_soak_command_watches_tandem_serve_under_mixed_traffic(
    model_dir: Path, tmp_path: Path
) -> None:
    report = _soak(model_dir, tmp_path, timeout=100)
    assert set(report["growth"]) == {
        "server RSS MB",
        "server threads",
        "server open files",
        "store file MB",
        "store WAL MB",
        "queue length",
    }
    assert "`tandem serve` (embedded worker, SQLite)" in (tmp_path / "soak.md").read_text()


@pytest.mark.timeout(150)
def test_an_interrupted_soak_reports_the_time_it_ran_and_kept_each_sample_as_taken(
    model_dir: Path, tmp_path: Path
) -> None:
    """A long soak ended with Ctrl-C had left nothing: its report and samples were written
    only at the end of the minutes asked for."""
    options = ["--model-dir", str(model_dir), "--out", str(tmp_path), "--minutes", "30"]
    with _started("bench.soak", *options, "--every", "2", "--ttl", "5") as soak:
        taken = _eventually_lines(tmp_path, 3, soak)
        soak.send_signal(signal.SIGINT)
        out, _ = soak.communicate(timeout=100)
    assert soak.returncode == 0, out[-6000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert 0 < report["run"]["minutes"] < 5
    assert len(report["samples"]) >= len(taken)
    assert report["samples"][: len(taken)] == taken  # the lines are the report's samples
    assert sum(report["tally"]["answers"].values()) > 0


def _eventually_lines(out: Path, count: int, soak: subprocess.Popen[str]) -> list[Any]:
    """The first `count` samples of the soak writing under `out`, once it has written them."""
    for _ in range(600):
        assert soak.poll() is None, "the soak stopped by itself"
        lines = [p.read_text().splitlines() for p in out.glob("soak-*/samples.jsonl")]
        if lines and len(lines[0]) >= count:
            return [json.loads(line) for line in lines[0][:count]]
        time.sleep(0.2)
    raise AssertionError("the soak wrote no samples")


@pytest.mark.timeout(150)
def test_the_soak_command_watches_each_process_of_tandem_up(
    model_dir: Path, tmp_path: Path
) -> None:
    report = _soak(model_dir, tmp_path, "--up", timeout=130)
    for process in ("proxy", "worker1", "worker2", "redis"):
        assert f"{process} RSS MB" in report["growth"]
    assert {"redis used MB", "redis keys", "redis files MB"} <= set(report["growth"])
    assert "`tandem up`" in (tmp_path / "soak-up.md").read_text()
