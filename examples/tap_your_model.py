"""Tap your own model: the output path of one TP2 MLA layer on 2 CPU ranks, captured, then listed and checked.

    python examples/tap_your_model.py [DIR]      # then: tensortap ls DIR; tensortap check DIR
"""
import sys

import torch
import torch.distributed as dist

import tensortap
from tensortap.distributed import spawn

T, H, LATENT, V, HIDDEN = 3, 4, 512, 16, 64  # tokens, heads per rank, latent width, v_head_dim, hidden size


def rank_main(rank: int, world_size: int, out_dir: str) -> None:
    torch.manual_seed(0)  # the same weights on every rank; each rank uses its own slice
    w_uv = torch.randn(world_size * H, LATENT, V) / LATENT**0.5  # [H_all, 512, v]
    w_o = torch.randn(world_size * H * V, HIDDEN) / (H * V) ** 0.5  # [H_all * v, hidden]
    tensortap.configure(dir=out_dir)  # or TAP=... in the environment
    for step in range(2):  # the layer believes what the process group says: DCP 1, no merge
        with tensortap.scope(step=step, layer=0, role="target", tp_rank=rank, tp_size=world_size, dcp_rank=0,
                             dcp_size=1, group_dcp_rank=0, group_dcp_size=1, num_heads=world_size * H):
            merged = torch.randn(T, H, LATENT)  # [T, H, 512]: stands in for this rank's attention output
            tensortap.point("layers.0.attn.merged_out", merged, head_offset=rank * H)
            attn_out = torch.einsum("thl,hlv->thv", merged, w_uv[rank * H:(rank + 1) * H]).reshape(T, H * V)  # [T, H*v]
            tensortap.point("layers.0.attn.attn_out", attn_out, head_offset=rank * H)
            partial = attn_out @ w_o[rank * H * V:(rank + 1) * H * V]  # [T, hidden]: row-parallel o_proj
            tensortap.point("layers.0.attn.o_proj_partial", partial)
            dist.all_reduce(partial)  # [T, hidden]: the sum, identical on every rank
            tensortap.point("layers.0.attn.hidden", partial, hidden_kind="sum")
    tensortap.close()  # flushes: every record is on disk


if __name__ == "__main__":
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tap-your-model"
    spawn(rank_main, 2, kwargs=dict(out_dir=out_dir))
    d = tensortap.open(out_dir)
    print(d, "points:", ", ".join(d.points))
    report = tensortap.check(d, use_oracle=False)
    print("check:", "clean" if report.clean else sorted(report.codes()), f"({report.records} records)")
