"""Reading a `.tmp` segment whose writer was killed inside an HDF5 flush.

HDF5 writes a flush's metadata first and the superblock, which holds the file's end-of-allocation
address (EOA), last. A SIGKILL between the two leaves metadata that points past the stored EOA, and
HDF5 refuses every such address ("addr overflow"), so the record list cannot be read although the
bytes are on disk. `eoa_extended_view` gives h5py a read-only view of the file whose superblock
claims the file's real size as its EOA (its checksum recomputed): what the flush did write becomes
readable again. Superblock versions 2 and 3 only (tensortap writes version 2, libver v108):

    offset  0  signature (8)        12  base address (8)      28  end-of-file address (8)
            8  version (1)          20  extension address (8) 36  root object header (8)
            9  offset/length sizes  11  consistency flags      44  checksum: lookup3(bytes 0..43)
"""

from __future__ import annotations

import io
import os

SIGNATURE = b"\x89HDF\r\n\x1a\n"
EOA_OFFSET, CHECKSUM_OFFSET = 28, 44
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, the checksum of HDF5's metadata (H5_checksum_lookup3)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    i = 0
    while length - i > 12:
        a = (a + int.from_bytes(data[i:i + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[i + 4:i + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[i + 8:i + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK  # noqa: E702  (lookup3's mix)
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK  # noqa: E702
        i += 12
    tail = data[i:] + bytes(12 - (length - i))
    if length - i == 0:
        return c
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK  # noqa: E702  (lookup3's final)
    a ^= c; a = (a - _rot(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK  # noqa: E702
    return c


def superblock(head: bytes) -> tuple[int, bool] | None:
    """(stored EOA, checksum valid) of a version 2/3 superblock at the start of `head`, else None."""
    if len(head) < CHECKSUM_OFFSET + 4 or head[:8] != SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
        return None
    eoa = int.from_bytes(head[EOA_OFFSET:EOA_OFFSET + 8], "little")
    stored = int.from_bytes(head[CHECKSUM_OFFSET:CHECKSUM_OFFSET + 4], "little")
    return eoa, stored == lookup3(head[:CHECKSUM_OFFSET])


def with_eoa(head: bytes, eoa: int) -> bytes:
    """The superblock `head` (48 bytes) claiming `eoa`, its checksum recomputed."""
    body = head[:EOA_OFFSET] + eoa.to_bytes(8, "little") + head[EOA_OFFSET + 8:CHECKSUM_OFFSET]
    return body + lookup3(body).to_bytes(4, "little")


class ReadOnlyView(io.RawIOBase):
    """A read-only, seekable file object over a file descriptor it owns, `size` bytes long; a subclass
    says what `readinto` returns (h5py reads a segment through such a view)."""

    def __init__(self, fd: int, size: int):
        self._fd = fd
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _PatchedHead(ReadOnlyView):
    """The file as it is, except that its first bytes read as `head`."""

    def __init__(self, fd: int, head: bytes):
        super().__init__(fd, os.fstat(fd).st_size)
        self._head = head

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        got = os.preadv(self._fd, [view[:n]], self._pos) if n else 0
        if self._pos < len(self._head):  # the patched superblock over what the file holds
            k = min(len(self._head) - self._pos, got)
            view[:k] = self._head[self._pos:self._pos + k]
        self._pos += got
        return got


def eoa_extended_view(fd: int) -> io.RawIOBase | None:
    """A view of the file whose superblock claims the file's size as its EOA, or None when the
    superblock is not one this applies to (not v2/v3, a bad checksum, or it already covers the file).
    The view owns a duplicate of `fd`. Harmless on a healthy segment: metadata that points below the
    stored EOA reads the same, whatever the EOA claims."""
    head = os.pread(fd, CHECKSUM_OFFSET + 4, 0)
    found = superblock(head)
    size = os.fstat(fd).st_size
    if found is None or not found[1] or found[0] >= size:
        return None
    return _PatchedHead(os.dup(fd), with_eoa(head, size))
