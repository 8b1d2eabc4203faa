"""The fused stats kernel (capture/stats_kernel.py) gives the same parts, bit for bit, as torch's
kernels (capture/device_stats.py): under Triton's interpreter on the CPU where Triton is installed,
and on a GPU (marked gpu), eagerly and inside CUDA-graph capture."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tensortap.capture import device_stats, stats_kernel

gpu = pytest.mark.gpu
HERE = Path(__file__).resolve().parent

COMPARE = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from tensortap.capture import device_stats, stats_kernel
    from test_device_stats import cases
    stats_kernel.CHUNK = 1024  # several chunks per cell in the small cases (one BLOCK each)
    device = {device!r}
    compared = 0
    for point, x in cases():
        x = x.to(device)
        if x.dtype not in stats_kernel._FLOATS + stats_kernel._INTEGERS + stats_kernel._NO_MINMAX \\
                or x.dim() == 0 or x.numel() == 0:
            continue
        for n in (None, 0, 1, x.shape[0] // 2):
            cells = stats_kernel.cells(x, point)
            assert len(cells) <= 1 and all(k.startswith("cells@") for k in cells), sorted(cells)
            if x.shape[0] > 1:  # any number of rows shares the plan
                assert list(stats_kernel.cells(x[:1].clone(), point)) == list(cells), (point, x.shape)
            got = device_stats.finish({{k: v.cpu() for k, v in cells.items()}}, n)
            want = {{k: v.cpu() for k, v in device_stats.finish(device_stats._torch_partials(
                x[:n].contiguous() if n is not None else x, point)).items()}}
            assert sorted(got) == sorted(want), (point, x.dtype, n, sorted(got), sorted(want))
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (point, key)
                # bit for bit, but any NaN equals any NaN (a GPU's NaN need not carry the CPU's payload)
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True)
            compared += 1
    print("compared", compared)
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_interpreted_kernel_equals_torchs_partials():
    """Every case of test_device_stats (fp8 and float64 stay with torch), whole and cut to n rows."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", COMPARE.format(tests=str(HERE), device="cpu")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 40, done.stdout  # 13 cases, most of them at 4 row counts


def test_without_triton_or_a_gpu_torch_computes_the_partials():
    x = torch.randn(3, 4, 16)
    assert stats_kernel.plan(x, "q") is None  # a CPU tensor
    assert all(not key.startswith("cells@") for key in device_stats.partials(x, "q"))


@gpu
def test_on_the_gpu_the_kernel_equals_torchs_partials():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", COMPARE.format(tests=str(HERE), device="cuda")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 40, done.stdout


@gpu
def test_on_the_gpu_the_partials_are_one_kernel():
    pytest.importorskip("triton")
    x = torch.randn(4, 8, 576, device="cuda").bfloat16()
    assert stats_kernel.plan(x, "q") is not None
    parts = device_stats.partials(x, "q")
    (key, buffer), = parts.items()
    assert buffer.dtype == torch.uint8 and buffer.numel() == 4 * stats_kernel.plan_of(key).row_bytes, "one buffer"
    assert [name for name, *_ in stats_kernel.plan_of(key).parts] == ["buckets", "absmax", "sumsq", "zeros"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        device_stats.partials(x, "q")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]


@gpu
def test_inside_a_graph_the_kernel_replays_with_the_new_values():
    """A graph that captured the kernel's partials of a static input gives, after each replay, the
    parts of what the input holds then; a variant never compiled before falls back to torch."""
    pytest.importorskip("triton")
    static = torch.randn(5, 4, 64, device="cuda")
    device_stats.partials(static, "partial_out")  # compiled outside the capture, as a warm-up forward does
    fresh = torch.randn(5, 7, device="cuda").half()  # a variant (float16 row point) not compiled yet
    stats_kernel._compiled.discard(stats_kernel._variant(fresh, stats_kernel._point_kind(fresh, "hidden")))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        inside = device_stats.partials(static, "partial_out")
        fallback = device_stats.partials(fresh, "hidden")
    assert all(key.startswith("cells@") for key in inside)
    assert not any(key.startswith("cells@") for key in fallback)
    for _ in range(2):
        static.copy_(torch.randn(5, 4, 64, device="cuda"))
        static[1, 2] = 0
        static[3, 0, 5] = float("nan")
        fresh.copy_(torch.randn(5, 7, device="cuda").half())
        graph.replay()
        torch.cuda.synchronize()
        for parts, x, point in ((inside, static, "partial_out"), (fallback, fresh, "hidden")):
            got = device_stats.finish({k: v.cpu() for k, v in parts.items()})
            want = device_stats.finish(device_stats._torch_partials(x.cpu(), point))
            assert sorted(got) == sorted(want)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True)


def test_a_plan_lays_out_every_row_alike_and_its_views_read_each_part():
    """The one buffer is [rows, row_bytes]: each output's part of a row at its own 8-byte aligned offset;
    views() gives every output as [rows, G, C, ...] over it (no Triton needed: the plan is host code)."""
    x = torch.zeros(3, 4, 3000)  # a head point: G = 4 heads, C = 2 chunks of CHUNK (2048)
    found = stats_kernel._plan_for(x, "q")
    assert stats_kernel._plan_for(torch.zeros(7, 4, 3000), "q") is found, "the row count is not part of the kind"
    assert [name for name, *_ in found.parts] == ["buckets", "absmax", "sumsq", "zeros"]
    assert all(at % 8 == 0 for _, at, _, _ in found.parts) and found.row_bytes % 16 == 0
    assert found.groups == 4 and found.chunks == 2 and found.width == 3000
    flat = np.zeros(3 * found.row_bytes, np.uint8)
    table = flat.reshape(3, found.row_bytes)
    for name, at, shape, dtype in found.parts:  # row t of part k holds the value 10 * t + k
        k = [n for n, *_ in found.parts].index(name)
        for t in range(3):
            table[t, at:at + int(np.prod(shape)) * dtype.itemsize].view(dtype)[:] = 10 * t + k
    views = found.views(flat)
    assert views["buckets"].shape == (3, 4, 2, 4) and views["sumsq"].dtype == np.float64
    for k, (name, *_rest) in enumerate(found.parts):
        assert all((views[name][t] == 10 * t + k).all() for t in range(3)), name
    assert (found.views(flat[:found.row_bytes])["zeros"] == 3).all(), "the first rows alone: a prefix of the buffer"


def test_plans_made_by_racing_threads_get_distinct_keys_and_the_bound_is_said_once(monkeypatch, caplog):
    import logging
    import threading

    made, start = [], threading.Barrier(4)

    def make(width):
        start.wait()
        made.append(stats_kernel._plan_for(torch.zeros(2, width), "hidden").key)

    threads = [threading.Thread(target=make, args=(9000 + w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 4 and all(stats_kernel.plan_of(key).key == key for key in made)
    monkeypatch.setattr(stats_kernel, "MAX_PLANS", len(stats_kernel._plans))
    monkeypatch.setattr(stats_kernel, "_said_full", False)
    with caplog.at_level(logging.WARNING, logger="tensortap"):
        assert stats_kernel._plan_for(torch.zeros(2, 9999), "hidden") is None
        assert stats_kernel._plan_for(torch.zeros(2, 9998), "hidden") is None
    assert len([r for r in caplog.records if "stats-kernel plan" in r.getMessage()]) == 1
