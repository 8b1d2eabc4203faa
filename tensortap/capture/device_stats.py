"""`mode=stats` on the device: the stats of a record computed with torch on the caller's stream.

The same definitions as the host side (tensortap.format.stats.compute), as small tensors ("parts")
that alone travel to the host; the writer turns them into the record's stats (format.stats.from_parts):

    "stats:scalars" f64 [4]  (nan, posinf, neginf, absmax)      float tensors: counts of NaN, +inf, -inf,
                                                                 absmax = max |x| over finite x (0 if none);
                                                                 integer tensors (not uint8/bool): (0, 0, 0, max |x|)
    "stats:norm"    f32 [T, H] norm[t, h] = sqrt(sum_d x[t, h, d]^2), summed in float64   head points [T, H, D]
    "stats:zeros"   i32 [T, H] zeros[t, h] = #{d : x[t, h, d] == 0}                      head points
    "stats:valid"   i32 [T]    valid[t] = #{k : idx[t, k] >= 0}                           index points [T, K]
    "stats:hash"    i64 [1]    sum_i bits_i * ((i mod 65521) + 1), wrapping mod 2^64      row points
                               (bits: the elements viewed as signed integers of their width, C order)

The caller's stream computes only `partials`, the fewest kernels that determine the parts; `finish`
assembles the parts from them (a few tiny operations, which the tap leaves to the writer, on the host):

    "part:buckets"  i64 [4]  #{x in bucket b}, b = #{c in (-inf, max finite, +inf) : c < x}: 0 for -inf,
                             1 finite, 2 +inf, 3 NaN (no comparison holds)      -> nan, posinf, neginf
    "part:absmax"   [] (x's dtype)  inf-norm of x with every non-finite value set to 0   -> absmax
    "part:min", "part:max"  [] integer tensors: absmax = max(-min, max), in float64 (as the host's)
    "part:norm"     f64 [T, H] -> "stats:norm" in float32
    "part:hash"     i64 []     -> "stats:hash" [1]
    "stats:zeros", "stats:valid" as they are

Inside a CUDA graph the real token count is known only at replay, so graph slots hold the global
partials per row instead (`partials(..., rows=True)`: "rows:buckets" [T, 4], "rows:absmax" [T],
"rows:min"/"rows:max" [T], "rows:hash" [T], each row's share with the whole tensor's hash weights).
`finish(partials, n)` reduces rows < n: counts add up, absmax is the max of the rows', the hash the
(wrapping) sum of theirs, so the parts are the same bits as those of x[:n].

Kernels on the caller's stream per point: float scalars 5 (bucketize, compare, count, nan_to_num,
inf-norm; float8 adds its cast to float32), head points 4 more (the float64 norm with its cast, the
zero count), integer scalars 1 (aminmax), valid 2, hash 2. Every one is a fixed-shape torch kernel
with no host sync, so the same code runs eagerly and inside CUDA-graph capture (the partials then
land in the graph's static slots).
"""

from __future__ import annotations

import numpy as np
import torch

from tensortap import vocab
from tensortap.capture import stats_kernel

HASH_MODULUS = 65521
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NO_ABSMAX = (torch.uint8, torch.bool)
_PER_ROW = ("part:norm", "stats:zeros", "stats:valid")  # one entry per row in either form: sliced to rows < n
_weights: dict[torch.device, torch.Tensor] = {}  # the longest weight vector made per device
_bounds_cache: dict = {}
_ids_cache: dict = {}


def parts(tensor: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
    """The stats parts of `tensor` at tap point `point` (see the module docstring), on its device."""
    return finish(partials(tensor, point))


def partials(tensor: torch.Tensor, point: str, rows: bool = False, empty=None) -> dict[str, torch.Tensor]:
    """What the caller's stream computes for the parts of `tensor` (module docstring), on its device;
    with `rows` (rows along dimension 0 of a tensor of at least one dimension), per row. `empty(shape,
    dtype)` makes the fused kernel's outputs (graph slots: views of the slot arena); torch's kernels
    make their own."""
    found = stats_kernel.plan(tensor, point)
    if found is not None:
        return stats_kernel.cells(tensor, point, empty, found)  # one kernel; per row, so it serves `rows` too
    return _torch_partials(tensor, point, rows)


def _torch_partials(tensor: torch.Tensor, point: str, rows: bool = False) -> dict[str, torch.Tensor]:
    """`partials` with torch's kernels: on the CPU, where Triton is missing, and for fp8 and float64."""
    kind = "rows:" if rows else "part:"
    out: dict[str, torch.Tensor] = {}
    if point in vocab.ROW_POINTS:
        out[kind + "hash"] = weighted_bits(tensor, rows)  # [T] or []
    if tensor.numel() == 0:
        return out
    if tensor.is_floating_point():
        x = tensor.float() if tensor.element_size() == 1 else tensor  # float8 -> float32, exact
        flat = x.reshape(x.shape[0], -1) if rows else x.reshape(-1)  # [T, M] or [N]
        buckets = torch.bucketize(flat, _bounds(x.dtype, x.device), out_int32=True)  # [T, M] or [N] in 0..3
        matches = buckets.unsqueeze(-1) == _bucket_ids(x.device)  # [T, M, 4] or [N, 4] bool
        out[kind + "buckets"] = matches.sum(dim=flat.dim() - 1)  # [T, 4] or [4] int64
        finite = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)  # [T, M] or [N]
        out[kind + "absmax"] = torch.linalg.vector_norm(finite, ord=float("inf"), dim=-1)  # [T] or []
        if point in vocab.HEAD_POINTS and x.dim() == 3:
            out["part:norm"] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64)  # [T, H]
            out["stats:zeros"] = (x == 0).sum(dim=-1, dtype=torch.int32)  # [T, H]
    elif tensor.dtype not in _NO_ABSMAX:
        flat = tensor.reshape(tensor.shape[0], -1) if rows else tensor.reshape(-1)  # [T, M] or [N]
        out[kind + "min"], out[kind + "max"] = torch.aminmax(flat, dim=-1)  # [T] or [] each
        if point in vocab.INDEX_POINTS and tensor.dim() == 2:
            out["stats:valid"] = (tensor >= 0).sum(dim=-1, dtype=torch.int32)  # [T]
    return out


def finish(tensors: dict, n: int | None = None) -> dict:
    """A record's tensors with its partials turned into the parts (module docstring), on their device;
    per-row partials give the parts of rows < n (all rows when n is None). Other tensors pass through."""
    return _as_torch(finish_on_host(tensors, n))


def finish_on_host(tensors: dict, n: int | None = None) -> dict:
    """`finish` as the writer runs it on the host (a record's `on_host`): the fused kernel's cells are
    reduced with numpy and stay numpy arrays, which the writer sends as they are."""
    if any(key.startswith("cells@") for key in tensors):
        return _from_cells(tensors, n)
    tensors = {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
               for key, value in tensors.items()}  # parts the writer attached as numpy views
    if any(key.startswith("rows:") for key in tensors):
        tensors = _first_rows(tensors, n)
    out = {}
    for key, value in tensors.items():
        if key == "part:hash":
            out["stats:hash"] = value.view(1)  # [1]
        elif key == "part:buckets":  # -inf, finite, +inf, NaN -> (nan, posinf, neginf, absmax)
            counts = torch.stack([value[3], value[2], value[0]]).to(torch.float64)  # [3]: nan, posinf, neginf
            out["stats:scalars"] = torch.cat([counts, tensors["part:absmax"].to(torch.float64).view(1)])  # [4]
        elif key == "part:min":  # integers: (0, 0, 0, max(-min, max)) in float64, as the host's Python ints
            low, high = value.to(torch.float64).view(1), tensors["part:max"].to(torch.float64).view(1)  # [1], [1]
            out["stats:scalars"] = torch.cat([low.new_zeros(3), torch.maximum(-low, high)])  # [4]
        elif key == "part:norm":
            out["stats:norm"] = value.float()  # [T, H]
        elif key not in ("part:absmax", "part:max"):
            out[key] = value
    return out


def _first_rows(tensors: dict, n: int | None) -> dict:
    """Per-row partials ("rows:*") reduced over rows < n to the global partials of x[:n] ("part:*");
    the per-row parts sliced. With no row left x[:n] is empty: only its hash (0) remains."""
    rows = tensors.get("rows:buckets", tensors.get("rows:min", tensors.get("rows:hash")))
    kept = rows[:n].shape[0] if rows is not None else 0
    out = {}
    for key, value in tensors.items():
        if key == "rows:hash":
            out["part:hash"] = value[:n].sum(dtype=torch.int64)  # [], wrapping like the device's sum
        elif kept == 0 and (key.startswith("rows:") or key in _PER_ROW):
            continue
        elif key == "rows:buckets":
            out["part:buckets"] = value[:n].sum(dim=0)  # [4]
        elif key in ("rows:absmax", "rows:max"):
            out["part:" + key[5:]] = value[:n].amax()  # []
        elif key == "rows:min":
            out["part:min"] = value[:n].amin()  # []
        elif key in _PER_ROW:
            out[key] = value[:n]  # [n, ...]
        else:
            out[key] = value
    return out


def _from_cells(tensors: dict, n: int | None) -> dict:
    """The parts of x[:n] from the fused kernel's partials per (row, group, chunk) (stats_kernel.py),
    reduced on the host with numpy: a few microseconds of the writer's time, not a kernel each."""
    out, cells = {}, {}
    for key, value in tensors.items():
        if key.startswith("cells@"):  # the kernel's one buffer: its outputs as its Plan lays them out
            cells = stats_kernel.plan_of(key).views(value if isinstance(value, np.ndarray) else value.cpu().numpy())
        else:
            out[key] = value
    cut = {key: value[:n] for key, value in cells.items()}  # [n, G, C, ...]: the real rows
    kept = next(iter(cut.values())).shape[0]
    if "hash" in cut:
        out["stats:hash"] = cut["hash"].sum(dtype=np.int64).reshape(1)  # [1], wrapping
    if kept == 0:  # x[:n] is empty: only its hash (0) remains
        return out
    if "buckets" in cut:  # -inf, finite, +inf, NaN -> (nan, posinf, neginf, absmax)
        counts = cut["buckets"].sum(axis=(0, 1, 2), dtype=np.int64)  # [4]
        absmax = float(cut["absmax"].max())
        out["stats:scalars"] = np.array([counts[3], counts[2], counts[0], absmax], dtype=np.float64)  # [4]
    if "min" in cut:  # integers: (0, 0, 0, max(-min, max)) in float64, as the host's Python ints
        low, high = float(cut["min"].min()), float(cut["max"].max())
        out["stats:scalars"] = np.array([0.0, 0.0, 0.0, max(-low, high)], dtype=np.float64)  # [4]
    if "sumsq" in cut:
        out["stats:norm"] = np.sqrt(cut["sumsq"].sum(axis=2)).astype(np.float32)  # [n, H]
        out["stats:zeros"] = cut["zeros"].sum(axis=2, dtype=np.int32)  # [n, H]
    if "valid" in cut:
        out["stats:valid"] = cut["valid"].sum(axis=(1, 2), dtype=np.int32)  # [n]
    return out


def _as_torch(parts: dict) -> dict:
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in parts.items()}


def _bounds(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(-inf, largest finite, +inf) in `dtype` on `device` [3], made by kernels (no host copy: a graph
    capture may be in progress) and cached outside captures."""
    key = (dtype, torch.device(device))
    b = _bounds_cache.get(key)
    if b is None:
        b = torch.full((3,), float("inf"), dtype=dtype, device=device)  # [3]
        b[0:1].fill_(float("-inf"))  # fill kernels: an element assignment would copy from the host
        b[1:2].fill_(torch.finfo(dtype).max)
        if not (b.is_cuda and torch.cuda.is_current_stream_capturing()):
            _bounds_cache[key] = b
    return b


def _bucket_ids(device: torch.device) -> torch.Tensor:
    """0, 1, 2, 3 as i32 [4] on `device`, made by a kernel and cached outside captures."""
    key = torch.device(device)
    ids = _ids_cache.get(key)
    if ids is None:
        ids = torch.arange(4, dtype=torch.int32, device=device)  # [4]
        if not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            _ids_cache[key] = ids
    return ids


def consensus_hash(tensor: torch.Tensor) -> torch.Tensor:
    """hash = sum_i bits_i * w_i (int64, wrapping), w_i = (i mod 65521) + 1, as i64 [1].

    Equal bytes give equal hashes; A decides "bit-identical across the TP group" from it."""
    return weighted_bits(tensor).view(1)  # [1]


def weighted_bits(tensor: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """sum_i bits_i * w_i as i64 [] (wrapping); with `rows`, each row's share h[t] = sum_j bits[t, j] *
    w[t * W + j] as i64 [T] (the hash of x[:n] is the wrapping sum of h[:n]). Two kernels: the multiply
    (which sign-extends the bits to int64) and the sum."""
    flat = tensor.contiguous().view(-1)  # [N]
    bits = flat.view(_SIGNED[flat.element_size()])  # [N], the elements as signed integers of their width
    weighted = bits * hash_weights(bits.numel(), bits.device)  # [N] int64
    if not rows:
        return weighted.sum(dtype=torch.int64)  # []
    count = tensor.shape[0]
    return weighted.view(count, bits.numel() // count if count else 0).sum(dim=1, dtype=torch.int64)  # [T]


def hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """w [N] int64 = (arange(N) mod 65521) + 1: a prefix of one cached vector per device. Inside a
    CUDA-graph capture a missing vector is computed in the graph (the kernels replay with it)."""
    device = torch.device(device)
    w = _weights.get(device)
    if w is not None and w.numel() >= n:
        return w[:n]  # [N]
    fresh = torch.arange(n, dtype=torch.int64, device=device).remainder_(HASH_MODULUS).add_(1)  # [N]
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _weights[device] = fresh  # a capture's tensor would hold its values only after a replay
    return fresh


def host_hash(array) -> int:
    """The same hash of a numpy array (for tests and host-side callers): a Python int."""
    import numpy as np

    flat = np.ascontiguousarray(array).reshape(-1)  # [N]
    bits = flat.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[flat.itemsize]).astype(np.int64)  # [N]
    w = (np.arange(flat.size, dtype=np.int64) % HASH_MODULUS) + 1  # [N]
    with np.errstate(over="ignore"):
        return int((bits * w).sum(dtype=np.int64))
