"""`mode=stats` on a GPU in one Triton kernel per point: every partial of a record from one read.

`device_stats.partials` with torch costs a point 5 to 11 kernels (module docstring there); eager
that is ~8 us of launch per kernel on the caller's thread, in a graph as many nodes to replay. Here
one launch computes them all, per cell: the tensor is viewed as x [T, G, D] (G = heads for a head
point [T, H, D], else 1) and each cell (t, g) is cut into chunks of CHUNK elements, one program per
(cell, chunk). The outputs are exact partial sums that the writer reduces on the host
(`device_stats.finish`): counts and the wrapping hash add up in any order, maxima and minima are
order-free, and the norm's float64 sum of squares is added over chunks in float64.

    buckets  i32 [T, G, C, 4]  #{-inf}, #{finite}, #{+inf}, #{NaN}        float tensors
    absmax   f32 [T, G, C]     max |x| over finite x (0 if none)          float tensors
    min/max  i64 [T, G, C]     min and max                                integer tensors (not uint8/bool)
    sumsq    f64 [T, H, C]     sum x^2 in float64 (norm = sqrt over C)    head points
    zeros    i32 [T, H, C]     #{x == 0}                                  head points
    valid    i32 [T, 1, C]     #{x >= 0}                                  index points [T, K]
    hash     i64 [T, G, C]     sum bits_i * ((i mod 65521) + 1), i the flat index   row points

All of a point's outputs go into one uint8 buffer laid out by its `Plan` (made once per kind of tensor):
a record carries that buffer as "cells@<plan>", one allocation and one piece of the host copy. A plan
costs a point one dict lookup; the kernel's launch (~20 us of host time on an H200's host) is most of
the rest. Rows are cells' first index, so a replay's num_tokens trims them as it trims "rows:*" partials.
Used where Triton imports (vLLM servers carry it) for CUDA tensors of the dtypes below; inside a
CUDA-graph capture only once the variant is compiled (a compile there could break the capture).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import torch

from tensortap import vocab

log = logging.getLogger("tensortap")

CHUNK = 2048  # elements per program: 8192 gave long rows (hidden [T, 6144]) one program each; 2048 cut the
# kernels' GPU time per glm5 graph step from 131 to 57 us (H200)
BLOCK = 1024  # elements per loop iteration of a program
HASH_MODULUS = 65521
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64)
_NO_MINMAX = (torch.uint8, torch.bool)
_OUTPUTS = ("buckets", "absmax", "min", "max", "sumsq", "zeros", "valid", "hash")  # the kernel's order
_NUMPY = {torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64), torch.float32: np.dtype(np.float32),
          torch.float64: np.dtype(np.float64)}
_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's FLOAT_KIND
MAX_PLANS = 4096  # kinds of tensor (a row count does not make a new kind)
_plans: dict = {}  # (shape past the rows, dtype, point, device index, 16-byte aligned) -> Plan
_by_key: dict = {}  # Plan.key -> Plan
_indices = itertools.count()  # plan indices: next() is atomic, so racing caller threads never share one
_said_full = False
_compiled: set = set()  # variants that ran once outside a capture
_kernel = None  # the Triton kernel, made on first use; False where Triton is missing


class Plan:
    """How `cells` lays out the outputs for one kind of tensor (its shape past the rows, dtype, point,
    device, alignment): all of them in one uint8 buffer [rows, row_bytes], row-major, each output's
    part of a row at a fixed 8-byte aligned offset in it. So a point allocates one buffer and launches
    one kernel with one output pointer, and any number of rows shares the plan (a replay's num_tokens
    trims the buffer's rows like any row-major array). Made once and kept (`_plans`); its `key`
    ("cells@<index>") names the buffer in a record, and `views` reads it on the host."""

    __slots__ = ("key", "parts", "row_bytes", "groups", "width", "chunks", "offsets", "flags", "variant")

    def __init__(self, tensor: torch.Tensor, point: str, index: int):
        head, index_point, hashed = kind = _point_kind(tensor, point)
        is_float = tensor.dtype in _FLOATS
        has_minmax = not is_float and tensor.dtype not in _NO_MINMAX
        self.key = f"cells@{index}"
        parts, at = [], 0
        for name, (shape, dtype) in layout(tensor, point).items():
            parts.append((name, at, shape[1:], _NUMPY[dtype]))  # the part of one row
            at += -(-math.prod(shape[1:]) * dtype.itemsize // 8) * 8
        self.parts = tuple(parts)  # (name, byte offset in a row, shape of a row's part, numpy dtype)
        self.row_bytes = -(-at // 16) * 16  # every row starts 16-byte aligned
        self.groups = tensor.shape[1] if head else 1  # G
        self.width = tensor.numel() // (tensor.shape[0] * self.groups)  # D: elements per cell
        self.chunks = -(-self.width // CHUNK)  # C
        where = {name: offset for name, offset, _, _ in parts}
        self.offsets = tuple(where.get(name, 0) for name in _OUTPUTS)  # byte offsets in a row, the kernel's order
        self.flags = dict(IS_FLOAT=is_float, FLOAT_KIND=_FLOAT_KIND.get(tensor.dtype, 0), MINMAX=has_minmax,
                          HEAD=head and is_float, INDEX=index_point and has_minmax, HASH=hashed, CHUNK=CHUNK, BLOCK=BLOCK)
        self.variant = _variant(tensor, kind)

    def views(self, flat) -> dict:
        """The outputs [rows, G, C, ...] as numpy arrays viewing `flat` (the buffer on the host: numpy
        uint8 [rows * row_bytes])."""
        rows = flat.size // self.row_bytes
        table = flat[:rows * self.row_bytes].reshape(rows, self.row_bytes)  # [rows, row_bytes]
        return {name: table[:, at:at + math.prod(shape) * dtype.itemsize].view(dtype).reshape((rows,) + shape)
                for name, at, shape, dtype in self.parts}  # [rows, *shape], strided by row_bytes


def plan(tensor: torch.Tensor, point: str) -> Plan | None:
    """The Plan for `tensor` at `point`, or None where the fused kernel cannot compute its partials (not
    CUDA, empty, a dtype it does not read, no Triton; inside a CUDA-graph capture, a variant not compiled
    yet: the first compile happens outside captures, the warm-up forward runs first). Then torch's
    kernels do."""
    if not tensor.is_cuda:
        return None
    found = _plans.get(_kind(tensor, point))  # a kept plan: the tensor's kind was checked when it was made
    if found is None:
        found = _plan_for(tensor, point) if _readable(tensor) and _get_kernel() is not None else None
        if found is None:
            return None
    elif not tensor.shape[0]:
        return None  # a kind seen before, with no rows this time
    if found.variant not in _compiled and torch.cuda.is_current_stream_capturing():
        return None
    return found


def _kind(tensor: torch.Tensor, point: str) -> tuple:
    """What a Plan is kept by: the shape past the rows, dtype, point, device index, 16-byte alignment."""
    return tensor.shape[1:], tensor.dtype, point, tensor.get_device(), tensor.data_ptr() % 16 == 0


def _plan_for(tensor: torch.Tensor, point: str) -> Plan | None:
    """The kept Plan of this kind of tensor, made now if new (None past MAX_PLANS kinds, said once: a run
    of ever new shapes past the rows gets torch's kernels past the bound)."""
    global _said_full
    kind = _kind(tensor, point)
    found = _plans.get(kind)
    if found is None:
        if len(_plans) >= MAX_PLANS:
            if not _said_full:
                _said_full = True
                log.warning("tensortap: %d kinds of tensor have a stats-kernel plan; new kinds get torch's "
                            "kernels (slower)", MAX_PLANS)
            return None
        found = Plan(tensor, point, next(_indices))  # a new index even when two threads race on one kind
        _by_key[found.key] = found
        _plans[kind] = found
    return found


def _readable(tensor: torch.Tensor) -> bool:
    """Rows to read, of a dtype the kernel reads."""
    if tensor.dim() == 0 or tensor.numel() == 0 or tensor.shape[0] == 0:
        return False
    return tensor.dtype in _FLOATS or tensor.dtype in _INTEGERS or tensor.dtype in _NO_MINMAX


def layout(tensor: torch.Tensor, point: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """The kernel's outputs for `tensor` at `point`: name -> (shape [T, G, C, ...], dtype) (module
    docstring), which its Plan places in one buffer; empty for uint8/bool outside the row points (no
    stats)."""
    head, index, hashed = _point_kind(tensor, point)
    is_float = tensor.dtype in _FLOATS
    has_minmax = not is_float and tensor.dtype not in _NO_MINMAX
    rows = tensor.shape[0]
    groups = tensor.shape[1] if head else 1
    width = tensor.numel() // (rows * groups)  # D: elements per cell
    grid = (rows, groups, -(-width // CHUNK))  # (T, G, C)
    out = {}
    if is_float:
        out["buckets"], out["absmax"] = (grid + (4,), torch.int32), (grid, torch.float32)
    if has_minmax:
        out["min"] = out["max"] = (grid, torch.int64)
    if head and is_float:
        out["sumsq"], out["zeros"] = (grid, torch.float64), (grid, torch.int32)
    if index and has_minmax:
        out["valid"] = (grid, torch.int32)
    if hashed:
        out["hash"] = (grid, torch.int64)
    return out


def plan_of(key: str) -> Plan:
    """The Plan a record's "cells@<index>" buffer was made by."""
    return _by_key[key]


def cells(tensor: torch.Tensor, point: str, empty=None, found: Plan | None = None) -> dict[str, torch.Tensor]:
    """The partials of `tensor` at `point` per (row, group, chunk), from one kernel into one buffer
    (module docstring): {plan.key: uint8 [rows * plan.row_bytes]}, or {} for uint8/bool outside the row
    points (no stats). `found`: its Plan, when the caller looked it up already. `empty(shape, dtype)`
    makes the buffer (inside a CUDA graph: a view of the tap's slot arena); by default torch.empty on
    the tensor's device."""
    if found is None:
        found = _plan_for(tensor, point) if _readable(tensor) else None
        if found is None:
            raise ValueError(f"the stats kernel cannot read this tensor ({tensor.dtype}, {tuple(tensor.shape)})")
    if not found.parts:
        return {}
    rows = tensor.shape[0]
    flat = tensor.contiguous().view(-1)  # [N]
    bits = flat.view(_SIGNED[flat.element_size()])  # [N]: the elements as signed integers of their width
    if empty is None:
        out = torch.empty(rows * found.row_bytes, dtype=torch.uint8, device=tensor.device)  # [rows * row_bytes]
    else:
        out = empty((rows * found.row_bytes,), torch.uint8)  # [rows * row_bytes]
    _get_kernel()[(rows * found.groups, found.chunks)](bits, found.width, found.chunks, found.groups, found.row_bytes,
                                                       out, *found.offsets, **found.flags)
    _compiled.add(found.variant)
    return {found.key: out}


def _point_kind(tensor: torch.Tensor, point: str) -> tuple[bool, bool, bool]:
    """(head point [T, H, D], index point [T, K], row point with a hash)."""
    return (point in vocab.HEAD_POINTS and tensor.dim() == 3, point in vocab.INDEX_POINTS and tensor.dim() == 2,
            point in vocab.ROW_POINTS)


def _variant(tensor: torch.Tensor, kind: tuple) -> tuple:
    """What Triton compiles a kernel for: the flags, the dtype and the input's 16-byte alignment (the
    sizes are not specialised on)."""
    return (tensor.dtype, tensor.device, kind, tensor.is_contiguous() and tensor.data_ptr() % 16 == 0)


def _get_kernel():
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception:  # no Triton (CPU builds), or one that cannot compile here: torch's kernels
            _kernel = False
    return _kernel or None


def _build():
    import triton
    import triton.language as tl

    offsets = ["at_buckets", "at_absmax", "at_min", "at_max", "at_sumsq", "at_zeros", "at_valid", "at_hash"]

    @triton.jit(do_not_specialize=["width", "chunks", "groups", "row_bytes"] + offsets)
    def stats_cells(bits_ptr, width, chunks, groups, row_bytes, out_ptr, at_buckets, at_absmax, at_min, at_max,
                    at_sumsq, at_zeros, at_valid, at_hash, IS_FLOAT: tl.constexpr, FLOAT_KIND: tl.constexpr,
                    MINMAX: tl.constexpr, HEAD: tl.constexpr, INDEX: tl.constexpr, HASH: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        cell = tl.program_id(0).to(tl.int64)  # (t, g) flattened
        chunk = tl.program_id(1).to(tl.int64)
        row_ptr = out_ptr + (cell // groups) * row_bytes  # row t of the one uint8 buffer [T, row_bytes] (Plan)
        out = (cell % groups) * chunks + chunk  # this program's entry in every output's [G, C] part of the row
        buckets_ptr = (row_ptr + at_buckets).to(tl.pointer_type(tl.int32))
        absmax_ptr = (row_ptr + at_absmax).to(tl.pointer_type(tl.float32))
        min_ptr = (row_ptr + at_min).to(tl.pointer_type(tl.int64))
        max_ptr = (row_ptr + at_max).to(tl.pointer_type(tl.int64))
        sumsq_ptr = (row_ptr + at_sumsq).to(tl.pointer_type(tl.float64))
        zeros_ptr = (row_ptr + at_zeros).to(tl.pointer_type(tl.int32))
        valid_ptr = (row_ptr + at_valid).to(tl.pointer_type(tl.int32))
        hash_ptr = (row_ptr + at_hash).to(tl.pointer_type(tl.int64))
        first = cell * width + chunk * CHUNK  # flat index of the chunk's first element
        end = tl.minimum(width - chunk * CHUNK, CHUNK)  # elements in this chunk
        n_ninf = tl.zeros([BLOCK], dtype=tl.int32)
        n_fin = tl.zeros([BLOCK], dtype=tl.int32)
        n_pinf = tl.zeros([BLOCK], dtype=tl.int32)
        n_nan = tl.zeros([BLOCK], dtype=tl.int32)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        sq = tl.zeros([BLOCK], dtype=tl.float64)
        n_zero = tl.zeros([BLOCK], dtype=tl.int32)
        n_valid = tl.zeros([BLOCK], dtype=tl.int32)
        lo = tl.full([BLOCK], 9223372036854775807, dtype=tl.int64)
        hi = tl.full([BLOCK], -9223372036854775807 - 1, dtype=tl.int64)
        h = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(0, CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)  # [BLOCK] within the chunk
            live = offs < end
            raw = tl.load(bits_ptr + first + offs, mask=live, other=0)  # [BLOCK] signed bits
            if HASH:
                weight = (first + offs) % 65521 + 1  # [BLOCK] int64
                h += raw.to(tl.int64) * weight  # wrapping, as the definition
            if IS_FLOAT:
                if FLOAT_KIND == 1:
                    v = raw.to(tl.bfloat16, bitcast=True).to(tl.float32)
                elif FLOAT_KIND == 2:
                    v = raw.to(tl.float16, bitcast=True).to(tl.float32)
                else:
                    v = raw.to(tl.float32, bitcast=True)
                nan = v != v
                pinf = v == float("inf")
                ninf = v == float("-inf")
                fin = live & ~nan & ~pinf & ~ninf
                n_nan += (live & nan).to(tl.int32)
                n_pinf += (live & pinf).to(tl.int32)
                n_ninf += (live & ninf).to(tl.int32)
                n_fin += fin.to(tl.int32)
                amax = tl.maximum(amax, tl.where(fin, tl.abs(v), 0.0))
                if HEAD:
                    v64 = v.to(tl.float64)
                    sq += v64 * v64  # masked lanes loaded 0
                    n_zero += (live & (v == 0.0)).to(tl.int32)
            if MINMAX:
                wide = raw.to(tl.int64)
                lo = tl.minimum(lo, tl.where(live, wide, 9223372036854775807))
                hi = tl.maximum(hi, tl.where(live, wide, -9223372036854775807 - 1))
                if INDEX:
                    n_valid += (live & (wide >= 0)).to(tl.int32)
        if HASH:
            tl.store(hash_ptr + out, tl.sum(h, axis=0))
        if IS_FLOAT:
            tl.store(buckets_ptr + out * 4 + 0, tl.sum(n_ninf, axis=0))
            tl.store(buckets_ptr + out * 4 + 1, tl.sum(n_fin, axis=0))
            tl.store(buckets_ptr + out * 4 + 2, tl.sum(n_pinf, axis=0))
            tl.store(buckets_ptr + out * 4 + 3, tl.sum(n_nan, axis=0))
            tl.store(absmax_ptr + out, tl.max(amax, axis=0))
            if HEAD:
                tl.store(sumsq_ptr + out, tl.sum(sq, axis=0))
                tl.store(zeros_ptr + out, tl.sum(n_zero, axis=0))
        if MINMAX:
            tl.store(min_ptr + out, tl.min(lo, axis=0))
            tl.store(max_ptr + out, tl.max(hi, axis=0))
            if INDEX:
                tl.store(valid_ptr + out, tl.sum(n_valid, axis=0))

    return stats_cells
