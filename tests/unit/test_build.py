"""`tandem models build` checks each export against the reference's logits, all or nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tandem.errors import ConfigurationError
from tandem.runtime import build
from tandem.runtime.manifest import MANIFEST_NAME


def test_a_build_checks_itself_against_the_reference(tmp_path: Path) -> None:
    lines: list[str] = []
    manifest = build.build_model("efficientnet_lite0", tmp_path, progress=lines.append)
    assert manifest == tmp_path / "efficientnet_lite0" / MANIFEST_NAME
    assert "checking ONNX Runtime against the reference logits" in lines[-2]
    assert "max |logit diff| " in lines[-1]


def test_an_export_off_the_reference_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = build.BUILTIN_MODELS["efficientnet_lite0"]
    (index, value), *rest = spec.reference_logits
    off = dataclasses.replace(spec, reference_logits=((index, value + 0.01), *rest))
    monkeypatch.setitem(build.BUILTIN_MODELS, "efficientnet_lite0", off)
    with pytest.raises(ConfigurationError, match="differs from PyTorch's by"):
        build.build_model("efficientnet_lite0", tmp_path, progress=lambda _line: None)
    assert list(tmp_path.iterdir()) == []
