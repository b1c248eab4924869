"""Coverage-guided fuzzing of the image decoder with atheris (libFuzzer).

Run by tests/unit/test_decode_fuzz.py with a bounded number of runs; by hand:
python tests/fuzz/decode_atheris.py CORPUS_DIR -runs=100000 -rss_limit_mb=0
Any exception other than one of our typed 4xx errors is a crash, and so is this process's
memory peaking over PEAK_LIMIT_MB.
"""

import sys

import atheris

with atheris.instrument_imports(include=["tandem"]):
    from tandem.errors import TandemError
    from tandem.runtime.imaging import ImageLimits, decode_image

LIMITS = ImageLimits(max_pixels=2_000_000, min_side=8)
# The peak of this process alone. libFuzzer's own -rss_limit_mb reads getrusage's maximum,
# which carries the peak of the process that started it across fork and exec: run from a
# test suite grown past the limit, it reported every input as out of memory.
PEAK_LIMIT_MB = 512


def peak_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_input(data: bytes) -> None:
    try:
        decode_image(data, LIMITS)
    except TandemError as error:
        if not 400 <= error.status < 500:
            raise
    if (peak := peak_mb()) > PEAK_LIMIT_MB:
        raise MemoryError(f"this process peaked at {peak} MB, over {PEAK_LIMIT_MB} MB")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
