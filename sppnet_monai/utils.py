"""Small shared helpers: the project's user-facing error and atomic file output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional


class SPPNetError(ValueError):
    """An error caused by user input (a file, a value, a checkpoint, a click).

    Library code raises it; only the entry points turn it into something else: the CLI and the
    bundle's run print its message as one line and exit with status 2 (the CLI: ``exit_status``), the
    MONAI Label app answers HTTP 400. It is a :class:`ValueError`, so code that validates arguments may
    raise it directly.
    """

    exit_status: int = 2


def without_folders(message: str, path: str | os.PathLike) -> str:
    """``message`` with ``path``'s folders removed (its file name stays): a server's answer names files, not
    where the server keeps them."""
    folder = os.path.dirname(os.fspath(path))
    return message.replace(folder + os.sep, "") if folder else message


def user_error(err: BaseException) -> Optional[SPPNetError]:
    """The :class:`SPPNetError` behind ``err`` (itself, or one in its cause/context chain), or None.

    MONAI wraps errors of config expressions and transforms in ``RuntimeError`` chains; the entry
    points look through them for the user's mistake.
    """
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, SPPNetError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def root_message(err: BaseException) -> str:
    """The innermost cause's message, one line: MONAI wraps transform errors in long 'applying transform' chains."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an exception never leaves a half-written ``path`` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it private (0600); give it the mode a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
