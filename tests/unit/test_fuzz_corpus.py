"""The fuzz target's checked-in corpus as ordinary tests: no input makes the parser, the
PEP or a plugin fail with anything but an OpenAI-shaped error (see fuzz/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.target import check

CORPUS = sorted((Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "request").iterdir())


def test_the_corpus_is_checked_in() -> None:
    assert len(CORPUS) >= 10


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_a_corpus_input_never_crashes_the_request_path(path: Path) -> None:
    check(path.read_bytes())
