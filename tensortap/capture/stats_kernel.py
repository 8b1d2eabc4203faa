"""`mode=stats` on a GPU in one Triton kernel per point: every partial of a record from one read.

`device_stats.partials` with torch costs a point 5 to 11 kernels (module docstring there); eager
that is ~8 us of launch per kernel on the caller's thread, in a graph as many nodes to replay. Here
one launch computes them all, per cell: the tensor is viewed as x [T, G, D] (G = heads for a head
point [T, H, D], else 1) and each cell (t, g) is cut into chunks of CHUNK elements, one program per
(cell, chunk). The outputs are exact partial sums that the writer reduces on the host
(`device_stats.finish`): counts and the wrapping hash add up in any order, maxima and minima are
order-free, and the norm's float64 sum of squares is added over chunks in float64.

    "cells:buckets" i32 [T, G, C, 4]  #{-inf}, #{finite}, #{+inf}, #{NaN}     float tensors
    "cells:absmax"  f32 [T, G, C]     max |x| over finite x (0 if none)       float tensors
    "cells:min/max" i64 [T, G, C]     min and max                             integer tensors (not uint8/bool)
    "cells:sumsq"   f64 [T, H, C]     sum x^2 in float64 (norm = sqrt over C)  head points
    "cells:zeros"   i32 [T, H, C]     #{x == 0}                               head points
    "cells:valid"   i32 [T, 1, C]     #{x >= 0}                               index points [T, K]
    "cells:hash"    i64 [T, G, C]     sum bits_i * ((i mod 65521) + 1), i the flat index   row points

Rows are cells' first index, so a replay's num_tokens trims them as it trims "rows:*" partials.
Used where Triton imports (vLLM servers carry it) for CUDA tensors of the dtypes below; inside a
CUDA-graph capture only once the variant is compiled (a compile there could break the capture).
"""

from __future__ import annotations

import functools
import math

import torch

from tensortap import vocab

CHUNK = 2048  # elements per program: 8192 gave long rows (hidden [T, 6144]) one program each; 2048 cut the
# kernels' GPU time per glm5 graph step from 131 to 57 us (H200)
BLOCK = 1024  # elements per loop iteration of a program
HASH_MODULUS = 65521
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64)
_NO_MINMAX = (torch.uint8, torch.bool)
_compiled: set = set()  # variants that ran once outside a capture
_kernel = None  # the Triton kernel, made on first use; False where Triton is missing


def usable(tensor: torch.Tensor, point: str) -> bool:
    """Can the fused kernel compute this tensor's partials (else torch's kernels do)?"""
    if not tensor.is_cuda or tensor.dim() == 0 or tensor.numel() == 0 or tensor.shape[0] == 0:
        return False
    if tensor.dtype not in _FLOATS and tensor.dtype not in _INTEGERS and tensor.dtype not in _NO_MINMAX:
        return False
    if _get_kernel() is None:
        return False
    if torch.cuda.is_current_stream_capturing() and _variant(tensor, _point_kind(tensor, point)) not in _compiled:
        return False  # the first compile happens outside captures (the warm-up forward runs first)
    return True


def layout(tensor: torch.Tensor, point: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """The outputs `cells` makes for `tensor` at `point`: key -> (shape, dtype) (module docstring); empty
    for uint8/bool outside the row points (no stats)."""
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


def layout_bytes(tensor: torch.Tensor, point: str) -> int:
    """Bytes of the outputs `cells` makes for `tensor` at `point`."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout(tensor, point).values())


def cells(tensor: torch.Tensor, point: str, empty=None) -> dict[str, torch.Tensor]:
    """The partials of `tensor` at `point` per (row, group, chunk), from one kernel (module docstring).
    `empty(shape, dtype)` makes each output (inside a CUDA graph: views of the tap's slot arena);
    by default torch.empty on the tensor's device."""
    shapes = layout(tensor, point)
    if not shapes:
        return {}  # uint8/bool outside the row points: no stats
    head, index, hashed = _point_kind(tensor, point)
    is_float = tensor.dtype in _FLOATS
    has_minmax = not is_float and tensor.dtype not in _NO_MINMAX
    rows, groups, chunks = next(iter(shapes.values()))[0][:3]
    width = tensor.numel() // (rows * groups)  # D: elements per cell
    flat = tensor.contiguous().view(-1)  # [N]
    bits = flat.view(_SIGNED[flat.element_size()])  # [N]: the elements as signed integers of their width
    device = tensor.device
    if empty is None:
        empty = functools.partial(_empty_on, device)
    out = {"cells:" + key: empty(shape, dtype) for key, (shape, dtype) in shapes.items()}
    unused = torch.empty(0, device=device)
    buckets, absmax, low, high, sumsq, zeros, valid, digest = (
        out.get("cells:" + key, unused) for key in ("buckets", "absmax", "min", "max", "sumsq", "zeros", "valid", "hash"))
    float_kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}.get(tensor.dtype, 0)
    _get_kernel()[(rows * groups, chunks)](
        bits, width, chunks, buckets, absmax, low, high, sumsq, zeros, valid, digest,
        IS_FLOAT=is_float, FLOAT_KIND=float_kind, MINMAX=has_minmax, HEAD=head and is_float,
        INDEX=index and has_minmax, HASH=hashed, CHUNK=CHUNK, BLOCK=BLOCK)
    _compiled.add(_variant(tensor, (head, index, hashed)))
    return out


def _empty_on(device: torch.device, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


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

    @triton.jit(do_not_specialize=["width", "chunks"])
    def stats_cells(bits_ptr, width, chunks, buckets_ptr, absmax_ptr, min_ptr, max_ptr, sumsq_ptr, zeros_ptr,
                    valid_ptr, hash_ptr, IS_FLOAT: tl.constexpr, FLOAT_KIND: tl.constexpr, MINMAX: tl.constexpr,
                    HEAD: tl.constexpr, INDEX: tl.constexpr, HASH: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK: tl.constexpr):
        cell = tl.program_id(0).to(tl.int64)  # (t, g) flattened
        chunk = tl.program_id(1).to(tl.int64)
        out = cell * chunks + chunk  # this program's entry in every [T, G, C] output
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
