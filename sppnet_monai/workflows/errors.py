"""The bundle's entry point for user errors: one line instead of MONAI's nested traceback."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Optional, Type

from sppnet_monai.utils import user_error

__all__ = ["report_user_errors"]

USER_ERROR_EXIT_STATUS = 2


def report_user_errors() -> None:
    """Make an uncaught :class:`~sppnet_monai.utils.SPPNetError` end the process with one line.

    ``python -m monai.bundle run`` is MONAI's entry point, not ours: the only place a bundle can
    act on an error that reaches the top of the process is ``sys.excepthook``. The bundle configs
    call this first in ``initialize``; it does nothing unless the process runs ``python -m monai.bundle``
    (``torchrun -m monai.bundle`` too). Library functions keep raising; in-process callers
    (``ConfigWorkflow``, MONAI Label) get the exception, and any other exception keeps its traceback.
    """
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is None or not main.name.startswith("monai.bundle"):
        return  # in-process workflows (tests, the MONAI Label server) keep their own error handling
    previous = sys.excepthook
    if getattr(previous, "_sppnet_user_errors", False):
        return

    def hook(exc_type: Type[BaseException], exc: BaseException, tb: Optional[TracebackType]) -> None:
        err = user_error(exc)
        if err is None:
            previous(exc_type, exc, tb)
            return
        print(f"error: {err}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # The hook runs as the interpreter shuts down; raising SystemExit here would only print
        # "Error in sys.excepthook", so the status is set directly.
        import os

        os._exit(USER_ERROR_EXIT_STATUS)

    hook._sppnet_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
