"""Fixtures of the trainer's tests: a corpus to train on, a trained micro run to read."""

import pytest

from fastlm.cli import main
from helpers import MICRO, write_corpus


@pytest.fixture
def corpus(tmp_path):
    """A small text corpus (a folder of Python-like files) for the trainer's tests."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step micro run (checkpoints at steps 2 and 4), shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTLM_CACHE", str(tmp / "cache"))
        assert main(["train", "--data", str(corpus), "--out", str(tmp / "run"), *MICRO]) == 0
    return tmp / "run", corpus
