"""An ONNX Runtime image classifier described by a manifest."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

from tandem import heap
from tandem.errors import ConfigurationError, InvalidModelOutput, TandemError
from tandem.predictions import Prediction, Scored
from tandem.runtime.assets import sample_image_bytes
from tandem.runtime.imaging import ImageLimits, decode_image, to_tensor
from tandem.runtime.manifest import ModelManifest, resolve_manifest_path, verified_model
from tandem.runtime.placement import AFFINITIES, Placement
from tandem.runtime.priority import Preempted
from tandem.runtime.signature import signature


class Spin(Enum):
    """How ONNX Runtime's threads wait for work between a run's parallel steps and after it."""

    # Sleep at once: work that shares the cores with a faster path (the accurate model).
    NEVER = "never"
    # Spin between a run's steps, sleep once it returns. A model that must answer fast: the
    # spinning keeps its steps quick, and the cores are free for the work between calls
    # (the next request's decoding, storing its job).
    IN_RUN = "in_run"
    # ONNX Runtime's default: also spin for a while after a run returns.
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class ThreadPlan:
    """How a classifier's runs use the CPUs.

    `threads`: ONNX Runtime threads per call (0: its default, one per core). With `solo`
    above it, a second session with `solo` threads serves the calls made with `solo=True`
    (see Occupancy): one request alone gets every core, and requests side by side share the
    cores out instead of oversubscribing them. With `pin_solo`, a solo call's threads each
    run on a CPU of their own (see placement)."""

    threads: int = 0
    spin: Spin = Spin.IN_RUN
    solo: int = 0
    pin_solo: bool = False

    @property
    def has_solo(self) -> bool:
        return 0 < self.threads < self.solo


class Classifier:
    """Owns the model's InferenceSessions, opened as `plan` says. `predict` is thread-safe
    and blocking: call it off the loop."""

    def __init__(
        self, manifest: ModelManifest, model_path: Path, plan: ThreadPlan = ThreadPlan()
    ) -> None:
        self.manifest = manifest
        self._session = open_session(model_path, plan.threads, plan.spin)
        self._placement = (
            Placement.for_threads(plan.solo) if plan.has_solo and plan.pin_solo else None
        )
        self._solo = (
            open_session(model_path, plan.solo, plan.spin, self._placement)
            if plan.has_solo
            else None
        )
        self._graph = signature(manifest, self._session)
        self._keep = np.array(
            [i for i in range(len(manifest.labels)) if i != manifest.output.background_index]
        )

    @classmethod
    def from_manifest(cls, manifest_path: Path, plan: ThreadPlan = ThreadPlan()) -> Classifier:
        manifest, model_path = verified_model(manifest_path)
        return cls(manifest, model_path, plan)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def decode_side(self) -> int:
        """Pass to decode_image as `min_side`: the short side this model's input needs."""
        return self.manifest.preprocess.decode_side

    def tensor(self, image: Image.Image) -> npt.NDArray[np.float32]:
        return to_tensor(image, self.manifest.preprocess)

    def predict(
        self,
        images: Sequence[Image.Image],
        k: int,
        *,
        solo: bool = False,
        run_options: ort.RunOptions | None = None,
    ) -> list[Prediction]:
        """Classify decoded RGB images in one batch."""
        batch = np.stack([self.tensor(image) for image in images])
        return self.predict_tensors(batch, k, solo=solo, run_options=run_options)

    def raw_scores(
        self,
        batch: npt.NDArray[np.float32],
        *,
        solo: bool = False,
        run_options: ort.RunOptions | None = None,
    ) -> npt.NDArray[np.float32]:
        """The model's first output for a prepared batch, untouched: in runs of the batch size
        the graph fixes, if it fixes one (an export without dynamic axes), the last padded."""
        size = self._graph.batch
        if size is None or len(batch) == size:
            return self._run(batch, solo, run_options)
        runs = []
        for start in range(0, len(batch), size):
            part = batch[start : start + size]
            runs.append(self._run(_padded(part, size), solo, run_options)[: len(part)])
        return np.concatenate(runs)

    def _run(
        self, batch: npt.NDArray[np.float32], solo: bool, run_options: ort.RunOptions | None
    ) -> npt.NDArray[np.float32]:
        session = self._session
        placed: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if solo and self._solo is not None:
            session = self._solo
            if self._placement is not None:
                placed = self._placement.caller_pinned()
        try:
            with placed:
                graph = self._graph
                given = batch.astype(graph.element, copy=False)
                outputs = session.run([graph.output], {graph.input: given}, run_options)
        except Exception as exc:  # ORT's errors are untyped: the flag tells a preemption apart
            if run_options is not None and run_options.terminate:
                raise Preempted from exc
            raise
        # One row of scores an image, whatever dimensions the graph holds them in.
        scores: npt.NDArray[np.float32] = np.asarray(outputs[0], dtype=np.float32)
        return scores.reshape(len(batch), -1)

    def predict_tensors(
        self,
        batch: npt.NDArray[np.float32],
        k: int,
        *,
        solo: bool = False,
        run_options: ort.RunOptions | None = None,
    ) -> list[Prediction]:
        """Classify a prepared batch. With `run_options` the run may be preempted (see
        Occupancy): then it raises Preempted. InvalidModelOutput if any image's scores are
        not finite."""
        started = time.perf_counter()
        scores = self.raw_scores(batch, solo=solo, run_options=run_options)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        probabilities = self._probabilities(scores)
        return [self._top_k(row, k, elapsed_ms) for row in probabilities]

    def _probabilities(self, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        scores = scores[:, self._keep]
        if self.manifest.output.kind == "probabilities":
            normalised: npt.NDArray[np.float32] = scores / scores.sum(axis=1, keepdims=True)
            return normalised
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        softmax: npt.NDArray[np.float32] = shifted / shifted.sum(axis=1, keepdims=True)
        return softmax

    def _top_k(self, row: npt.NDArray[np.float32], k: int, elapsed_ms: float) -> Prediction:
        if not np.isfinite(row).all():  # NaN sorts anywhere, and JSON has no place for it
            raise InvalidModelOutput(self.name)
        best = np.argsort(-row, kind="stable")[:k]
        labels = self.manifest.labels
        top = tuple(Scored(int(self._keep[i]), labels[self._keep[i]], float(row[i])) for i in best)
        return Prediction(self.name, top, elapsed_ms)


def _padded(part: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """`part` with images of zeros after it, to `size` images."""
    if len(part) == size:
        return part
    filler = np.zeros((size - len(part), *part.shape[1:]), dtype=part.dtype)
    return np.concatenate([part, filler])


def load_classifier(ref: str, model_dir: Path, plan: ThreadPlan = ThreadPlan()) -> Classifier:
    """Load a model named in settings: a built-in name, a model directory or a manifest path."""
    return Classifier.from_manifest(resolve_manifest_path(ref, model_dir), plan)


def check_model(manifest_path: Path) -> None:
    """Load the model and classify the bundled photo with it, keeping nothing: `tandem serve`
    and `tandem worker` say a model they cannot run in one line, before a request or a job
    meets it (a worker had failed every job it claimed)."""
    try:
        _classify_sample(manifest_path)
    finally:
        # What the check freed, handed back before the server loads the model for good: glibc
        # kept it, and a proxy's resident memory had started 33 to 50 MB higher.
        heap.give_back_free_memory()


def _classify_sample(manifest_path: Path) -> None:
    classifier = Classifier.from_manifest(manifest_path, ThreadPlan(1, Spin.NEVER))
    with tried_on_the_sample_photo(classifier.name):
        image = decode_image(sample_image_bytes(), ImageLimits(), classifier.decode_side)
        classifier.predict([image], 1)


@contextlib.contextmanager
def tried_on_the_sample_photo(model: str) -> Iterator[None]:
    """Around a model's run on the bundled photo before it serves: a graph whose checks all
    passed may still fail every run (a side its input leaves free but a layer fixes) or give
    scores that are not finite. Either refuses the model (ConfigurationError)."""
    try:
        yield
    except InvalidModelOutput as exc:
        raise ConfigurationError(f"{exc} on the bundled sample photo") from exc
    except TandemError:
        raise
    except Exception as exc:  # ONNX Runtime's errors are untyped
        raise ConfigurationError(
            f"model {model} cannot classify the bundled sample photo: {str(exc).strip()}"
        ) from exc


def open_session(
    model_path: Path,
    threads: int,
    spin: Spin,
    placement: Placement | None = None,
    *,
    optimized: bool = True,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if placement is not None:
        options.add_session_config_entry(AFFINITIES, placement.affinities)
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if spin is Spin.NEVER:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin is Spin.IN_RUN:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for bad files
        raise ConfigurationError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
