"""The cascade over every real photo that scikit-image ships: for several thresholds, the share
of requests `when_unsure` sends to the accurate model, and how often its final answer equals the
`always` policy's (the accurate answer).

    python -m bench.cascade [--model-dir DIR] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import skimage

from tandem.cascade import Gate, Policy
from tandem.predictions import Prediction
from tandem.runtime.classifier import Classifier, load_classifier
from tandem.runtime.imaging import ImageLimits, decode_image
from tandem.settings import load_settings

# The photographs among skimage's data files; drawings, test patterns and silhouettes are left
# out (chessboard, color, horse, logo, phantom, the multipage TIFFs, the GIF).
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True, slots=True)
class Pair:
    photo: str
    fast: Prediction
    accurate: Prediction


def photo_dir() -> Path:
    return Path(skimage.__file__).parent / "data"


def classify_all(model_dir: Path, fast_ref: str, accurate_ref: str) -> list[Pair]:
    fast = load_classifier(fast_ref, model_dir)
    accurate = load_classifier(accurate_ref, model_dir)
    pairs = []
    for photo in PHOTOS:
        data = (photo_dir() / photo).read_bytes()
        pairs.append(Pair(photo, classify(fast, data), classify(accurate, data)))
    return pairs


def classify(classifier: Classifier, data: bytes) -> Prediction:
    """As the service does: decode at about the model's size, then the top-5."""
    image = decode_image(data, ImageLimits(), classifier.decode_side)
    return classifier.predict([image], 5)[0]


def table(pairs: list[Pair]) -> list[dict[str, float]]:
    rows = []
    for threshold in THRESHOLDS:
        gate = Gate(Policy.WHEN_UNSURE, threshold)
        sent = [p for p in pairs if gate.skip_reason(p.fast) is None]
        finals = [p.accurate if p in sent else p.fast for p in pairs]
        matched = sum(f.label == p.accurate.label for f, p in zip(finals, pairs, strict=True))
        rows.append(
            {
                "threshold": threshold,
                "sent_share": len(sent) / len(pairs),
                "final_agreement": matched / len(pairs),
            }
        )
    return rows


def markdown(pairs: list[Pair], rows: list[dict[str, float]]) -> str:
    agree = sum(p.fast.label == p.accurate.label for p in pairs)
    lines = [
        f"{len(pairs)} photos; the two models agree on top-1 for {agree} of them.",
        "",
        "| threshold | sent to the accurate model | final answer = `always` answer |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {r['threshold']:.2f} | {r['sent_share']:.0%} | {r['final_agreement']:.0%} |"
        for r in rows
    ]
    lines += ["", "| photo | fast top-1 (p) | accurate top-1 (p) |", "|---|---|---|"]
    lines += [
        f"| {p.photo} | {p.fast.label} ({p.fast.probability:.2f})"
        f" | {p.accurate.label} ({p.accurate.probability:.2f}) |"
        for p in pairs
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    settings = load_settings({}, model_dir=args.model_dir)
    pairs = classify_all(settings.model_dir, settings.fast_model, settings.accurate_model)
    rows = table(pairs)
    text = markdown(pairs, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cascade.md").write_text(text + "\n")
    (args.out / "cascade.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
