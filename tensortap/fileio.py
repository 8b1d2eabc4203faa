"""Whole, durable file operations, shared by the segment writer and the frames to the writer process.
No h5py, no torch: the server imports this with writer=process too.

    write_all       every byte of a list of buffers, at the file position (writev) or at an offset
                    (pwritev), whatever a single call writes
    IoThread        a thread that does a write_all while its caller goes on
    rename_no_replace, fsync_dir, create_private_dir
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

_IOV_MAX = 512  # buffers per writev/pwritev call (Linux allows 1024)


def write_all(fd: int, pieces: list, offset: int | None = None) -> None:
    """Write every byte of `pieces` in order: at the file position, or from `offset` with pwritev. A call
    may write less than asked (a pipe, a signal, IOV_MAX): the rest goes in the next."""
    views = [memoryview(p).cast("B") for p in pieces]
    views = [v for v in views if v.nbytes]
    while views:
        chunk = views[:_IOV_MAX]
        done = os.writev(fd, chunk) if offset is None else os.pwritev(fd, chunk, offset)
        if offset is not None:
            offset += done
        while views and done >= views[0].nbytes:  # drop what was written whole
            done -= views[0].nbytes
            views.pop(0)
        if done:  # a piece written in part: its rest goes next
            views[0] = views[0][done:]


class IoThread:
    """A daemon thread that writes a batch's bytes (`start`) while the writer completes its metadata;
    `wait` returns when they are written, raising what the write raised. It exits after IDLE_S without
    work (a writer that is closed leaves no thread behind) and is started again by the next batch."""

    IDLE_S = 10.0

    def __init__(self):
        self._job = None
        self._error: BaseException | None = None
        self._ready = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._running = False

    def start(self, fd: int, pieces: list, offset: int) -> None:
        """Write `pieces` at file offset `offset` of `fd`, in this object's thread."""
        self._job, self._error = (fd, pieces, offset), None
        with self._lock:
            self._ready.release()
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="tensortap-segment-io", daemon=True).start()

    def wait(self) -> None:
        self._done.acquire()
        self._job = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            if not self._ready.acquire(timeout=self.IDLE_S):
                with self._lock:  # start() releases under this lock: no job can slip in unseen
                    if not self._ready.acquire(blocking=False):
                        self._running = False
                        return
            try:
                write_all(*self._job)
            except BaseException as exc:  # handed to wait(), in the writer's thread
                self._error = exc
            self._done.release()


def create_private_dir(path: str) -> None:
    """Create `path` (and parents) 0700; an existing directory is left as the user made it."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename in it), best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = None


def rename_no_replace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst` (renameat2 on Linux;
    elsewhere a check then a rename)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018  (absent before glibc 2.28)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, "segment exists", dst)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), src)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "segment exists", dst)
    os.rename(src, dst)
