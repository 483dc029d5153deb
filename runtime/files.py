"""The one write path: every file a program writes is made under a temporary name beside its
final one and renamed into place, so that a reader sees the old file or the new one, never half
of one. A write that fails on the disk (full, over quota, read-only, an I/O error) becomes a
WriteFailed naming the file, and leaves nothing behind.
"""

import errno
import io
import os
import tempfile
from contextlib import contextmanager

import imageio.v2 as imageio

from runtime import RunError

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


class WriteFailed(RunError):
    """A file could not be written; the message names it and the reason."""

    def __init__(self, path, reason):
        super().__init__(f'could not write {path} ({reason})')
        self.path, self.reason = path, reason


def write_failed(path, error):
    return WriteFailed(path, error.strerror or str(error))


def partial_name(path):
    stem, extension = os.path.splitext(path)
    return f'{stem}.partial{extension}'


@contextmanager
def replaced_atomically(path):
    """Yields a temporary name beside `path` to write; it becomes `path` once the block ends,
    and is removed if the block fails."""
    partial = partial_name(path)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as error:
        if os.path.lexists(partial):
            os.remove(partial)
        if isinstance(error, OSError) and not isinstance(error, RunError):
            raise write_failed(path, error) from None
        raise


def write_bytes(path, data):
    with replaced_atomically(path) as partial, open(partial, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a full disk shows here, not later at close


def create_exclusive(path, data):
    """Create the file `path` holding `data`; FileExistsError if it exists. A write that fails
    removes the half-written file, so that nothing is left claiming to be complete."""
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(descriptor, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as error:
        os.remove(path)
        if isinstance(error, OSError):
            raise write_failed(path, error) from None
        raise


def write_text(path, text):
    write_bytes(path, text.encode('utf-8'))


def write_image(path, array):
    """uint8 (H, W) or (H, W, 3) as a PNG, encoded in memory first."""
    buffer = io.BytesIO()
    imageio.imwrite(buffer, array, format='png')
    write_bytes(path, buffer.getvalue())


def append_line(path, line):
    """Add `line` to the end of a text file; a failed write is cut off again, so the file never
    ends in half a line. (No fsync: a monitor line is written every few iterations, and a full
    local disk already fails the write itself.)"""
    try:
        with open(path, 'ab') as f:
            size = f.tell()
            try:
                f.write(line.encode('utf-8') + b'\n')
                f.flush()
            except OSError:
                f.truncate(size)
                raise
    except OSError as error:
        raise write_failed(path, error) from None


def make_writable_folder(path, flag=None):
    """Create the folder `path` if need be and make sure a file can be made in it, before any
    work; a RunError naming it (and the flag that gave it) otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        named = f'{flag} {path}' if flag else path
        raise RunError(f'{named} is not a writable folder ({error.strerror})') from None
