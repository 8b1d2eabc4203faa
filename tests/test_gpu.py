"""GPU paths: CUDA capture (snapshot on the caller's stream, copy off it), stats on the device, and the
reference over NCCL on 4 GPUs (CUDA graphs: test_gpu_graph.py). Skipped where no GPU is present."""

import dataclasses

import pytest
import torch

import tensortap
from tensortap.distributed import spawn
from tensortap.mla.scenario import Scenario, run_rank
from tensortap.tolerances import tolerance

pytestmark = pytest.mark.gpu


def test_cuda_capture_is_a_snapshot_and_bit_exact(tap_dir):
    tensortap.configure(dir=tap_dir)
    x = torch.randn(4, 64, 576, device="cuda").bfloat16()
    expected = x.cpu()
    side = torch.cuda.Stream()
    with tensortap.scope(step=0, role="target"):
        tensortap.point("layers.0.attn.q", x)
        x.zero_()  # the caller's stream overwrites the tensor right away
        with torch.cuda.stream(side):
            tensortap.point("layers.0.attn.partial_out", torch.ones(2, 4, 8, device="cuda"))
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert torch.equal(d.get("q").view(torch.int16), expected.view(torch.int16))
    assert torch.equal(d.get("partial_out"), torch.ones(2, 4, 8))


def test_mixed_dtypes_in_one_scope_pack_aligned(tap_dir):
    """One batch packs every snapshot into one buffer: odd sizes of every dtype must come back exact."""
    tensortap.configure(dir=tap_dir)
    tensors = {
        "topk": torch.arange(7, dtype=torch.int32, device="cuda").view(1, 7) - 1,
        "block_table": torch.arange(3, dtype=torch.int64, device="cuda").view(1, 3),
        "kv_pages": torch.arange(5, dtype=torch.uint8, device="cuda").view(1, 1, 5),
        "q": torch.randn(1, 3, 3, device="cuda").bfloat16(),
        "lse": torch.randn(1, 5, device="cuda"),
        "hidden": torch.randn(1, 3, device="cuda", dtype=torch.float64),
        "slots": torch.tensor([[True, False, True]], device="cuda"),
    }
    with tensortap.scope(step=0, role="target"):
        for point, t in tensors.items():
            tensortap.point(f"layers.0.attn.{point}", t)
    assert tensortap.stats()["errors"] == 0
    tensortap.close()
    d = tensortap.open(tap_dir)
    for point, t in tensors.items():
        back = d.get(point)
        assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.cpu().view(torch.uint8)), point


def test_cuda_stats_mode_computes_on_the_device(tap_dir):
    tensortap.configure(dir=tap_dir, mode="stats")
    out = torch.randn(2, 8, 512, device="cuda")
    out[:, 3] = 0
    out[1, 5, 7] = float("nan")
    tensortap.point("layers.0.attn.merged_out", out, step=0)
    tensortap.close()
    rec = tensortap.open(tap_dir).record("merged_out")
    assert not rec.stored and rec.stats["zero_heads"] == 1 and rec.stats["nan"] == 1
    assert rec.stats_array()["zeros"][:, 3].tolist() == [512, 512]


needs_4 = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")


@needs_4
def test_nccl_run_gives_the_cpu_picture(tmp_path):
    """The bug on 4 GPUs over NCCL: the same zero heads, laundered hidden and verdict as on gloo ranks."""
    scn = Scenario(steps=2, spec_tokens=1)
    gpu = spawn(run_rank, 4, backend="nccl", workdir=str(tmp_path), timeout=300,
                kwargs=dict(scenario=dataclasses.asdict(scn), collect=True, tap_dir=str(tmp_path / "gpu")))
    cpu = spawn(run_rank, 4, backend="gloo", workdir=str(tmp_path), timeout=300,
                kwargs=dict(scenario=dataclasses.asdict(scn), collect=True))
    tol = tolerance("float32")
    for i, fwd in enumerate(gpu[0]):
        assert all(torch.equal(fwd["hidden"], r[i]["hidden"]) for r in gpu[1:]), "identical on every GPU"
        assert tol.allclose(fwd["hidden"].double().numpy(), cpu[0][i]["hidden"].double().numpy())
        zero_gpu = [int(torch.count_nonzero(r[i]["merged"]) == 0) for r in gpu]
        zero_cpu = [int(torch.count_nonzero(r[i]["merged"]) == 0) for r in cpu]
        assert zero_gpu == zero_cpu == ([0, 1, 1, 1] if fwd["role"] == "draft" else [0, 0, 0, 0])
    report = tensortap.check(str(tmp_path / "gpu"))
    assert [v.name for v in report.verdicts] == ["laundered consensus"] and report.verdicts[0].role == "draft"
