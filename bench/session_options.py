"""`python -m bench.session_options`: what ONNX Runtime's session options do to a model's run.

Times a batch-1 run of one model on one thread under each setting Tandem fixes (the graph
optimisation level, the memory arena, memory patterns), in alternating turns in one process,
and prints each as the median of its turns' ratios to Tandem's own setting: every graph
optimisation, arena and patterns on (see `tandem.runtime.classifier`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tandem.runtime.manifest import resolve_manifest_path, verified_model

Level = ort.GraphOptimizationLevel


@dataclass(frozen=True)
class Variant:
    name: str
    level: ort.GraphOptimizationLevel = Level.ORT_ENABLE_ALL
    arena: bool = True
    patterns: bool = True

    def session(self, model: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = self.level
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = self.arena
        options.enable_mem_pattern = self.patterns
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


TANDEM = Variant("Tandem's: ORT_ENABLE_ALL, arena and patterns on")
VARIANTS = (
    TANDEM,
    Variant("ORT_ENABLE_EXTENDED", level=Level.ORT_ENABLE_EXTENDED),
    Variant("ORT_ENABLE_BASIC", level=Level.ORT_ENABLE_BASIC),
    Variant("ORT_DISABLE_ALL", level=Level.ORT_DISABLE_ALL),
    Variant("no memory arena", arena=False),
    Variant("no memory patterns", patterns=False),
)


def _median_run_ms(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def measure(model: Path, turns: int, runs: int) -> dict[str, list[float]]:
    """Each variant's median run, in ms, per turn; the variants alternate within each turn."""
    sessions = {variant.name: variant.session(model) for variant in VARIANTS}
    first = sessions[TANDEM.name].get_inputs()[0]
    shape = [size if isinstance(size, int) else 1 for size in first.shape]
    feed = {first.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    for session in sessions.values():  # the first runs allocate and warm the caches
        _median_run_ms(session, feed, 5)
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(turns):
        for name, session in sessions.items():
            timings[name].append(_median_run_ms(session, feed, runs))
    return timings


def report(model: str, timings: dict[str, list[float]]) -> str:
    ours = timings[TANDEM.name]
    lines = [
        f"# ONNX Runtime session options: {model}, batch 1, one thread",
        "",
        "| setting | median run | to Tandem's (median of turns) |",
        "| --- | --- | --- |",
    ]
    for name, turns in timings.items():
        ratio = statistics.median(mine / base for mine, base in zip(turns, ours, strict=True))
        lines.append(f"| {name} | {statistics.median(turns):.2f} ms | {ratio:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_options", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--runs", type=int, default=40, help="runs a variant a turn")
    args = parser.parse_args(argv)
    _, model = verified_model(resolve_manifest_path(args.model, args.model_dir))
    print(report(args.model, measure(model, args.turns, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
