"""A batch's runs stopped from another thread: the worker's job timeout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tandem.runtime.abort import Aborted, RunAbort
from tandem.runtime.classifier import Classifier
from tandem.runtime.priority import Preempted
from tests.support import TinySpec, tiny_model

RED = Image.new("RGB", (8, 8), (255, 0, 0))


@pytest.fixture
def classifier(tmp_path: Path) -> Classifier:
    return Classifier.from_manifest(tiny_model(tmp_path, TinySpec(name="tiny", size=8)))


def _run(
    classifier: Classifier,
    runs: RunAbort,
    options: ort.RunOptions | None = None,
    *,
    abort: bool = False,
) -> str:
    """One real ONNX Runtime run, watched by `runs`; `abort` it from inside first."""
    with runs.watching(options) as watched:
        if abort:
            runs.abort()
        batch = classifier.tensor(RED)[np.newaxis]
        return classifier.predict_tensors(batch, 1, run_options=watched)[0].label


def test_abort_stops_the_run_in_progress_and_refuses_later_ones(classifier: Classifier) -> None:
    runs = RunAbort()
    assert _run(classifier, runs) == "class 1"
    with pytest.raises(Aborted):
        _run(classifier, runs, abort=True)  # terminated: ONNX Runtime stops the run
    with pytest.raises(Aborted):
        _run(classifier, runs)


def test_a_preemption_of_a_batch_not_aborted_stays_a_preemption(classifier: Classifier) -> None:
    preempted = ort.RunOptions()
    preempted.terminate = True  # as a fast call does (see Occupancy)
    runs = RunAbort()
    with pytest.raises(Preempted):
        _run(classifier, runs, preempted)
    assert _run(classifier, runs) == "class 1"  # the batch goes on
