"""`python -m bench.ab`: is a variant of the server faster? An interleaved A/B over HTTP.

Two `tandem serve` processes (no worker), A and B, each from a source tree (this one unless
told) with settings of its own, answer turns of the load generator in alternation, each side
first in half the turns, so that both meet the same moments of a shared machine. Prints each
side's p50, p99 and the steps the service timed, then B over A: pooled, as the median of the
turns' ratios, and how many turns B won. On the CI-class machine an A/A run's pooled p50
ratio moved by 4 % and its turns' median by 1 %: read a ratio with its turns.

With `--busy N`, each side first queues N jobs, then serves with its embedded worker draining
them: interference, side against side. The side not measured is paused (SIGSTOP), so that
neither side's worker meets the other's turns; an A/A run's pooled p99 moved by 5 %.

With `--pause-ms P`, each client pauses 0.5 P to 1.5 P before each request: sporadic traffic,
which meets idle cores and idle threads where back-to-back requests do not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.__main__ import (
    Bench,
    Proc,
    Target,
    _fill_queue,
    _generate_load,
    _server_split,
    bench_photo,
    bodies,
    command_line,
    serve,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Side:
    name: str
    root: Path
    env: dict[str, str]
    runs: list[dict[str, Any]] = field(default_factory=list)
    proc: Proc | None = None
    port: int = 0

    def start(self, bench: Bench, busy: int = 0) -> None:
        """Serve with no worker; with `busy`, queue that many jobs first, then serve with the
        embedded worker draining them."""
        data = bench.work / f"data-{self.name}"
        if busy:
            _fill_queue(bench, data, busy, self.root, f"fill-{self.name}.log", **self.env)
            self._serve(bench, data)
        else:
            self._serve(bench, data, "--no-worker")

    def _serve(self, bench: Bench, data: Path, *args: str) -> None:
        log = f"serve-{self.name}.log"
        self.proc, self.port = serve(bench, data, *args, cwd=self.root, log=log, **self.env)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.pause()

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.resume()

    def latencies(self) -> np.ndarray:
        return np.concatenate([run["latencies_s"] for run in self.runs])


def run_turns(
    sides: list[Side], body: tuple[Path, str], args: argparse.Namespace, *, split: bool = True
) -> None:
    """`args.turns` turns of `args.requests` requests from `args.clients` clients, each side
    first in every other turn; with `split`, each answer's own timings are kept too."""
    for side in sides:  # warm up: the first requests on a connection are slow
        _generate_load(Target(side.port, *body), 4, 60.0, 30)
        if args.busy:
            side.pause()
    for turn in range(args.turns):
        for side in sides if turn % 2 == 0 else reversed(sides):
            if args.busy:
                side.resume()
                time.sleep(0.25)  # its worker back at work before the turn starts
            target = Target(side.port, *body)
            run = _generate_load(
                target, args.clients, 60.0, args.requests, split=split, pause_ms=args.pause_ms
            )
            side.runs.append(run)
            if args.busy:
                side.pause()


def report(a: Side, b: Side, args: argparse.Namespace) -> str:
    details = f", each server's worker draining {args.busy} queued jobs" if args.busy else ""
    if args.pause_ms:
        details += f", a pause of about {args.pause_ms:g} ms before each request"
    lines = [
        f"# A/B: {args.turns} turns of {args.requests} requests, {args.clients} client(s), "
        f"{args.body} body{details}",
        "",
        f"- A: {a.root} {' '.join(f'{k}={v}' for k, v in a.env.items())}",
        f"- B: {b.root} {' '.join(f'{k}={v}' for k, v in b.env.items())}",
        "",
        "| side | p50 | p99 | decode | preprocess | inference | outside the service |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side in (a, b):
        steps = _server_split(side.runs)
        lines.append(
            f"| {side.name} | {_ms(np.percentile(side.latencies(), 50))} "
            f"| {_ms(np.percentile(side.latencies(), 99))} | {_ms(steps['decode_s'])} "
            f"| {_ms(steps['preprocess_s'])} | {_ms(steps['inference_s'])} "
            f"| {_ms(steps['outside_s'])} |"
        )
    turns = _turn_ratios(a, b, 50)
    pooled = [np.percentile(b.latencies(), q) / np.percentile(a.latencies(), q) for q in (50, 99)]
    lines += [
        "",
        f"B / A: p50 {pooled[0]:.3f}, p99 {pooled[1]:.3f}; median of the turns' p50 ratios "
        f"{statistics.median(turns):.3f}, B faster in {sum(r < 1 for r in turns)} of "
        f"{len(turns)} turns; median of the turns' p99 ratios "
        f"{statistics.median(_turn_ratios(a, b, 99)):.3f}.",
        "",
    ]
    return "\n".join(lines)


def _turn_ratios(a: Side, b: Side, q: float) -> list[float]:
    """B's percentile `q` over A's, turn by turn."""
    return [
        float(np.percentile(tb["latencies_s"], q) / np.percentile(ta["latencies_s"], q))
        for ta, tb in zip(a.runs, b.runs, strict=True)
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _settings(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = command_line(__doc__, quick=False)
    for letter in ("a", "b"):
        parser.add_argument(f"--{letter}-root", type=Path, default=ROOT, help="a source tree")
        parser.add_argument(
            f"--{letter}-env", action="append", default=[], metavar="TANDEM_X=V", help="a setting"
        )
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--requests", type=int, default=40, help="per turn and side")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--body", choices=("raw", "json"), default="raw")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        metavar="P",
        help="sporadic traffic: each client pauses 0.5 P to 1.5 P before each request",
    )
    parser.add_argument(
        "--busy", type=int, default=0, metavar="N", help="each side's worker drains N queued jobs"
    )
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(args.model_dir, args.out / f"ab-{stamp}", bench_photo(), quick=False)
    bench.work.mkdir(parents=True)
    a = Side("A", args.a_root.resolve(), _settings(args.a_env))
    b = Side("B", args.b_root.resolve(), _settings(args.b_env))
    try:
        for side in (a, b):
            side.start(bench, args.busy)
        run_turns([a, b], bodies(bench)[args.body], args)
    finally:
        for side in (a, b):
            side.stop()
    table = report(a, b, args)
    (args.out / f"ab-{stamp}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
