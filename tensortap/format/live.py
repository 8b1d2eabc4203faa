"""Segments whose writer may still be running: their current name, and whether their writer lives.

A writer creates `<name>.tap.h5.tmp`, flushes it after every batch and, at rotation or close,
renames it to `<name>.tap.h5`. A reader that listed the directory a moment earlier re-finds the
segment under its final name (`current_name`). A `.tmp` segment is "still being written" when
its writer is alive on this host (`writer_alive`): the pid in its name or root attributes names
a live process that started before the segment was opened, or, when that process is gone (a
SIGKILLed server whose writer process lives on to commit), some process holds the file open
for writing. Linux answers both from /proc; elsewhere only the pid is asked (os.kill(pid, 0)).
"""

from __future__ import annotations

import os
import re
import socket
import time

from tensortap.format import schema

# rank{R:05d}-{host}-{pid}[-{run_id}].{seg:05d}.tap.h5[.tmp]; the host is sanitised to [A-Za-z0-9._].
SEGMENT_NAME = re.compile(r"rank(?P<rank>\d+)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)(?:-(?P<run_id>[A-Za-z0-9]+))?"
                          r"\.(?P<seg>\d+)\.tap\.h5(?:\.tmp)?")
SCAN_BUDGET_S = 0.5  # at most this long looking through /proc for a process holding a segment open
RECENT_S = 2.0  # a dead writer's segment modified this recently may be in its last rename: look again


def committed_name(path: str) -> str:
    return path[: -len(".tmp")] if path.endswith(schema.TMP_SUFFIX) else path


def current_name(path: str) -> str:
    """`path`, or its committed name once the writer has renamed it."""
    if path.endswith(schema.TMP_SUFFIX) and not os.path.lexists(path):
        final = committed_name(path)
        if os.path.lexists(final):
            return final
    return path


def parse_name(path: str) -> dict | None:
    """rank, host, pid, run_id and seg of a segment's file name (None when it is not a writer's name)."""
    match = SEGMENT_NAME.fullmatch(os.path.basename(path))
    if match is None:
        return None
    parts = match.groupdict()
    return {"rank": int(parts["rank"]), "host": parts["host"], "pid": int(parts["pid"]), "run_id": parts["run_id"],
            "seg": int(parts["seg"])}


def _sanitised(host: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in host)[:64] or "host"


def elsewhere(root: dict) -> str | None:
    """The host that wrote a segment, when it is not this one (its writer cannot be asked)."""
    host = root.get("host")
    return host if isinstance(host, str) and host != socket.gethostname() else None


def writer_alive(path: str, root: dict | None = None) -> str | None:
    """'pid N on this host' when the `.tmp` segment's writer is alive, else None."""
    if not path.endswith(schema.TMP_SUFFIX):
        return None
    found = _writer(path, root or {})
    if found is None and _recently_modified(path):
        time.sleep(0.1)  # between its last close and its rename, a committing writer holds nothing open
        if current_name(path) != path:
            return None
        found = _writer(path, root or {}, fresh=True)
    return found


def _writer(path: str, root: dict, fresh: bool = False) -> str | None:
    parsed = parse_name(path) or {}
    local = socket.gethostname()
    host = root.get("host")
    if isinstance(host, str) and host != local:
        return None
    if not isinstance(host, str) and parsed.get("host") not in (None, _sanitised(local)):
        return None
    opened_ns = root.get("opened_ns") if isinstance(root.get("opened_ns"), int) else None
    for pid in (root.get("writer_pid"), parsed.get("pid"), root.get("pid")):
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and _alive(pid, opened_ns):
            return f"pid {pid} on this host"
    holder = _holder(path, fresh)
    return f"pid {holder} on this host" if holder is not None else None


def _recently_modified(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < RECENT_S
    except OSError:
        return False


def _alive(pid: int, opened_ns: int | None) -> bool:
    """Is `pid` a live (not zombie) process that started before `opened_ns` (pid reuse ruled out)?"""
    stat_path = f"/proc/{pid}/stat"
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
            return True
        except PermissionError:
            return True
        except OSError:
            return False
    try:
        with open(stat_path, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    if fields[0] in (b"Z", b"X"):
        return False
    if opened_ns is None:
        return True
    started = _started_ns(int(fields[19]))
    return started is None or started <= opened_ns + 1_000_000_000  # clock-tick resolution


def _started_ns(ticks: int) -> int | None:
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return (boot + ticks // os.sysconf("SC_CLK_TCK")) * 1_000_000_000
    except (OSError, StopIteration, ValueError):
        return None


_SNAPSHOT: dict = {"at": -1.0, "holders": {}}
SNAPSHOT_S = 0.5  # one /proc scan serves every segment of one listing


def _holder(path: str, fresh: bool = False) -> int | None:
    """A process holding `path` open for writing, or None (from a /proc scan shared for SNAPSHOT_S)."""
    if fresh or time.monotonic() - _SNAPSHOT["at"] > SNAPSHOT_S:
        _SNAPSHOT["holders"] = _scan_holders()
        _SNAPSHOT["at"] = time.monotonic()
    try:
        return _SNAPSHOT["holders"].get(os.path.realpath(path))
    except OSError:
        return None


def _scan_holders() -> dict[str, int]:
    """{segment path: pid} of every `.tmp` segment some process holds open for writing (/proc/*/fdinfo
    flags), in at most SCAN_BUDGET_S."""
    holders: dict[str, int] = {}
    try:
        pids = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return holders
    deadline = time.monotonic() + SCAN_BUDGET_S
    for pid in pids:
        if time.monotonic() > deadline:
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not target.endswith(schema.TMP_SUFFIX):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    flags = next(int(line.split()[1], 8) for line in f if line.startswith(b"flags:"))
            except (OSError, StopIteration, ValueError):
                continue
            if flags & 3:  # O_WRONLY or O_RDWR
                holders.setdefault(target, int(pid))
    return holders
