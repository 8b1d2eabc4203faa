"""Write a tiny golden dump in the writer's current format: tests/data/golden_v{N}.tap.h5.

golden.tap.h5 pins format version 1 (written by the version-1 writer and kept); golden_v2.tap.h5
pins version 2. Run once per format version, commit the file, never regenerate it for a reader
change: a reader that cannot open one of them is a breaking change. `expected_records()` is what
test_golden.py checks against.
"""

import glob
import os
import shutil
import sys
import tempfile

import torch


def expected_records(version: int = 1):
    """(name, tensor, metadata) of every record, in capture order; values are exact by construction.
    Version 1's vocabulary still had a `scales` point; version 2 records the same fp8 tensor as `q`
    of layer 4, last."""
    q = (torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) * 0.5 - 3.0).to(torch.bfloat16)
    q[:, 1] = 0.0
    topk = torch.tensor([[0, 5, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32)
    lse = torch.tensor([[0.5, float("-inf"), 2.0], [float("inf"), float("nan"), -1.25]], dtype=torch.float32)
    pages = (torch.arange(2 * 2 * 656, dtype=torch.int64) % 251).to(torch.uint8).reshape(2, 2, 656)
    fp8 = torch.tensor([0.0, 1.5, -448.0, 0.001953125], dtype=torch.float32).to(torch.float8_e4m3fn)
    hidden = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    meta = dict(step=7, role="draft", spec_pos=1, tp_rank=1, tp_size=4, dcp_rank=0, dcp_size=1,
                group_dcp_rank=1, group_dcp_size=4, kv_dcp_size=4, interleave=1, num_heads=12, block_size=2,
                kv_format="fp8_ds_mla", softmax_scale=0.0625, kv_lora_rank=512, rope_dim=64)
    records = [
        ("layers.3.attn.q", q, dict(meta, head_offset=3)),
        ("layers.3.attn.topk", topk, dict(meta)),
        ("layers.3.attn.lse", lse, dict(meta, head_offset=3)),
        ("layers.3.attn.kv_pages", pages, dict(meta, page_ids=[4, 9])),
        ("layers.3.attn.scales" if version == 1 else "layers.4.attn.q", fp8, dict(meta)),
        ("layers.3.attn.hidden", hidden, dict(meta)),
    ]
    if version > 1:  # layer 4 after layer 3, as readers order records
        records.append(records.pop(4))
    return records


def main(out_path: str) -> None:
    import tensortap

    directory = tempfile.mkdtemp()
    tensortap.configure(dir=directory)
    from tensortap.format import schema

    for name, tensor, meta in expected_records(schema.FORMAT_VERSION):
        tensortap.point(name, tensor, rank=1, world_size=4, **meta)
    tensortap.close()
    (segment,) = glob.glob(os.path.join(directory, "*.tap.h5"))
    shutil.copyfile(segment, out_path)
    shutil.rmtree(directory)


if __name__ == "__main__":
    from tensortap.format import schema

    default = os.path.join(os.path.dirname(__file__), f"golden_v{schema.FORMAT_VERSION}.tap.h5")
    main(sys.argv[1] if len(sys.argv) > 1 else default)
