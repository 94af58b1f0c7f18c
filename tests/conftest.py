"""Test set-up: without a GPU, run the real Triton kernels through Triton's interpreter.

``TRITON_INTERPRET`` must be set before any kernel is decorated, that is before
``kernels`` is imported, so it is set here at collection time.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import DEVICE, HAS_GPU  # noqa: E402 (imports kernels: only once TRITON_INTERPRET is set)

# Under pytest-xdist, share the cores among the workers: two workers each spinning up a thread
# per core oversubscribe a small machine and run the CPU-heavy tests many times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own fastlm token cache: none reads or writes the user's."""
    monkeypatch.setenv("FASTLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean Dynamo: its cache keeps 8 entries per code object (GPT.forward for every
    model a test compiled), and a fullgraph compile past that limit fails, so tests would depend on their order."""
    yield
    import sys

    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


@pytest.fixture
def lock_file(monkeypatch):
    """``lock_file(path)``: opening ``path`` fails as after ``chmod 000`` (which does not stop root, who may
    run the tests)."""
    locked = set()
    real_open = Path.open

    def open_unless_locked(self, *args, **kwargs):
        if self in locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_unless_locked)
    return locked.add
