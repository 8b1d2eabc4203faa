"""Figures of one forward (step, layer, role, spec_pos): where attention went to zero and who fed
the all-reduce. Works on full dumps and on `mode=stats` dumps (the per-head norms are stats).

    fig = tensortap.plot.forward(d, step=0, layer=78, role="draft", spec_pos=0)
    fig = tensortap.plot.forwards([("bug", d1), ("fixed", d2)], step=0, role="draft", spec_pos=0)
    fig.savefig("draft.png")

Panels, one colour per rank in all of them:
  1. per-head L2 norm of the attention output, mean over tokens: n[h] = (1/T) sum_t ||x[t, h, :]||_2,
     by global head (head_offset + h), one line per rank; an all-zero head drops to 0;
  2. each rank's share of the row-parallel o_proj sum: s_r = ||p_r||_2 / sum_r' ||p_r'||_2;
  3. per rank, max_i |hidden_r[i] - hidden_0[i]| (full dumps) or the consensus hash (stats dumps);
     when every rank agrees the panel says so in words instead of drawing empty bars.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tensortap.dump import Dump
from tensortap.errors import SelectionError
from tensortap.vocab import FORWARD_KEYS, HEAD_POINTS

# Points the per-head panel can draw: [T, H, D] tensors (their norms are the stats of a stats dump).
PLOT_POINTS = HEAD_POINTS


def rank_colour(rank: int):
    """The colour of a rank, the same in every panel and every figure."""
    import matplotlib

    return matplotlib.colormaps["tab10"](int(rank) % 10)


def one_forward(d: Dump) -> Dump:
    """`d` if it holds exactly one forward; else SelectionError listing the forwards and the options to add."""
    keys = sorted({tuple(rec.meta.get(k) for k in FORWARD_KEYS) for rec in d}, key=_order)
    if not keys:
        raise SelectionError("no records to plot in this selection")
    if len(keys) > 1:
        varying = [opt for i, opt in enumerate(("--step", "--layer", "--role", "--spec-pos"))
                   if len({k[i] for k in keys}) > 1]
        listing = ", ".join(_label(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise SelectionError(f"{len(keys)} forwards match ({listing}); pass {', '.join(varying)} to pick one")
    return d


def _order(key) -> tuple:
    return tuple((v is None, isinstance(v, str), v if isinstance(v, (int, float)) else 0, v if isinstance(v, str) else "")
                 for v in key)


def _label(key) -> str:
    from tensortap.diffing import forward_label

    step, layer, role, spec_pos = key
    return forward_label(role, layer, step, spec_pos)


@dataclass
class ForwardData:
    """What the three panels draw, read once from one forward of a dump."""

    title: str
    point: str
    norms: dict = field(default_factory=dict)  # rank -> (global heads [H], mean norm [H])
    shares: dict = field(default_factory=dict)  # rank -> ||o_proj_partial||_2 (full dumps)
    hidden_gap: dict = field(default_factory=dict)  # rank -> max |hidden_r - hidden_base|
    hidden_hash: dict = field(default_factory=dict)  # rank -> consensus hash (stats dumps)
    stats_only: bool = False
    hidden_present: bool = False


def read_forward(sub: Dump, point: str = "merged_out") -> ForwardData:
    """The panels' numbers for the one forward in `sub`, from tensors or from capture stats."""
    if point not in PLOT_POINTS:
        raise SelectionError(f"cannot plot per-head norms of {point!r}; choose one of {', '.join(PLOT_POINTS)}")
    first = sub[0].meta
    data = ForwardData(_label(tuple(first.get(k) for k in FORWARD_KEYS)), point)
    for rec in sorted(sub.iter(point=point), key=lambda r: r.rank):
        norm = _head_norms(rec)  # [T, H] or None
        if norm is None:
            continue
        heads = np.arange(norm.shape[1]) + int(rec.meta.get("head_offset") or 0)  # [H]
        data.norms[rec.rank] = (heads, norm.mean(axis=0))  # [H], [H]
        data.stats_only |= not rec.stored
    for rec in sub.iter(point="o_proj_partial"):
        if rec.stored:
            data.shares[rec.rank] = float(np.linalg.norm(rec.float64()))  # ||p_r||_2
    hidden = {rec.rank: rec for rec in sub.iter(point="hidden")}
    data.hidden_present = bool(hidden)
    stored = {r: rec.float64() for r, rec in hidden.items() if rec.stored}  # rank -> [T, C]
    if stored:
        base = stored[min(stored)]
        data.hidden_gap = {r: float(np.abs(x - base).max()) if x.shape == base.shape else float("inf")
                           for r, x in sorted(stored.items())}
    else:
        data.hidden_hash = {r: rec.stats["hash"] for r, rec in sorted(hidden.items()) if "hash" in rec.stats}
    return data


def _head_norms(rec) -> np.ndarray | None:
    """norm[t, h] = ||x[t, h, :]||_2 of a [T, H, D] record: its stats array, or from the tensor."""
    stats = rec.stats_array()
    if stats is not None and stats.dtype.names and "norm" in stats.dtype.names:
        return np.asarray(stats["norm"], dtype=np.float64)  # [T, H]
    if not rec.stored or len(rec.shape) != 3:
        return None
    x = rec.float64()  # [T, H, D]
    return np.sqrt(np.einsum("thd,thd->th", x, x))  # [T, H]


def forward(d: Dump, step=None, layer=None, role=None, spec_pos=None, point: str = "merged_out", rank=None):
    """A three-panel matplotlib Figure of the one forward selected from `d`."""
    sub = _select(d, step, layer, role, spec_pos, rank)
    return draw([("", read_forward(one_forward(sub), point))])


def forwards(dumps, step=None, layer=None, role=None, spec_pos=None, point: str = "merged_out", rank=None,
             share_scale: bool = True):
    """Several dumps side by side, one row each (`dumps`: [(label, Dump)]), the same forward of each;
    with `share_scale` the rows share their y-scales, so the runs compare at a glance."""
    rows = [(label, read_forward(one_forward(_select(d, step, layer, role, spec_pos, rank)), point))
            for label, d in dumps]
    return draw(rows, share_scale=share_scale)


def _select(d: Dump, step, layer, role, spec_pos, rank) -> Dump:
    filters = {k: v for k, v in dict(step=step, layer=layer, role=role, rank=rank, spec_pos=spec_pos).items()
               if v is not None}
    return d.select(**filters) if filters else d


def draw(rows: list[tuple[str, ForwardData]], share_scale: bool = True):
    """The figure: one row of three panels per (label, data)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.8 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1, 1]})
    for (label, data), row in zip(rows, axes):
        _heads_panel(row[0], data, label)
        _share_panel(row[1], data)
        _hidden_panel(row[2], data)
    if share_scale and len(rows) > 1:
        drawn = [row[0] for row in axes if row[0].has_data()]  # the per-head panels with lines
        if drawn:
            top = max(ax.get_ylim()[1] for ax in drawn)
            for ax in drawn:
                ax.set_ylim(0, top)
        gaps = [row[2] for row in axes if row[2].has_data()]  # hidden panels with bars
        if gaps:
            top = max(ax.get_ylim()[1] for ax in gaps)
            for ax in gaps:
                ax.set_ylim(0, top)
    fig.tight_layout()
    return fig


def _heads_panel(ax, data: ForwardData, label: str) -> None:
    for rank, (heads, norms) in sorted(data.norms.items()):
        ax.plot(heads, norms, marker=".", linestyle="-", color=rank_colour(rank), label=f"rank {rank}")
    ax.set_xlabel("global head")
    ax.set_ylabel(f"mean ||{data.point}[t, h]|| over tokens")
    source = " (capture stats)" if data.stats_only else ""
    ax.set_title((f"{label}: " if label else "") + f"{data.title}: per-head norm of {data.point}{source}; 0 = all-zero head",
                 fontsize="medium")
    if data.norms:
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small", ncol=min(4, len(data.norms)))
    else:
        _words(ax, f"no {data.point} in this forward")


def _share_panel(ax, data: ForwardData) -> None:
    ax.set_title("share of the o_proj all-reduce", fontsize="medium")
    ax.set_xlabel("rank")
    ax.set_ylabel("||o_proj_partial_r|| / sum")
    total = sum(data.shares.values())
    if not data.shares:
        _words(ax, "o_proj_partial not in the dump" if not data.stats_only else "needs mode=full\n(stats keep no norm)")
        return
    if total == 0:
        _words(ax, f"all {len(data.shares)} partials are zero")
        return
    ranks = sorted(data.shares)
    ax.bar([str(r) for r in ranks], [data.shares[r] / total for r in ranks], color=[rank_colour(r) for r in ranks])
    ax.set_ylim(0, 1)


def _hidden_panel(ax, data: ForwardData) -> None:
    ax.set_title("hidden after the all-reduce", fontsize="medium")
    ax.set_xlabel("rank")
    if data.hidden_gap:
        ranks = sorted(data.hidden_gap)
        gaps = [data.hidden_gap[r] for r in ranks]
        ax.set_ylabel(f"max |hidden - hidden of rank {ranks[0]}|")
        if not any(gaps):
            _words(ax, f"identical\nbit-exact on {len(ranks)}/{len(ranks)} ranks")
            return
        finite = [g if np.isfinite(g) else 0.0 for g in gaps]
        ax.bar([str(r) for r in ranks], finite, color=[rank_colour(r) for r in ranks])
        for r, g in zip(ranks, gaps):
            if not np.isfinite(g):
                ax.annotate("shape differs", (str(r), 0), ha="center", va="bottom", fontsize="small")
        return
    ax.set_ylabel("consensus hash")
    if data.hidden_hash:
        ranks = sorted(data.hidden_hash)
        groups = len(set(data.hidden_hash.values()))
        same = sum(1 for r in ranks if data.hidden_hash[r] == data.hidden_hash[ranks[0]])
        _words(ax, f"identical\nsame hash on {same}/{len(ranks)} ranks" if groups == 1 else
               f"differs\n{groups} distinct hashes on {len(ranks)} ranks")
    elif data.hidden_present:
        _words(ax, "no consensus hash\nin this stats dump")
    else:
        _words(ax, "hidden not in the dump")


def _words(ax, text: str) -> None:
    """Say it in words on an axis that has nothing to draw (no empty -0.04..0.04 axes)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize="large")
