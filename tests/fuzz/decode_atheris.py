"""Coverage-guided fuzzing of the image decoder with atheris (libFuzzer).

Run by tests/unit/test_decode_fuzz.py with a bounded number of runs and libFuzzer's RSS limit;
by hand: python tests/fuzz/decode_atheris.py CORPUS_DIR -runs=100000 -rss_limit_mb=512
Any exception other than one of our typed 4xx errors is a crash.
"""

import sys

import atheris

with atheris.instrument_imports(include=["tandem"]):
    from tandem.errors import TandemError
    from tandem.runtime.imaging import ImageLimits, decode_image

LIMITS = ImageLimits(max_pixels=2_000_000, min_side=8)


def one_input(data: bytes) -> None:
    try:
        decode_image(data, LIMITS)
    except TandemError as error:
        if not 400 <= error.status < 500:
            raise


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
