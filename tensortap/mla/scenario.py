"""The decode loop: a target layer and an MTP-style draft layer over DCP-sharded caches.

Per step, every request decodes one token with the target layer; then the draft layer runs
`spec_tokens` times, each pass fed the RMS-normed hidden state of the pass before (the first
fed the target's), as recursive MTP does. Both layers' caches and block tables are sharded by
the process group (the target's DCP size). The draft's parallel config comes from
`create_draft_parallel_config`, which drops the DCP size unless `fixed`.

    run_on_this_rank(Scenario(preset="glm5"), tap_dir="tap")    # under torchrun
    spawn(run_rank, 4, kwargs=dict(scenario=..., tap_dir=...))   # in-process ranks
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import tensortap
from tensortap.mla import sharding
from tensortap.mla.config import PRESETS, MLAConfig, ParallelConfig, create_draft_parallel_config
from tensortap.mla.model import DecodeMetadata, MLALayer, ProcessGroups, _randn, rms_norm

DEFAULT_PROMPTS = {"tiny": (37, 50), "glm5": (4100, 3000)}


@dataclass(frozen=True)
class Scenario:
    """Everything that decides a run. Identical on every rank."""

    preset: str = "tiny"
    ranks: int = 4  # TP size = world size
    dcp: int = 4  # the target's DCP size: the process-group layout
    interleave: int = 1
    backend: str = "ag_rs"
    fixed: bool = False
    steps: int = 3
    spec_tokens: int = 2
    prompt_lens: tuple[int, ...] | None = None
    seed: int = 0
    target_layer: int = 77
    draft_layer: int = 78
    dtype: str = "float32"
    cuda_graph: bool = False  # capture the whole step (target + draft passes) once, replay it per step
    static_shapes: bool = False  # the graph's sync-free code path, run eagerly (cuda_graph implies it)

    def __post_init__(self):
        if self.cfg.block_size % self.interleave:
            raise ValueError(f"cp_kv_cache_interleave_size {self.interleave} must divide the block size "
                             f"{self.cfg.block_size} (vLLM asserts it too)")

    @property
    def cfg(self) -> MLAConfig:
        return PRESETS[self.preset]

    @property
    def prompts(self) -> tuple[int, ...]:
        return tuple(self.prompt_lens) if self.prompt_lens else DEFAULT_PROMPTS.get(self.preset, (37, 50))

    @property
    def max_len(self) -> int:
        return max(self.prompts) + self.steps + self.spec_tokens

    def target_parallel(self) -> ParallelConfig:
        return ParallelConfig(self.ranks, self.dcp, self.interleave, self.backend)

    def draft_parallel(self) -> ParallelConfig:
        return create_draft_parallel_config(self.target_parallel(), self.ranks, fixed=self.fixed)


def allocate_block_table(scn: Scenario, dcp_size: int, rank: int) -> tuple[torch.Tensor, int]:
    """This rank's block table [R, nb] (shuffled physical blocks, so addressing errors show) and its block count."""
    block_size = scn.cfg.block_size
    width = math.ceil(scn.max_len / (block_size * dcp_size))  # virtual blocks of bs*N tokens
    requests = len(scn.prompts)
    num_blocks = requests * width
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(scn.seed * 7919 + rank))
    return order.view(requests, width).to(torch.int32), num_blocks


def prompt_entries(cfg: MLAConfig, seed: int, layer: int, request: int, length: int):
    """The cache entries a prefill left for one request: latent [L, 512], rope [L, 64], index keys [L, d]."""
    base = 5_000_011 * (seed + 1) + 7_919 * layer + request
    latent = rms_norm(_randn(base, length, cfg.kv_lora_rank, scale=1.0))  # [L, 512]
    rope = _randn(base + 1, length, cfg.rope_dim, scale=1.0)  # [L, 64]
    keys = _randn(base + 2, length, cfg.index_dim, scale=1.0)  # [L, d]
    return latent, rope, keys


def step_hidden(scn: Scenario, step: int) -> torch.Tensor:
    """The hidden state entering the target layer at a step: [R, C], the same on every rank."""
    return _randn(scn.seed * 104_729 + step, len(scn.prompts), scn.cfg.hidden_size, scale=1.0)


def prefill(layer: MLALayer, scn: Scenario, block_table: torch.Tensor, groups: ProcessGroups, device) -> None:
    """Write every prompt token this rank owns into the layer's caches (sharded by the process group)."""
    for request, length in enumerate(scn.prompts):
        latent, rope, keys = prompt_entries(scn.cfg, scn.seed, layer.layer, request, length)
        positions = torch.arange(length, device=device)  # [L]
        req_ids = torch.full((length,), request, device=device)  # [L]
        slots = sharding.slot_mapping(positions, req_ids, block_table, scn.cfg.block_size, groups.dcp_size,
                                      groups.dcp_rank, scn.interleave)  # [L]
        layer.write_cache(slots.to(device), latent.to(device), rope.to(device), keys.to(device))


class DecodeRunner:
    """This rank's layers, caches and block table after prefill; `step(s)` decodes step s.

    With `scn.cuda_graph`, the first step captures the whole step (target and draft passes, the
    tap's slots included) into one CUDA graph, after one eager warm-up pass (phase "warmup"; the
    capture itself is phase "capture"); every step then copies its positions and input hidden
    state into the graph's static inputs and replays it inside scope(step=s, phase="run"). The
    batch shape is fixed by the scenario, so one graph serves every step. `static_shapes` runs
    the same sync-free code eagerly: the reference to compare a replayed dump with."""

    def __init__(self, scn: Scenario, groups: ProcessGroups, device="cpu"):
        if scn.cuda_graph and not str(device).startswith("cuda"):
            raise ValueError(f"cuda_graph needs a CUDA device, not {device!r}")
        self.scn, self.groups, self.device = scn, groups, device
        self.static = scn.cuda_graph or scn.static_shapes
        interleave = scn.interleave
        self.index_width = (math.ceil(scn.max_len / (groups.dcp_size * interleave)) * interleave
                            if self.static else None)  # >= every local length of the run
        self.graph = None
        self.dtype = getattr(torch, scn.dtype)
        table, num_blocks = allocate_block_table(scn, groups.dcp_size, groups.tp_rank)
        self.block_table = table.to(device)  # [R, nb]
        self.target = MLALayer(scn.cfg, scn.target_layer, "target", scn.target_parallel(), groups, num_blocks,
                               scn.seed, self.dtype, device)
        self.draft = MLALayer(scn.cfg, scn.draft_layer, "draft", scn.draft_parallel(), groups, num_blocks,
                              scn.seed, self.dtype, device)
        for layer in (self.target, self.draft):
            prefill(layer, scn, self.block_table, groups, device)
        self.prompts = torch.tensor(scn.prompts)  # [R], on the host: positions are host metadata

    def step(self, step: int, collect: bool = False) -> list[dict]:
        """The target pass, then `spec_tokens` recursive draft passes; with `collect`, each pass's tensors."""
        if self.scn.cuda_graph:
            if collect:
                raise ValueError("collect needs eager steps: a replayed graph runs no Python")
            self._replay(step)
            return []
        positions = self.prompts + step  # [R]
        hidden_in = step_hidden(self.scn, step).to(device=self.device, dtype=self.dtype)  # [R, C]
        return self._passes(step, positions, hidden_in, collect)

    def _passes(self, step: int, positions: torch.Tensor, hidden_in: torch.Tensor, collect: bool = False,
                on_device: bool = False) -> list[dict]:
        """Every pass of a step from positions [R] (host, or device with `on_device`) and hidden_in [R, C]."""
        scn, groups = self.scn, self.groups
        forwards = [("target", self.target, None, positions)]
        forwards += [("draft", self.draft, j, positions + j) for j in range(scn.spec_tokens)]
        trace = []
        for role, layer, spec_pos, pos in forwards:
            build = DecodeMetadata.build_on_device if on_device else DecodeMetadata.build
            extra = (self.index_width,) if on_device else ()
            meta = build(pos, self.block_table, scn.cfg.block_size, groups.dcp_size, groups.dcp_rank,
                         scn.interleave, *extra)
            if self.static and not on_device:
                meta.index_width = self.index_width
            record = dict(role=role, step=step, spec_pos=spec_pos, positions=pos, hidden_in=hidden_in.cpu()) \
                if collect else None
            with tensortap.scope(step=step, spec_pos=spec_pos):
                hidden = layer.forward(hidden_in, meta, record)  # [R, C]
            if collect:
                trace.append(dict(record, hidden=hidden.cpu()))
            hidden_in = rms_norm(hidden)  # recursive MTP: the next draft pass starts from this one
        return trace

    def _replay(self, step: int) -> None:
        positions = self.prompts + step  # [R]
        hidden_in = step_hidden(self.scn, step).to(dtype=self.dtype)  # [R, C] on the host
        if self.graph is None:
            self._capture(step, positions, hidden_in)
        self._positions.copy_(positions)  # the graph's static inputs
        self._hidden.copy_(hidden_in)
        requests = positions.shape[0]
        with tensortap.scope(step=step, phase="run", num_tokens=requests, req_ids=list(range(requests))):
            self.graph.replay()

    def _capture(self, step: int, positions: torch.Tensor, hidden_in: torch.Tensor) -> None:
        """One eager warm-up on a side stream, then the capture. The warm-up's cache writes are undone
        (the draft passes write positions ahead of the first replay's earlier passes)."""
        self._positions = positions.to(self.device)  # [R]
        self._hidden = hidden_in.to(self.device)  # [R, C]
        buffers = [b for layer in (self.target, self.draft) for b in (layer.cache, layer.index_cache)]
        saved = [b.data.clone() for b in buffers]  # [blocks, bs, width] each
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), tensortap.scope(phase="warmup"):
            self._passes(step, self._positions, self._hidden, on_device=True)
        torch.cuda.current_stream().wait_stream(side)
        for buffer, data in zip(buffers, saved):
            buffer.data.copy_(data)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), tensortap.scope(phase="capture"):
            self._passes(step, self._positions, self._hidden, on_device=True)


def run_decode(scn: Scenario, groups: ProcessGroups, device="cpu", collect: bool = False) -> list[dict]:
    """Run every step on this rank; with `collect`, return each forward's inputs and outputs."""
    runner = DecodeRunner(scn, groups, device)
    return [record for step in range(scn.steps) for record in runner.step(step, collect)]


def run_on_this_rank(scn: Scenario, tap_dir: str | None = None, device=None, collect: bool = False) -> list[dict]:
    """One rank's run under an initialised process group (torchrun, or `run_rank` below)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() != scn.ranks:
        scn = dataclasses.replace(scn, ranks=dist.get_world_size())
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    groups = ProcessGroups.build(scn.dcp)
    if tap_dir is not None:
        tensortap.configure(dir=tap_dir)
    try:
        return run_decode(scn, groups, device, collect)
    finally:
        if tap_dir is not None:
            tensortap.close()


def run_rank(rank: int, world_size: int, scenario: dict, tap_dir: str | None = None, collect: bool = False):
    """Entry point for tensortap.distributed.spawn (the scenario travels as a dict)."""
    scn = Scenario(**scenario)
    return run_on_this_rank(scn, tap_dir, collect=collect)
