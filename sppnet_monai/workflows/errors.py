"""Turning user errors into one-line exits inside ``python -m monai.bundle run``."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from sppnet_monai.utils import SPPNetError

F = TypeVar("F", bound=Callable)


class BundleInputError(SystemExit):
    """A :class:`SPPNetError` met while a bundle config is parsed.

    MONAI's config parser wraps every ``Exception`` of an expression in a long traceback; a
    ``SystemExit`` passes through it, so the user sees one line naming the bad file or value.
    """


def exit_on_user_error(fn: F) -> F:
    """Run ``fn``; an :class:`SPPNetError` becomes ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SPPNetError as err:
            print(f"error: {err}", file=sys.stderr)
            raise BundleInputError(2) from err

    return wrapper  # type: ignore[return-value]
