"""Reading a dump while its writer is still at it: the reader never fails because of a live writer.

The race of issue 13: a tapping process is SIGKILLed after a flush() while it keeps capturing; its
writer process lives on, writes what was in the pipe, commits and renames `.tmp` to `.h5` while a
reader lists and opens the directory. One process that imported torch once forks each tapping
process (a fresh interpreter per round would cost seconds), so 20 rounds take a few seconds.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

import tensortap
from tensortap.format import live, schema
from tensortap.format.reader import read_segment

FLUSHED_STEPS = 3
POINTS = ("q", "lse")
ROUNDS, AT_ONCE = 20, 1

# Reads "go DIR..." lines; for each DIR, forks a process that taps DIR (writer process, small
# segments), flushes after FLUSHED_STEPS steps, says "flushed PID DIR" and keeps capturing until
# it is killed. Then reaps them and says "reaped".
ZYGOTE = textwrap.dedent(f"""
    import os, sys, time
    import torch
    import tensortap
    torch.set_num_threads(1)
    for line in sys.stdin:
        children = []
        for directory in line.split()[1:]:
            pid = os.fork()
            if pid == 0:
                tensortap.configure(dir=directory, segment_records=7)
                step = 0
                while True:
                    with tensortap.scope(step=step, layer=0, role="target"):
                        tensortap.point("layers.0.attn.q", torch.ones(2, 4, 8))
                        tensortap.point("layers.0.attn.lse", torch.zeros(2, 4))
                    step += 1
                    if directory.endswith("-steady") and step > {FLUSHED_STEPS}:
                        time.sleep(0.01)  # a steady writer, not a flood
                    if step == {FLUSHED_STEPS}:
                        tensortap.flush()
                        os.write(1, f"flushed {{os.getpid()}} {{directory}}\\n".encode())
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        os.write(1, b"reaped\\n")
""")


@pytest.fixture
def zygote():
    proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def read_at_once(directory: str) -> int:
    """Open and check a dump whose tapping process was just killed; returns its live segments."""
    from tensortap.analysis import check

    d = tensortap.open(directory)  # at once: the writer process is still committing
    flushed = d.select(step=f"0-{FLUSHED_STEPS - 1}")
    assert len(flushed) == FLUSHED_STEPS * len(POINTS), (directory, d.summary()["truncated_segments"])
    for rec in flushed:
        assert rec.tensor().shape == ((2, 4, 8) if rec.point == "q" else (2, 4))
    for seg in d.truncated:
        assert seg.live and "still being written" in seg.truncation, seg
    report = check(directory, use_oracle=False)
    assert not report.errors, report.errors
    return len(d.live)


def test_sigkill_while_capturing_then_read_at_once(zygote, tmp_path):
    live_seen = 0
    for batch in range(ROUNDS // AT_ONCE):
        directories = [str(tmp_path / f"round{batch}-{i}") for i in range(AT_ONCE)]
        zygote.stdin.write("go " + " ".join(directories) + "\n")
        for _ in directories:
            line = zygote.stdout.readline()
            assert line.startswith("flushed "), line
            _, pid, directory = line.split()
            os.kill(int(pid), signal.SIGKILL)
            live_seen += read_at_once(directory)
        assert zygote.stdout.readline() == "reaped\n"
    print(f"segments seen still being written: {live_seen} in {ROUNDS} rounds")


def test_ls_and_check_while_a_writer_keeps_writing(zygote, tmp_path, cli):
    directory = str(tmp_path / "busy-steady")
    zygote.stdin.write(f"go {directory}\n")
    line = zygote.stdout.readline()
    assert line.startswith("flushed "), line
    try:
        for _ in range(5):  # the tapping process lives: segments rotate and grow under the reader
            assert read_at_once(directory) <= 1
            code, out, err = cli(["ls", directory])
            assert code == 0 and err == "", err
    finally:
        os.kill(int(line.split()[1]), signal.SIGKILL)
    assert zygote.stdout.readline() == "reaped\n"


def forged_tmp(path: str, records: int, root: dict | None = None) -> str:
    """A `.tmp` segment as a writer leaves it mid-run: records, no index."""
    with h5py.File(path, "w", libver=("v108", "v108")) as f:
        f.attrs["tensortap_format"] = 1
        for key, value in (root or {}).items():
            f.attrs[key] = value
        group = f.create_group("records")
        for seq in range(records):
            g = group.create_group(schema.record_group_name(seq))
            g.create_dataset("lse", data=np.zeros((2, 4), np.float32))
            g.attrs["meta"] = (f'{{"name": "layers.0.attn.lse", "point": "lse", "seq": {seq}, "step": {seq}, '
                               f'"rank": 0, "dtype": "float32", "shape": [2, 4], "stored": true}}')
    return path


def test_tmp_of_a_live_writer_is_still_being_written(tmp_path):
    path = forged_tmp(str(tmp_path / f"rank00000-{live._sanitised(os.uname().nodename)}-{os.getpid()}.00000"
                                     f".tap.h5.tmp"), 3, {"host": os.uname().nodename, "pid": os.getpid()})
    info, metas = read_segment(path)
    assert info.live and not info.committed and len(metas) == 3
    assert info.truncation == f"still being written by pid {os.getpid()} on this host; 3 record(s) readable so far"
    d = tensortap.open(str(tmp_path))
    assert len(d) == 3 and len(d.live) == 1 and "still being written" in repr(d)


def test_tmp_of_a_dead_writer_is_a_crash(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    path = forged_tmp(str(tmp_path / f"rank00000-somehost-{pid}.00000.tap.h5.tmp"), 2,
                      {"host": os.uname().nodename, "pid": pid})
    os.utime(path, (time.time() - 60, time.time() - 60))
    info, _ = read_segment(path)
    assert not info.live and "writer killed" in info.truncation


def test_writer_on_another_host_is_never_asked(tmp_path):
    path = forged_tmp(str(tmp_path / f"rank00000-elsewhere-{os.getpid()}.00000.tap.h5.tmp"), 1,
                      {"host": "elsewhere", "pid": os.getpid()})
    assert live.writer_alive(path, {"host": "elsewhere", "pid": os.getpid()}) is None


def test_holder_of_the_file_counts_as_its_writer(tmp_path):
    """The tapping process is gone, its writer process still has the segment open for writing."""
    host = live._sanitised(os.uname().nodename)
    path = forged_tmp(str(tmp_path / f"rank00000-{host}-999999999.00000.tap.h5.tmp"), 1)
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; f = open({path!r}, 'r+b'); "
                               "print('open', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        assert live.writer_alive(path, {}) == f"pid {holder.pid} on this host"
    finally:
        holder.kill()
        holder.wait()


def test_renamed_between_listing_and_opening(tmp_path):
    tmp = forged_tmp(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), 2)
    final = tmp[: -len(".tmp")]
    os.rename(tmp, final)  # the writer committed after the listing saw the .tmp
    info, metas = read_segment(tmp)
    assert info.path == final and len(metas) == 2
    d = tensortap.open(str(tmp_path))
    assert len(d) == 2


def test_records_listed_from_tmp_read_after_the_rename(tmp_path):
    tmp = forged_tmp(str(tmp_path / f"rank00000-{live._sanitised(os.uname().nodename)}-{os.getpid()}.00000.tap.h5.tmp"), 2, {"pid": os.getpid()})
    d = tensortap.open(str(tmp_path))
    assert d.segments[0].path == tmp and d.live
    os.rename(tmp, tmp[: -len(".tmp")])
    assert [r.tensor().shape for r in d.iter()] == [(2, 4), (2, 4)]


def test_unreadable_tmp_of_a_live_writer_is_waited_for_then_reported(tmp_path):
    path = str(tmp_path / f"rank00000-{live._sanitised(os.uname().nodename)}-{os.getpid()}.00000.tap.h5.tmp")
    with open(path, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n")  # a writer that has only begun
    start = time.monotonic()
    info, metas = read_segment(path, wait_s=0.3)
    assert time.monotonic() - start < 3
    assert info.live and metas == [] and "still being written" in info.truncation
