"""Small files the config names (a fallback's body, TLS certificates), read at load time."""

from __future__ import annotations

import os
import stat

__all__ = ["FileProblem", "read_small_file"]


class FileProblem(ValueError):
    """The file cannot be used; the message names it and says why."""


def read_small_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them."""
    try:
        # Not blocking: a FIFO (or a device) must be refused, never waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise FileProblem(f"{path}: is not a regular file")
            data = b""
            while len(data) <= limit:
                chunk = os.read(fd, limit + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileProblem(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise FileProblem(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > limit:
        raise FileProblem(f"{path}: over {limit} bytes")
    return data
