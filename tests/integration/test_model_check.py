"""What the check before serving leaves in the process that goes on to serve."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests.support import python_output

pytestmark = pytest.mark.slow

# Check a model in a fresh process, as `tandem serve` does before loading it for good; print
# how much resident memory the check left. With "kept", glibc keeps what the check freed.
CHECKED = """
import sys
from pathlib import Path

import numpy, onnxruntime, PIL.Image  # imported before measuring: their code is no leftover
from tandem import heap
from tandem.runtime import classifier

def resident_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024

if sys.argv[2] == "kept":
    heap.give_back_free_memory = lambda: False
before = resident_mib()
classifier.check_model(Path(sys.argv[1]))
print(resident_mib() - before)
"""


def _left_mib(manifest: Path, mode: str) -> int:
    return int(python_output(CHECKED, str(manifest), mode, timeout=120))


# What a check may leave: handed back, 12 to 14 MB was left in every run seen; kept by glibc,
# 25 to 80 MB (25 once, in a clean-clone run: it had been the bound, which the control missed).
LEFT_AT_MOST_MIB = 20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_checking_a_model_before_serving_leaves_little_memory_behind(model_dir: Path) -> None:
    """Classifying the bundled photo in a session that is then dropped: glibc kept what it
    freed (25 to 80 MB for Lite2, by run), and the proxy served with it resident."""
    manifest = model_dir / "efficientnet_lite2" / "manifest.json"
    assert _left_mib(manifest, "kept") > LEFT_AT_MOST_MIB  # glibc alone breaks the bound
    assert _left_mib(manifest, "returned") < LEFT_AT_MOST_MIB
