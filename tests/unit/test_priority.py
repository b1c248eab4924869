"""The fast path first: the embedded worker waits for quiet, and a fast call preempts its runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tandem.runtime.classifier import Classifier
from tandem.runtime.priority import GiveWay, Occupancy, Preempted
from tests.support import TinySpec, fast_call_in_flight, tiny_model

RED = Image.new("RGB", (8, 8), (255, 0, 0))


def test_occupancy_says_alone_only_while_no_other_call_is_inside() -> None:
    calls = Occupancy()
    with calls.held() as alone:
        assert alone()
        with fast_call_in_flight(calls) as leave:
            assert not alone()
            leave.set()
        assert alone()


def test_quiet_comes_only_after_the_last_call_left_and_the_quiet_time_passed() -> None:
    calls = Occupancy()
    assert calls.wait_quiet(0.0, timeout_s=0.0)
    with fast_call_in_flight(calls) as leave:
        assert not calls.wait_quiet(0.0, timeout_s=0.05)
        threading.Timer(0.05, leave.set).start()
        started = time.monotonic()
        assert calls.wait_quiet(0.1, timeout_s=10)
        assert time.monotonic() - started >= 0.15


def test_a_call_that_starts_terminates_preemptible_runs() -> None:
    calls = Occupancy()
    with calls.preemptible() as options:
        assert not options.terminate
        with calls.held():
            assert options.terminate
    with calls.preemptible() as later:  # a finished preemptible is no longer touched
        assert not later.terminate


def test_a_run_begun_while_a_call_is_in_flight_is_preempted_at_once() -> None:
    calls = Occupancy()
    with fast_call_in_flight(calls), calls.preemptible() as options:
        assert options.terminate


def test_onnx_runtime_stops_a_preempted_run(tmp_path: Path) -> None:
    classifier = Classifier.from_manifest(tiny_model(tmp_path, TinySpec(name="tiny", size=8)))
    batch = classifier.tensor(RED)[np.newaxis]
    stopped = ort.RunOptions()
    stopped.terminate = True
    with pytest.raises(Preempted):
        classifier.predict_tensors(batch, 1, run_options=stopped)
    assert classifier.predict_tensors(batch, 1, run_options=ort.RunOptions())[0].label == "class 1"


def test_giving_way_retries_a_preempted_step_at_the_next_quiet_moment() -> None:
    calls = Occupancy()
    seen: list[bool] = []

    def step(options: ort.RunOptions | None) -> str:
        seen.append(options is None)
        if len(seen) == 1:
            with calls.held():  # a fast call arrives mid-run
                assert options is not None
                assert options.terminate
            raise Preempted
        return "done"

    assert GiveWay(calls, quiet_s=0.0, patience_s=10).run(step) == "done"
    assert seen == [False, False]


def test_giving_way_runs_the_step_anyway_once_patience_is_spent() -> None:
    calls = Occupancy()
    with fast_call_in_flight(calls):
        started = time.monotonic()
        options = GiveWay(calls, quiet_s=0.0, patience_s=0.1).run(lambda options: options)
        assert options is None  # not preemptible: it runs beside the fast call
        assert time.monotonic() - started >= 0.1
