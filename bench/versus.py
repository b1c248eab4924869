"""`python -m bench.versus`: Tandem's fast path against the same pattern served the plain way.

Two servers answer the original's JSON body (`image_data`, base64) on this machine: `tandem
serve` with no worker, on the settings `python -m bench` runs it with, and `bench.plain`, a
FastAPI app written as the original's proxy is, with ONNX Runtime's and Pillow's defaults and
the job stored as durably (see its docstring). Both must give the photo the same label.
Turns of the load generator alternate between them, each side first in every other turn, at
1 client and then at 16. Prints each side's p50, p99 and requests/s, Tandem over plain
(pooled, and the median of the turns' ratios, with how many turns Tandem won), and each
server's peak RSS; writes the table as Markdown and JSON into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.__main__ import (
    Bench,
    Proc,
    _free_port,
    _summary,
    bench_photo,
    bodies,
    command_line,
    machine,
    serve,
)
from bench.ab import Side, _turn_ratios, run_turns
from bench.plain import FAST
from tandem.runtime.build import build_model, is_built


class PlainSide(Side):
    """A side served by bench.plain instead of `tandem serve`."""

    def start(self, bench: Bench, busy: int = 0) -> None:
        self.port = _free_port()
        data = bench.work / f"data-{self.name}"
        command = ["--port", str(self.port), "--model-dir", str(bench.model_dir)]
        command += ["--data", str(data)]
        log = f"serve-{self.name}.log"
        self.proc = Proc(bench, command, log, {}, module="bench.plain")
        self.proc.wait_for("", url=f"http://127.0.0.1:{self.port}/health")


class TandemSide(Side):
    def start(self, bench: Bench, busy: int = 0) -> None:
        log = f"serve-{self.name}.log"
        data = bench.work / f"data-{self.name}"
        self.proc, self.port = serve(bench, data, "--no-worker", log=log)


@dataclass(frozen=True)
class Load:
    clients: int
    turns: int
    requests: int  # per turn and side

    def args(self) -> argparse.Namespace:
        """What bench.ab's turns read."""
        return argparse.Namespace(
            turns=self.turns, requests=self.requests, clients=self.clients, busy=0, pause_ms=0.0
        )


def loads(quick: bool) -> list[Load]:
    if quick:
        return [Load(1, 2, 10), Load(16, 2, 48)]
    return [Load(1, 16, 30), Load(16, 6, 320)]


def fast_label(port: int, body: Path) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=body.read_bytes(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
        label: str = json.load(response)[FAST]
    return label


def measure(tandem: Side, plain: Side, body: Path, load: Load) -> dict[str, Any]:
    """Interleaved turns at one client count; each side's numbers and Tandem over plain."""
    for side in (tandem, plain):
        side.runs = []
    run_turns([tandem, plain], (body, "application/json"), load.args(), split=False)
    sides = {side.name: _summary(load.clients, side.runs) for side in (tandem, plain)}
    p50s = _turn_ratios(plain, tandem, 50)  # Tandem's p50 over plain's, turn by turn
    per_s = [
        _summary(load.clients, [t])["per_s"] / _summary(load.clients, [p])["per_s"]
        for t, p in zip(tandem.runs, plain.runs, strict=True)
    ]
    return {
        "clients": load.clients,
        "turns": load.turns,
        "requests_per_turn": load.requests,
        "sides": sides,
        "tandem_over_plain": {
            "p50": sides["tandem"]["p50_s"] / sides["plain"]["p50_s"],
            "p99": sides["tandem"]["p99_s"] / sides["plain"]["p99_s"],
            "per_s": sides["tandem"]["per_s"] / sides["plain"]["per_s"],
            "p50_median_of_turns": statistics.median(p50s),
            "per_s_median_of_turns": statistics.median(per_s),
            "tandem_faster_turns": sum(ratio < 1 for ratio in p50s),
        },
    }


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Tandem against the plain way",
        "",
        f"The fast model ({FAST}) on the original's JSON body; both servers labelled the "
        f"photo {results['label']!r}. Machine: {results['machine']}.",
        "",
        "| clients | side | p50 | p99 | requests/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        for name, side in row["sides"].items():
            lines.append(
                f"| {row['clients']} | {name} | {side['p50_s'] * 1000:.1f} ms "
                f"| {side['p99_s'] * 1000:.1f} ms | {side['per_s']:.1f} |"
            )
    lines += ["", "Tandem over plain, in the same turns:", ""]
    for row in results["rows"]:
        ratio = row["tandem_over_plain"]
        lines.append(
            f"- {row['clients']} client(s), {row['turns']} turns of {row['requests_per_turn']} "
            f"requests a side: p50 {ratio['p50']:.3f} (median of turns "
            f"{ratio['p50_median_of_turns']:.3f}, Tandem faster in "
            f"{ratio['tandem_faster_turns']} of {row['turns']}), p99 {ratio['p99']:.3f}, "
            f"requests/s {ratio['per_s']:.3f} (median of turns "
            f"{ratio['per_s_median_of_turns']:.3f})."
        )
    rss = results["peak_rss_mb"]
    lines += [
        "",
        f"Peak RSS: Tandem {rss['tandem']:.0f} MB, plain {rss['plain']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = command_line(__doc__).parse_args()
    if not is_built(FAST, args.model_dir):
        build_model(FAST, args.model_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(args.model_dir, args.out / f"versus-{stamp}", bench_photo(), args.quick)
    bench.work.mkdir(parents=True)
    body = bodies(bench)["json"][0]
    tandem, plain = TandemSide("tandem", Path.cwd(), {}), PlainSide("plain", Path.cwd(), {})
    try:
        for side in (tandem, plain):
            side.start(bench)
        results = compare(bench, tandem, plain, body)
    finally:
        for side in (tandem, plain):
            side.stop()
    table = render(results)
    (args.out / f"versus-{stamp}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"versus-{stamp}.md").write_text(table)
    print(table)


def compare(bench: Bench, tandem: Side, plain: Side, body: Path) -> dict[str, Any]:
    """Both sides' labels for the photo, then each load's turns, then both peak RSSs."""
    labels = {side.name: fast_label(side.port, body) for side in (tandem, plain)}
    if len(set(labels.values())) != 1:
        raise RuntimeError(f"the two servers disagree on the photo: {labels}")
    rows = [measure(tandem, plain, body, load) for load in loads(bench.quick)]
    assert tandem.proc is not None
    assert plain.proc is not None
    return {
        "machine": machine()["cpu"],
        "label": labels["tandem"],
        "rows": rows,
        "peak_rss_mb": {"tandem": tandem.proc.peak_rss_mb(), "plain": plain.proc.peak_rss_mb()},
    }


if __name__ == "__main__":
    main()
