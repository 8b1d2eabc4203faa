"""The capture runtime: what gets recorded, and what happens when things go wrong."""

import errno
import logging
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import tensortap
from tensortap.capture import runtime
from tensortap.distributed import spawn
from tensortap.capture.writer import ChildSink
from tensortap.format.segment import SegmentWriter

from conftest import segment_files, torn_by_a_flush


def emit_grid(steps=3, layers=3, ranks=(0,), roles=("target", "draft")):
    for step in steps if isinstance(steps, (list, range)) else range(steps):
        for role in roles:
            for layer in range(layers):
                for rank in ranks:
                    with tensortap.scope(step=step, role=role, rank=rank):
                        tensortap.point(f"layers.{layer}.attn.q", torch.randn(2, 4, 8))
                        tensortap.point(f"layers.{layer}.attn.lse", torch.randn(2, 4))


def test_disabled_records_nothing_and_creates_no_file(tmp_path):
    code = (
        "import torch, tensortap\n"
        "with tensortap.scope(step=0):\n"
        "    tensortap.point('layers.0.attn.q', torch.ones(2, 2))\n"
        "tensortap.flush(); tensortap.close()\n"
        "assert not tensortap.enabled()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TAP"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    assert os.listdir(tmp_path) == []
    assert tensortap.point("layers.0.attn.q", torch.ones(1)) is None
    assert tensortap.scope(step=1) is tensortap.scope(step=2), "disabled scope() is one shared no-op"


def test_tap_from_environment(tmp_path):
    target = tmp_path / "envtap"
    code = (
        "import torch, tensortap\n"
        "tensortap.point('layers.5.attn.lse', torch.ones(2, 2), step=1, role='draft')\n"
        "tensortap.point('layers.6.attn.lse', torch.ones(2, 2), step=1, role='draft')\n"
    )
    env = dict(os.environ, TAP=f"{target};layers=5")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    d = tensortap.open(str(target))
    assert d.layers == [5] and len(d) == 1 and not d.truncated, "atexit commits the segment"


def test_filters_write_exactly_what_they_should(tap_dir):
    tensortap.configure(dir=tap_dir, layers="0,2", steps="1-2", ranks="1", points="lse", roles="draft")
    emit_grid(steps=4, layers=3, ranks=(0, 1))
    tensortap.close()
    d = tensortap.open(tap_dir)
    got = sorted((r.step, r.layer, r.rank, r.point, r.role) for r in d)
    assert got == [(s, l, 1, "lse", "draft") for s in (1, 2) for l in (0, 2)]


def test_files_and_directories_are_private(tmp_path):
    directory = tmp_path / "private" / "tap"
    tensortap.configure(dir=str(directory))
    tensortap.point("layers.0.attn.q", torch.ones(2), step=0)
    tensortap.close()
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in segment_files(str(directory)):
        assert os.stat(directory / name).st_mode & 0o777 == 0o600


def test_stats_mode_writes_only_stats(tap_dir):
    tensortap.configure(dir=tap_dir, mode="stats")
    q = torch.randn(2, 4, 8)
    q[:, 1] = 0.0  # head 1 all zero
    q[0, 2, :3] = 0.0  # three zeros in one row of head 2
    q[1, 3, 0] = float("nan")
    topk = torch.tensor([[3, -1, 7], [-1, -1, -1]], dtype=torch.int32)
    with tensortap.scope(step=0, role="draft"):
        tensortap.point("layers.0.attn.q", q)
        tensortap.point("layers.0.attn.topk", topk)
    tensortap.close()
    d = tensortap.open(tap_dir)
    rq, rt = d.record("q"), d.record("topk")
    assert not rq.stored and not rt.stored
    assert rq.stats["zero_heads"] == 1 and rq.stats["nonfinite"] == 1 and rq.stats["nan"] == 1
    head = rq.stats_array()
    assert head.shape == (2, 4)
    assert list(head["zeros"][:, 1]) == [8, 8] and head["zeros"][0, 2] == 3
    expect_norm = torch.linalg.vector_norm(q, dim=-1)
    assert torch.allclose(torch.from_numpy(head["norm"][:, :3].copy()), expect_norm[:, :3])
    assert list(rt.stats_array()) == [2, 0] and rt.stats["empty_rows"] == 1
    with pytest.raises(tensortap.FormatError, match="stats only"):
        rq.tensor()
    assert d.records["nbytes"].sum() > 0 and d.nbytes == 0


def test_full_mode_records_carry_the_same_stats(tap_dir):
    tensortap.configure(dir=tap_dir)
    q = torch.randn(2, 4, 8)
    q[:, 3] = 0.0
    tensortap.point("layers.0.attn.partial_out", q, step=0)
    tensortap.close()
    rec = tensortap.open(tap_dir).record("partial_out")
    assert rec.stored and rec.stats["zero_heads"] == 1 and rec.stats["absmax"] == pytest.approx(q.abs().max().item())


def test_scope_nesting_and_metadata(tap_dir):
    tensortap.configure(dir=tap_dir)
    with tensortap.scope(step=4, role="target", tp_rank=2):
        with tensortap.scope(layer=7, role="draft"):
            tensortap.point("layers.7.attn.kv_pages", torch.zeros(2, 4, 656, dtype=torch.uint8),
                            page_ids=torch.tensor([5, 9]), spec_pos=1)
        tensortap.point("layers.9.attn.hidden", torch.zeros(3))
    tensortap.close()
    d = tensortap.open(tap_dir)
    pages = d.record("kv_pages")
    assert pages.meta["page_ids"] == [5, 9] and pages.role == "draft" and pages.step == 4
    assert pages.meta["tp_rank"] == 2 and pages.meta["spec_pos"] == 1 and pages.layer == 7
    hidden = d.record("hidden")
    assert hidden.role == "target" and hidden.layer == 9 and hidden.name == "layers.9.attn.hidden"


def test_max_bytes_stops_capture(tap_dir):
    tensortap.configure(dir=tap_dir, max_bytes=4096)
    for step in range(10):
        tensortap.point("layers.0.attn.q", torch.zeros(256), step=step)  # 1 KiB each
    counters = tensortap.stats()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.steps == [0, 1, 2, 3]
    assert counters["over_budget"] == 6


def test_rotation_commits_every_segment(tap_dir):
    tensortap.configure(dir=tap_dir, segment_records=3)
    for step in range(8):
        tensortap.point("layers.0.attn.lse", torch.full((2, 2), float(step)), step=step)
    tensortap.close()
    files = segment_files(tap_dir)
    assert len(files) == 3 and all(f.endswith(".tap.h5") for f in files)
    d = tensortap.open(tap_dir)
    assert d.steps == list(range(8)) and not d.truncated
    assert float(d.get("lse", step=6)[0, 0]) == 6.0


def test_flushed_records_are_readable_before_close(tap_dir):
    tensortap.configure(dir=tap_dir)
    tensortap.point("layers.0.attn.lse", torch.ones(2, 2), step=0)
    assert tensortap.flush(timeout=30)
    d = tensortap.open(tap_dir)
    assert len(d) == 1 and len(d.truncated) == 1, "an open segment reads as a .tmp up to its last flush"
    assert torch.equal(d.get("lse"), torch.ones(2, 2))


def test_wants_follows_the_filter(tap_dir):
    assert not tensortap.wants("layers.0.attn.kv_pages", step=0)
    tensortap.configure(dir=tap_dir, points="kv_pages", steps="0")
    assert tensortap.wants("layers.0.attn.kv_pages", step=0)
    assert not tensortap.wants("layers.0.attn.kv_pages", step=1)
    assert not tensortap.wants("layers.0.attn.q", step=0)


def test_bad_calls_never_raise(tap_dir, caplog):
    tensortap.configure(dir=tap_dir)
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        tensortap.point("layers.0.attn.Bad-Name", torch.ones(2))
        tensortap.point("layers.0.attn.q", torch.ones(2, dtype=torch.complex64))
        tensortap.point("layers.0.attn.q", torch.ones(2), step=0)
    assert tensortap.stats()["errors"] == 2
    assert len([r for r in caplog.records if "failed" in r.message]) == 1, "reported once"
    tensortap.close()
    assert len(tensortap.open(tap_dir)) == 1


def test_bad_metadata_costs_one_key_not_the_record(tap_dir, caplog):
    """Metadata is checked against the record schema at the call: a bad value is an error counted and
    reported once per key, the key is dropped and the record kept; an unknown point name, a Python list
    instead of a tensor and a 9-dimensional tensor are errors and record nothing."""
    tensortap.configure(dir=tap_dir)
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        tensortap.point("layers.0.attn.lse", torch.ones(2), step="warmup")
        with tensortap.scope(step=2, dcp_size="four", role="targt"):
            tensortap.point("layers.0.attn.lse", torch.ones(2))
            tensortap.point("layers.0.attn.lse", torch.ones(3))
        tensortap.point("layers.0.attn.lse", torch.ones(2, 1, 1, 1, 1, 1, 1, 1, 1))  # 9 dimensions
        tensortap.point("layers.0.attn.foo", torch.ones(2), step=1)
        tensortap.point("foo", torch.ones(2), step=1)
        tensortap.point("layers.0.attn.lse", [1.0, 2.0], step=1)
        assert tensortap.wants("layers.0.attn.Not-A-Point") is False
        tensortap.point("layers.0.attn.lse", torch.ones(2), step=1)
    assert tensortap.flush(timeout=60)
    counters = tensortap.stats()
    tensortap.close()
    assert counters["errors"] == 3 + 5 and counters["records"] == 4 and counters["lost"] == 0
    dropped = [r.getMessage() for r in caplog.records if "metadata dropped" in r.getMessage()]
    assert len(dropped) == 3 and any("dcp_size" in m for m in dropped) and any("role" in m for m in dropped)
    d = tensortap.open(tap_dir)
    assert sorted(str(r.step) for r in d) == ["1", "2", "2", "None"]
    assert all("dcp_size" not in r.meta and "role" not in r.meta for r in d if r.step == 2)


def test_stats_survive_close_and_an_empty_filter_says_why(tap_dir, caplog):
    tensortap.configure(dir=tap_dir, steps="100-140")
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        for step in range(3):
            with tensortap.scope(step=step, role="target"):
                tensortap.point("layers.0.attn.lse", torch.ones(2))
        tensortap.close()
    assert tensortap.stats()["records"] == 0
    said = [r.getMessage() for r in caplog.records if "nothing was written" in r.getMessage()]
    assert len(said) == 1 and "steps=100-140" in said[0] and "steps 0,1,2" in said[0]
    tensortap.configure(dir=tap_dir + "2")
    tensortap.point("layers.0.attn.lse", torch.ones(2), step=0)
    tensortap.close()
    assert tensortap.stats()["records"] == 1, "the final counters, not zeros"


def test_an_invalid_tap_in_the_environment_is_one_line(tmp_path):
    env = dict(os.environ, TAP=f"{tmp_path};bogus=1")
    done = subprocess.run([sys.executable, "-c", "import tensortap; tensortap.point; print(tensortap.enabled())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0] and "valid keys" in lines[0]


def test_capturing_is_false_without_cuda():
    assert tensortap.capturing() is False


def test_the_name_layer_wins_over_the_scope(tap_dir):
    tensortap.configure(dir=tap_dir, layers="3")
    with tensortap.scope(layer=78, step=0):
        tensortap.point("layers.3.attn.q", torch.ones(2))
    tensortap.close()
    assert tensortap.open(tap_dir).layers == [3]


def test_drop_mode_counts_what_it_drops(tap_dir, monkeypatch):
    original = SegmentWriter.write

    def slow_write(self, rec):
        time.sleep(0.05)
        original(self, rec)

    monkeypatch.setattr(SegmentWriter, "write", slow_write)
    tensortap.configure(dir=tap_dir, on_full="drop", queue_bytes=8192, writer="thread")
    for step in range(40):
        tensortap.point("layers.0.attn.q", torch.zeros(1024), step=step)  # 4 KiB each
    dropped = tensortap.stats()["dropped"]
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert dropped > 0 and len(d) == 40 - dropped
    assert d.dropped == {0: dropped}


def test_disk_full_keeps_the_model_running(tap_dir, monkeypatch, caplog):
    original = SegmentWriter.write
    calls = {"n": 0}

    def failing_write(self, rec):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, rec)

    monkeypatch.setattr(SegmentWriter, "write", failing_write)
    tensortap.configure(dir=tap_dir, writer="thread")
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        for step in range(10):
            tensortap.point("layers.0.attn.lse", torch.ones(2, 2), step=step)  # never raises
            tensortap.flush(timeout=30)
    counters = tensortap.stats()
    tensortap.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage()
    assert counters["records"] == 3 and counters["lost"] == 7
    d = tensortap.open(tap_dir)
    assert d.steps == [0, 1, 2]
    assert d.capture_errors and "No space left" in d.capture_errors[0], "the loss is recorded in the dump"


def test_a_full_file_system_in_the_writer_process(tap_dir, monkeypatch, caplog):
    """A real write failure in the writer process (EFBIG past a file-size limit): one error, the rest lost."""

    original = ChildSink._popen_options

    def limited(self):
        return dict(original(self),
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10)))

    monkeypatch.setattr(ChildSink, "_popen_options", limited)
    tensortap.configure(dir=tap_dir, writer="process")
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        for step in range(40):
            tensortap.point("layers.0.attn.lse", torch.ones(64, 64), step=step)  # 16 KiB each; never raises
            tensortap.flush(timeout=60)
    counters = tensortap.stats()
    tensortap.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "File too large" in errors[0].getMessage()
    assert 0 < counters["records"] < 40 and counters["lost"] > 0
    d = tensortap.open(tap_dir)
    assert len(d) >= 1 and d.steps == list(range(len(d))), "what was flushed before stays readable"


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_unwritable_directory_keeps_the_model_running(tmp_path, caplog, writer):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dump directory should go")
    tensortap.configure(dir=str(blocker / "tap"), writer=writer)
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        for step in range(5):
            tensortap.point("layers.0.attn.lse", torch.ones(2, 2), step=step)
        tensortap.flush(timeout=30)
    counters = tensortap.stats()
    tensortap.close()
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert counters["records"] == 0 and counters["lost"] == 5


def _capture_on_rank(rank, world_size, directory):
    import torch

    import tensortap

    tensortap.configure(dir=directory)
    for step in range(2):
        with tensortap.scope(step=step, role="target", tp_rank=rank, tp_size=world_size):
            tensortap.point("layers.3.attn.lse", torch.full((2, 4), float(rank)))
            tensortap.point("layers.3.attn.hidden", torch.full((2, 8), float(step)))
    tensortap.close()
    return tensortap.stats()


def test_four_gloo_ranks_capture_together(tmp_path):
    directory = str(tmp_path / "tap")
    spawn(_capture_on_rank, 4, workdir=str(tmp_path), kwargs={"directory": directory}, timeout=120)
    d = tensortap.open(directory)
    assert d.ranks == [0, 1, 2, 3] and d.steps == [0, 1] and len(d) == 16
    assert len(segment_files(directory)) == 4
    lse = d.stack("lse", over="rank", step=1)
    assert lse.shape == (4, 2, 4) and [float(x[0, 0]) for x in lse] == [0.0, 1.0, 2.0, 3.0]
    assert {r.meta["world_size"] for r in d} == {4}, "rank and world size come from the process group"


KILLED_WRITER = """
import sys, torch, tensortap
tensortap.configure(dir=sys.argv[1], writer=sys.argv[2])
for step in range(20):
    tensortap.point("layers.0.attn.lse", torch.full((4, 64), float(step)), step=step)
tensortap.flush()
print("flushed", flush=True)
step = 20
while True:
    tensortap.point("layers.0.attn.lse", torch.full((4, 64), float(step)), step=step)
    step += 1
"""


@pytest.mark.parametrize("writer, kill", [("thread", "server"), ("process", "server"), ("process", "both")])
def test_sigkill_after_flush_keeps_every_flushed_record(tmp_path, cli, writer, kill):
    directory = str(tmp_path / "tap")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, directory, writer], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "flushed"
        time.sleep(0.3)
    finally:
        if kill == "both":
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its writer process
        else:
            proc.kill()
        proc.wait()
    if writer == "process" and kill == "server":
        _wait_for_commit(directory)
    d = tensortap.open(directory)
    truncated = writer == "thread" or kill == "both"
    assert len(d.truncated) == (1 if truncated else 0), "a surviving writer process commits what it received"
    steps = d.steps
    if steps[:20] != list(range(20)) and truncated and torn_by_a_flush(d):  # named, never silent
        pytest.xfail("killed inside an HDF5 flush: the open segment's record list was torn and a batch "
                     "could not be found by name (known limit, docs/crash-safety.md)")
    assert steps[:20] == list(range(20)), "every record flushed before the kill is readable"
    assert steps == list(range(len(steps)))
    for step in (0, 19, steps[-1]):
        assert float(d.get("lse", step=step)[0, 0]) == float(step)
    code, out, _ = cli(["ls", directory])
    assert code == 0 and ("truncated" in out) == truncated


def _wait_for_commit(directory, timeout=30.0):
    """The surviving writer process sees the end of its input and commits: wait for the .tmp to become final."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(f.endswith(".tmp") for f in os.listdir(directory)):
        time.sleep(0.1)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_point_that_turns_a_rejected_scope_into_a_kept_one_gets_validated_metadata(tmp_path, writer):
    """The scope is rejected (roles=draft, no role), so its metadata was not validated; the point's role
    makes it kept: its tensor metadata is converted and nothing unvalidated reaches the writer."""
    directory = str(tmp_path / "tap")
    tensortap.configure(dir=directory, roles="draft", writer=writer)
    with tensortap.scope(step=3, seq_lens=torch.tensor([5, 7]), softmax_scale=0.1):
        with tensortap.scope(role="draft", layer=78):
            tensortap.point("layers.78.attn.lse", torch.zeros(2, 4))  # [T, H]
        tensortap.point("layers.78.attn.lse", torch.ones(2, 4), role="draft", spec_pos=1)  # [T, H]
    tensortap.close()
    assert tensortap.stats()["errors"] == 0 and tensortap.stats()["records"] == 2
    records = list(tensortap.open(directory).iter())
    assert [r.meta["seq_lens"] for r in records] == [[5, 7], [5, 7]]
    assert [r.meta.get("spec_pos") for r in records] == [None, 1]


def test_past_max_bytes_points_are_counted_without_a_snapshot(tmp_path, monkeypatch):
    tensortap.configure(dir=str(tmp_path / "tap"), max_bytes=64, writer="thread")
    tap = runtime._tap
    clones = []
    original = tap.stager.stage
    monkeypatch.setattr(tap.stager, "stage", lambda tensors: clones.append(1) or original(tensors))
    with tensortap.scope(step=0, role="target", layer=0):
        for _ in range(5):
            tensortap.point("layers.0.attn.lse", torch.zeros(2, 4))  # [T, H]: 32 bytes
    tensortap.close()
    assert tensortap.stats()["records"] == 2 and tensortap.stats()["over_budget"] == 3
    assert len(clones) == 3, "two records and the one that found the budget spent; none after it"


def test_a_name_that_is_not_a_string_is_an_error_not_an_exception(tmp_path):
    tensortap.configure(dir=str(tmp_path / "tap"), writer="thread")
    tensortap.point(["layers", 0], torch.zeros(2))  # must not raise into the caller
    tensortap.point(None, torch.zeros(2))
    tensortap.close()
    assert tensortap.stats()["errors"] == 2


def test_integers_that_do_not_fit_the_index_are_dropped_at_the_call(tmp_path):
    """step=2**63 or layer=2**31 would break the index table at rotation: the key is dropped, counted."""
    directory = str(tmp_path / "tap")
    tensortap.configure(dir=directory, writer="thread", segment_records=1)
    with tensortap.scope(step=2 ** 63, role="target"):
        tensortap.point("layers.0.attn.lse", torch.zeros(2, 4), spec_pos=2 ** 31)  # [T, H]
    with tensortap.scope(step=1, role="target"):
        tensortap.point("layers.0.attn.lse", torch.ones(2, 4))  # [T, H]
    tensortap.close()
    assert tensortap.stats()["records"] == 2 and tensortap.stats()["errors"] == 2
    d = tensortap.open(directory)
    assert len(d.truncated) == 0, "every segment committed: the index held every value"
    assert sorted(r.meta.get("step", -1) for r in d) == [-1, 1]
