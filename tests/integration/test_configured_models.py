"""Any ONNX classifier by configuration: the original's TF Hub pair expressed as manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.support import ServerProcess, TinySpec, b64, clean_env, encode, tiny_model, wait_for_job

pytestmark = pytest.mark.slow

# TF Hub's MobileNet v2 / Inception v3: 1001 outputs with index 0 = background, NHWC input,
# the whole image resized bilinearly to the square (no crop), pixels scaled to [0, 1].
TF_HUB = {"resize": "stretch", "interpolation": "bilinear", "scale": 1 / 255}
RED, BLUE = 1, 3  # the tiny models' classes for a mostly red and a mostly blue image


def red_sides_blue_middle() -> bytes:
    """Stretched whole, this is mostly red; its centre square is all blue."""
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    image.paste((0, 0, 255), (150, 0, 250, 100))
    return encode(image, "PNG")


@pytest.fixture(scope="module")
def tf_hub_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfhub")
    common = {"layout": "NHWC", "classes": 1001, "background_index": 0, "preprocess": TF_HUB}
    fast = tiny_model(root / "mobilenet_v2", TinySpec(name="mobilenet_v2", size=224, **common))
    slow = tiny_model(root / "inception_v3", TinySpec(name="inception_v3", size=299, **common))
    config = root / "tandem.toml"
    config.write_text(
        f'[tandem]\nfast_model = "{fast}"\naccurate_model = "{slow.parent}"\n', "utf-8"
    )
    return config


def test_the_tf_hub_pair_is_served_from_a_config_file(tf_hub_pair: Path, tmp_path: Path) -> None:
    env = clean_env(data_dir=str(tmp_path), model_dir=str(tmp_path / "unused"))
    server = ServerProcess(tmp_path / "server.log", env, "--config", str(tf_hub_pair)).start()
    try:
        with server.client() as client:
            assert client.get("/health/all").json() == {
                "mobilenet_v2": "ok",
                "inception_v3": "ok",
                "queue": "ok",
            }
            response = client.post("/predict", json={"image_data": b64(red_sides_blue_middle())})
            body = response.json()
            job = wait_for_job(client, body["job_id"])
            metadata = client.get("/metadata").json()
    finally:
        server.stop()
    # The background output has a huge logit in these models; it must never be reported.
    assert body["mobilenet_v2"] == f"class {RED}"
    assert all(item["label"] != "background" for item in body["fast"]["top_k"])
    assert body["fast"]["top_k"][0]["index"] == RED
    assert job["accurate"]["label"] == f"class {RED}"
    assert metadata["prediction_structure"] == "(1,1001)"
    assert metadata["models"]["fast"]["layout"] == "NHWC"


def test_a_centre_crop_model_sees_only_the_middle(tmp_path: Path) -> None:
    crop = {"resize": "short_side_center_crop", "resize_size": 32}
    fast = tiny_model(tmp_path / "crop", TinySpec(name="crop", size=32, preprocess=crop))
    env = clean_env(
        data_dir=str(tmp_path),
        model_dir=str(tmp_path),
        fast_model=str(fast),
        accurate_model=str(fast),
    )
    server = ServerProcess(tmp_path / "server.log", env).start()
    try:
        with server.client() as client:
            body = client.post("/predict", json={"image_data": b64(red_sides_blue_middle())}).json()
    finally:
        server.stop()
    assert body["crop"] == f"class {BLUE}"


def test_a_missing_model_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    env = clean_env(data_dir=str(tmp_path), model_dir=str(tmp_path), fast_model="./nowhere")
    server = ServerProcess(tmp_path / "server.log", env, "--no-worker")
    with pytest.raises(RuntimeError, match="nowhere"):
        server.start(timeout=30)
