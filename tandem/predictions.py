"""A model's answer: the value that flows from the runtime into jobs and out through the API."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Scored:
    """One class with its probability; `index` is the model's output index."""

    index: int
    label: str
    probability: float


@dataclass(frozen=True, slots=True)
class Prediction:
    model: str
    top_k: tuple[Scored, ...]
    inference_ms: float

    @property
    def label(self) -> str:
        return self.top_k[0].label

    @property
    def probability(self) -> float:
        return self.top_k[0].probability

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prediction:
        top = tuple(
            Scored(int(t["index"]), str(t["label"]), float(t["probability"])) for t in data["top_k"]
        )
        return cls(str(data["model"]), top, float(data["inference_ms"]))
