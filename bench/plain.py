"""The pattern's fast path served the plain way: what `python -m bench.versus` measures Tandem
against. Run as `python -m bench.plain --port P --model-dir D --data DIR`.

It is written as the original's proxy is (a FastAPI app), with ONNX Runtime in place of
TensorFlow Serving and each library used as its documentation shows, with its defaults:
- `POST /predict` takes the original's JSON body (`image_data`, base64), declared as a
  pydantic model, on a plain `def` endpoint, which FastAPI runs on its thread pool;
- the standard library decodes the base64, Pillow opens and decodes the whole image;
- the image is prepared as the model's manifest says (short side resized, centre crop,
  normalised with numpy): the steps Tandem takes, on the whole decoded photo, where Tandem
  decodes at a reduced DCT scale and resamples the crop's region alone (bench.versus checks
  that both give the photo the same label);
- an InferenceSession with ONNX Runtime's default options runs the fast model;
- the job (its id and image) is stored in SQLite, in WAL mode with `synchronous=FULL`, through
  one connection behind a lock, and committed before the answer goes out: as durable as
  Tandem's, so that both do the same work for a request.
It answers `{"job_id": ..., "<fast model>": "<label>"}`, the original's body.
"""

from __future__ import annotations

import argparse
import base64
import io
import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from tandem.runtime.manifest import ModelManifest, resolve_manifest_path, verified_model

FAST = "efficientnet_lite0"
_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class PredictRequest(BaseModel):
    image_data: str


class Model:
    """The fast model in an InferenceSession with ONNX Runtime's defaults."""

    def __init__(self, model_dir: Path) -> None:
        manifest, path = verified_model(resolve_manifest_path(FAST, model_dir))
        self.manifest: ModelManifest = manifest
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = manifest.input_name or self.session.get_inputs()[0].name

    def tensor(self, image: Image.Image) -> npt.NDArray[np.float32]:
        """Short side to `resize_size`, centre crop to `size`, then ((x * scale) - mean) / std."""
        pre = self.manifest.preprocess
        short = pre.resize_size or pre.size
        width, height = image.size
        ratio = short / min(width, height)
        resized = image.resize(
            (round(width * ratio), round(height * ratio)), _RESAMPLING[pre.interpolation]
        )
        left = (resized.width - pre.size) // 2
        top = (resized.height - pre.size) // 2
        cropped = resized.crop((left, top, left + pre.size, top + pre.size))
        pixels = np.asarray(cropped, dtype=np.float32) * pre.scale
        normalised = (pixels - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
        return normalised.transpose(2, 0, 1)[np.newaxis].astype(np.float32)

    def label(self, image: Image.Image) -> str:
        scores = self.session.run(None, {self.input_name: self.tensor(image)})[0]
        return self.manifest.labels[int(np.argmax(scores[0]))]


class Jobs:
    """Jobs in SQLite, durable once `add` returns."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, image BLOB, fast TEXT)"
        )
        self._lock = threading.Lock()

    def add(self, job_id: str, image: bytes, fast: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO jobs VALUES (?, ?, ?)", (job_id, image, fast))


def create_app(model: Model, jobs: Jobs) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"health": "ok"}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, str]:
        data = base64.b64decode(request.image_data)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        label = model.label(image)
        job_id = uuid.uuid4().hex
        jobs.add(job_id, data, label)
        return {"job_id": job_id, FAST: label}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a directory for the jobs")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    app = create_app(Model(args.model_dir), Jobs(args.data / "jobs.db"))
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
