"""The one exception mlx_flash raises for bad input."""

import contextlib
import sys
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union


class FlashError(Exception):
    """Bad input or state a person can act on: what is wrong, where, and the fix.

    Args:
        message: what is wrong.
        path: the file or directory at fault, if any.
        fix: what the user should do about it.
    """

    def __init__(
        self,
        message: str,
        path: Optional[Union[str, Path]] = None,
        fix: Optional[str] = None,
    ):
        self.message = message
        self.path = None if path is None else Path(path)
        self.fix = fix
        text = f"{path}: {message}" if path is not None else message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class ReadError(FlashError):
    """A read of the bundles file failed (I/O error, or the file shrank under us).

    Args:
        offset: the first byte of the file that could not be read.
        layer, neurons: the layer and the [first, last] neuron ids being read, which
            the store adds when it knows them.
    """

    def __init__(
        self,
        message: str,
        path: Optional[Union[str, Path]] = None,
        fix: Optional[str] = None,
        offset: Optional[int] = None,
        layer: Optional[int] = None,
        neurons: Optional[Tuple[int, int]] = None,
    ):
        super().__init__(message, path, fix)
        self.offset, self.layer, self.neurons = offset, layer, neurons

    def within(self, what: str) -> "ReadError":
        """The same error, its message prefixed with what was being read ("tensor
        x", "layer 3, neurons 5-9")."""
        return ReadError(
            f"{what}: {self.message}",
            self.path,
            self.fix,
            self.offset,
            self.layer,
            self.neurons,
        )


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """A command's body: a FlashError ends the process with its message, status 2."""
    try:
        yield
    except FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
