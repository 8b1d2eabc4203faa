"""Figures of one forward (step, layer, role): where attention went to zero and who fed the all-reduce.

    fig = tensortap.plot.forward(d, step=0, layer=78, role="draft")
    fig.savefig("draft.png")

Panels: per-head L2 norm of the attention output by global head, one line per rank (zero heads
drop to the floor); each rank's share of the row-parallel o_proj sum; and, per rank, the largest
difference of its hidden state from rank 0's (0 everywhere: the consensus after the all-reduce).
"""

from __future__ import annotations

import numpy as np

from tensortap.dump import Dump
from tensortap.errors import SelectionError


def _one_forward(d: Dump, step, layer, role, spec_pos) -> Dump:
    sub = d.select(step=step, layer=layer, role=role)
    if spec_pos is not None:
        sub = sub.select(spec_pos=spec_pos)
    keys = {(m.get("step"), m.get("layer"), m.get("role"), m.get("spec_pos")) for m in sub._metas}
    if not keys:
        raise SelectionError(f"no records for step={step} layer={layer} role={role}")
    if len(keys) > 1:
        listing = ", ".join(sorted(f"step {s} layer {l} {r}" + (f" spec {p}" if p is not None else "")
                                   for s, l, r, p in keys)[:6])
        raise SelectionError(f"{len(keys)} forwards match ({listing}); pass --step, --layer and --role")
    return sub


def forward(d: Dump, step=None, layer=None, role=None, spec_pos=None, point: str = "merged_out"):
    """A three-panel matplotlib Figure of one forward."""
    import matplotlib.pyplot as plt

    sub = _one_forward(d, step, layer, role, spec_pos)
    first = sub[0].meta
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 1, 1]})
    title = f"{first.get('role')} layer {first.get('layer')} step {first.get('step')}"
    if first.get("spec_pos") is not None:
        title += f" spec {first.get('spec_pos')}"
    fig.suptitle(title)

    ax = axes[0]
    for rec in sorted(sub.iter(point=point), key=lambda r: r.rank):
        out = rec.float64()  # [T, H, D]
        if out.ndim != 3:
            continue
        norms = np.linalg.norm(out, axis=-1).mean(axis=0)  # [H]
        heads = np.arange(out.shape[1]) + int(rec.meta.get("head_offset") or 0)
        ax.plot(heads, norms, marker=".", linestyle="-", label=f"rank {rec.rank}")
    ax.set_xlabel("global head")
    ax.set_ylabel(f"mean ||{point}|| over tokens")
    ax.set_title(f"{point}: per-head norm (0 = all-zero head)")
    ax.legend(fontsize="small")

    ax = axes[1]
    partials = {rec.rank: float(np.linalg.norm(rec.float64())) for rec in sub.iter(point="o_proj_partial")}
    total = sum(partials.values()) or 1.0
    ranks = sorted(partials)
    ax.bar([str(r) for r in ranks], [partials[r] / total for r in ranks], color="tab:orange")
    ax.set_xlabel("rank")
    ax.set_title("share of the o_proj all-reduce")

    ax = axes[2]
    hidden = {rec.rank: rec.float64() for rec in sub.iter(point="hidden")}
    if hidden:
        base = hidden[min(hidden)]
        ranks = sorted(hidden)
        gaps = [float(np.abs(hidden[r] - base).max()) for r in ranks]
        ax.bar([str(r) for r in ranks], gaps, color="tab:green")
        if not any(gaps):
            ax.text(0.5, 0.5, f"bit-identical on {len(ranks)}/{len(ranks)} ranks", ha="center", va="center",
                    transform=ax.transAxes)
    ax.set_xlabel("rank")
    ax.set_title("max |hidden - hidden of rank 0|")
    fig.tight_layout()
    return fig
