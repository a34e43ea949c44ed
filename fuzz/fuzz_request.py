"""Atheris target over the request parser, the PEP's extraction and the plugins' request
hooks (fuzz/target.py). From the repository root:

    .venv/bin/python -m fuzz.fuzz_request var/fuzz-corpus fuzz/corpus/request -max_total_time=60

New inputs go to the first directory; fuzz/corpus/request is the checked-in seed corpus,
which tests/unit/test_fuzz_corpus.py runs as ordinary tests. A crasher is written to
./crash-<sha1>: copy it into fuzz/corpus/request so it stays a regression test.
"""

from __future__ import annotations

import sys

import atheris

# Only our code is instrumented: instrumenting every loaded module takes minutes.
with atheris.instrument_imports(include=["gateway", "plugins", "fuzz"]):
    from fuzz.target import check


def main() -> None:
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
