"""The profile's reading of py-spy's collapsed stacks."""

from __future__ import annotations

from bench.profile import Stacks

RAW = """\
thread (101): MainThread;main (tandem/cli.py:10);serve (uvicorn/server.py:5);handle (a.py:3) 6
thread (101): MainThread;main (tandem/cli.py:10);serve (uvicorn/server.py:5) 4
thread (102): tandem-fast_0;run (threading.py:1);classify (service.py:7);decode (img.py:2) 3
thread (102): tandem-fast_0;run (threading.py:1);classify (service.py:9);onnx (c.py:4) 5
thread (102): tandem-fast_0;run (threading.py:1);fact (m.py:1);fact (m.py:2);fact (m.py:2) 2
not a stack line
"""


def test_samples_are_counted_per_thread_and_function_inclusively() -> None:
    stacks = Stacks.parse(RAW.splitlines())
    assert set(stacks.samples) == {"MainThread", "tandem-fast_0"}
    assert stacks.total("MainThread") == 10
    assert stacks.total("tandem-fast_0") == 10
    # Two lines of one function count once each; a recursion counts once per sample.
    assert stacks.samples["tandem-fast_0"]["classify (service.py)"] == 8
    assert stacks.samples["tandem-fast_0"]["fact (m.py)"] == 2


def test_the_top_frames_leave_out_what_every_sample_holds() -> None:
    stacks = Stacks.parse(RAW.splitlines())
    assert stacks.top("MainThread", 5) == [("handle (a.py)", 6)]
    assert stacks.top("tandem-fast_0", 2) == [("classify (service.py)", 8), ("onnx (c.py)", 5)]
