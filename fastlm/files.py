"""Writing files so that a crash or a full disk never leaves a half-written one behind.

:func:`atomic_write` is the one way fastlm writes a file it may later read back:
to a temporary name in the same folder, flushed to disk, then renamed over the
target, so the target is always either the old file or the new one. Every
``OSError`` (a full disk above all) comes out naming the file being written.

:func:`fault_point` marks each write, for the kill-at-every-write test: with
``FASTLM_FAULT_AT=N`` in the environment (read once, at import), the process
exits with status 137 at the N-th write point, as if it had been killed there.
Without it a write point costs one comparison.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_FAULT_AT = int(os.environ["FASTLM_FAULT_AT"]) if os.environ.get("FASTLM_FAULT_AT") else None
_fault_count = 0


def fault_point(name: str, before_exit: Callable[[], object] | None = None) -> None:
    """A place where a kill could land (``name`` says which, for debugging); with ``FASTLM_FAULT_AT=N``,
    the N-th such place exits the process at once, after ``before_exit`` (a torn write, say)."""
    global _fault_count
    if _FAULT_AT is None:
        return
    _fault_count += 1
    if _fault_count == _FAULT_AT:
        if before_exit is not None:
            before_exit()
        os._exit(137)


def write_error(path: Path, e: BaseException) -> OSError:
    """An ``OSError`` that names ``path`` (and says when the disk is full), for one raised while writing it."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(e))):  # safetensors' I/O errors
        code = int(m.group(1))
    reason = "the disk is full" if code == errno.ENOSPC else (getattr(e, "strerror", None) or str(e))
    return OSError(code, f"cannot write {path}: {reason}")


@contextlib.contextmanager
def writing(path: Path, errors: type[BaseException] | tuple = OSError) -> Iterator[None]:
    """Turn ``errors`` (any ``OSError``, by default) raised inside into an ``OSError`` that names ``path``."""
    try:
        yield
    except errors as e:
        raise write_error(path, e) from e


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``content`` (bytes, text, or a function that writes a given path) to ``path`` atomically.

    The temporary file is ``.NAME.tmp-*`` next to ``path`` and is removed if anything fails.
    """
    path = Path(path)
    fault_point(f"write {path}")
    with writing(path):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    tmp = Path(tmp_name)
    try:
        with writing(path, Exception if callable(content) else OSError):  # the writer's own errors too
            if callable(content):
                os.close(fd)
                fd = None
                content(tmp)
                fd = os.open(tmp, os.O_RDONLY)
            else:
                view = memoryview(content.encode() if isinstance(content, str) else content)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_dir(path: Path) -> None:
    """Delete the folder ``path`` as one step, as far as readers can tell: it is first renamed to the hidden
    ``.NAME.del-PID`` (which a kill may leave behind, for the owner's next clean-up), then removed."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.del-{os.getpid()}")
    fault_point(f"remove {path}")
    os.rename(path, trash)
    shutil.rmtree(trash)
