"""
The one error a setting or a file the user named can raise: ``ConfigurationError``.

Whatever the OS or a library raises while a file is checked or read (a directory where a file
belongs, a FIFO that would block, no permission, a truncated protobuf, metadata that is not a
JSON object) becomes a ``ConfigurationError`` whose message names the file and the fix. The node
refuses a parameter with that message and keeps running; a command prints it as one line.
It is a ``ValueError``, so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

from contextlib import contextmanager
import os
from pathlib import Path
import stat
from typing import Iterator


class ConfigurationError(ValueError):
    """A setting, or a file it names, that cannot be used; the message says why."""


def readable_file(path: str | os.PathLike, what: str) -> Path:
    """
    Return ``path`` when it is a regular file this process can read; else say what it is.

    Checked before anything opens it: reading a FIFO or a device would block the caller (a
    parameter callback, so the whole node), and a directory raises IsADirectoryError.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigurationError(f'{what} {str(path)!r}: file not found') from None
    except OSError as error:
        raise ConfigurationError(f'{what} {str(path)!r}: cannot be read ({error.strerror})'
                                 ) from None
    if stat.S_ISDIR(mode):
        raise ConfigurationError(f'{what} {str(path)!r} is a directory: name a file in it')
    if not stat.S_ISREG(mode):
        raise ConfigurationError(f'{what} {str(path)!r} is not a regular file (a pipe, socket '
                                 'or device): name a file')
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f'{what} {str(path)!r}: permission denied: make it readable '
                                 'by the user the node runs as')
    return path


@contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn anything reading ``path`` raises into a ConfigurationError that names it."""
    try:
        yield
    except ConfigurationError:
        raise
    except (ValueError, RuntimeError) as error:  # ours, and require()'s: already in words
        raise ConfigurationError(str(error)) from error
    except PermissionError:
        raise ConfigurationError(f'{what} {os.fspath(path)!r}: permission denied: make it '
                                 'readable by the user the node runs as') from None
    except OSError as error:
        raise ConfigurationError(f'{what} {os.fspath(path)!r}: cannot be read '
                                 f'({error.strerror or error})') from None
    except Exception as error:  # noqa: B902 - parsers raise anything for a malformed file
        raise ConfigurationError(f'{what} {os.fspath(path)!r} is malformed: '
                                 f'{type(error).__name__}: {error}') from error
