"""The fast model's threads: a call alone gets every core, calls side by side share them."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tandem.runtime.classifier import Classifier
from tests.support import TinySpec, record_runs, tiny_model

RED = Image.new("RGB", (8, 8), (255, 0, 0))


def test_solo_calls_run_on_the_session_with_more_threads(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    classifier = Classifier.from_manifest(manifest, threads=1, solo_threads=2)
    runs: list[str] = []
    record_runs(classifier._solo, "solo", runs)
    record_runs(classifier._session, "shared", runs)
    alone = classifier.predict([RED], 1, solo=True)[0]
    beside = classifier.predict([RED], 1)[0]
    assert runs == ["solo", "shared"]
    assert alone.label == beside.label == classifier.manifest.labels[1]  # red votes for 1


def test_without_more_solo_threads_there_is_one_session(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    assert Classifier.from_manifest(manifest, threads=2, solo_threads=2)._solo is None
    assert Classifier.from_manifest(manifest, threads=0, solo_threads=2)._solo is None
    single = Classifier.from_manifest(manifest, threads=1)
    assert single.predict([RED], 1, solo=True)[0].label == single.manifest.labels[1]
