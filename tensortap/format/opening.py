"""Opening a file that may be anything: only a regular file, read-only, as a tensortap segment of a
version this reader knows (validate.py checks what is inside)."""

from __future__ import annotations

import os
import stat

import h5py
import numpy as np

from tensortap.errors import FormatError
from tensortap.format import recover, schema
from tensortap.format.validate import NOT_A_DUMP_FIX, check_links, read_attr

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


def open_regular(path: str) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file. O_NONBLOCK: opening a
    FIFO returns at once instead of waiting for a writer; the kind is then read from the descriptor
    itself (fstat), so a name swapped after a check cannot slip a FIFO in."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # FileNotFoundError is the caller's to handle (a live rename)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise FormatError(path, f"is {kind}, not a regular file; refusing to open it", NOT_A_DUMP_FIX)
    return fd


def open_file(path: str) -> h5py.File:
    """Open read-only and check the root is a tensortap dump of a version this reader knows.

    Raises FileNotFoundError when `path` is gone (a writer renamed it): the caller re-finds it."""
    fd = open_regular(path)
    try:
        try:
            if path.endswith(schema.TMP_SUFFIX):
                # HDF5 shares one open file per inode within a process: a `.tmp` opened while its writer
                # was still at it would hand its stale metadata to a later open of the committed file.
                # Read through a file object instead (its own HDF5 file, never shared).
                # A writer killed inside a flush leaves metadata past the superblock's EOA, which is
                # written last: read such a file with its EOA extended to its size (recover.py).
                view = recover.eoa_extended_view(fd)
                f = h5py.File(view if view is not None else os.fdopen(os.dup(fd), "rb"), "r")
            else:
                by_fd = f"/proc/self/fd/{fd}"
                f = h5py.File(by_fd if os.path.exists(by_fd) else path, "r", locking=False)  # the file checked above
        except (OSError, ValueError) as exc:
            f = _open_short_tmp(path, fd, exc)
            if f is None:
                reason = str(exc).split("(")[0].strip().rstrip(",") or type(exc).__name__
                raise FormatError(path, f"not a readable HDF5 file ({reason})", NOT_A_DUMP_FIX) from None
    finally:
        os.close(fd)
    try:
        version = read_attr(path, f, "tensortap_format", 64, file_size(f))
        if isinstance(version, np.generic):
            version = version.item()
        if version is None:
            raise FormatError(path, "not a tensortap dump (no 'tensortap_format' attribute)", NOT_A_DUMP_FIX)
        if not isinstance(version, int) or version not in schema.SUPPORTED_VERSIONS:
            raise FormatError(
                path,
                f"tensortap format version {version!r} is not one this reader knows "
                f"({', '.join(map(str, schema.SUPPORTED_VERSIONS))})",
                "upgrade tensortap to read it",
            )
        check_links(path, f)
        return f
    except FormatError:
        f.close()
        raise
    except Exception as exc:  # h5py raises many types on corrupted structures
        f.close()
        raise FormatError(path, f"corrupted HDF5 structure ({type(exc).__name__}: {exc})", NOT_A_DUMP_FIX) from None


def file_size(f: h5py.File) -> int:
    """Bytes the open file holds now (a live segment grows)."""
    try:
        return os.fstat(f.id.get_vfd_handle()).st_size
    except Exception:  # a file-object driver (the zero-padded view): HDF5's own end of file
        return f.id.get_filesize()


class _ZeroPadded(recover.ReadOnlyView):
    """A read-only view of a file that reads as zeros past its end, up to `size` bytes."""

    def __init__(self, fd: int, size: int):
        self._real = os.fstat(fd).st_size
        super().__init__(os.dup(fd), max(size, self._real))

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        real = max(0, min(n, self._real - self._pos))
        if real:
            got = os.preadv(self._fd, [view[:real]], self._pos)
            view[got:real] = bytes(real - got)
        view[real:n] = bytes(n - real)
        self._pos += n
        return n


def _open_short_tmp(path: str, fd: int, error: Exception) -> h5py.File | None:
    """A `.tmp` segment whose writer failed mid-flush may claim more bytes than it holds: read it zero-padded."""
    if not path.endswith(schema.TMP_SUFFIX) or "truncated file" not in str(error):
        return None
    try:
        head = os.pread(fd, 36, 0)
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3):
            return None
        stored_eof = int.from_bytes(head[28:36], "little")  # superblock v2/v3: end-of-file address
        if stored_eof > os.fstat(fd).st_size + schema.MAX_RECORD_BYTES:
            return None
        return h5py.File(_ZeroPadded(fd, stored_eof), "r")
    except Exception:
        return None
