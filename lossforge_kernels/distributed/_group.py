"""What every distributed loss needs from torch.distributed: agreement between ranks, gathers that carry
gradients back to the rank that owns each row, and the gradient convention under data parallelism.

Agreement: before its first collective a call all-gathers a short int64 record (the loss, its options,
feature size, dtype and each rank's sizes) over the loss's group and checks it on every rank, so a
mismatch raises the same ValueError everywhere instead of a hang or a wrong answer in a later
collective. On a CPU (gloo) group that costs nothing; on a GPU group it is one small device-to-host
copy per call, which also gives every rank the others' batch sizes (uneven batches work).
LOSSFORGE_DISTRIBUTED_CHECKS=0 skips it: sizes are then assumed equal on every rank, unchecked.

Gradients of global-batch losses (data parallelism): every rank returns the global loss L; its
autograd graph carries W times the rank's share of L (its rows' part), and gathered rows send their
gradients back to their owner. DistributedDataParallel averages parameter gradients over the W
ranks, so training gives the gradients of L on the concatenated batch, as one process would.
"""
from __future__ import annotations

import dataclasses
import os
import zlib

import torch
import torch.distributed as dist

ENV_CHECKS = "LOSSFORGE_DISTRIBUTED_CHECKS"


@dataclasses.dataclass(frozen=True)
class Group:
    """A process group with what the losses ask of it."""
    pg: object
    world: int
    rank: int
    device: torch.device  # where the group's collectives want their tensors

    @property
    def reduce_scatters(self) -> bool:
        return dist.get_backend(self.pg) not in ("gloo",)


def resolve_group(process_group, device: torch.device) -> Group:
    """The group of a `process_group` argument (a ProcessGroup, or dist.group.WORLD)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first, e.g. under torchrun)")
    pg = dist.group.WORLD if process_group is dist.group.WORLD else process_group
    try:
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"process_group must be a torch.distributed ProcessGroup this rank belongs to, got "
                         f"{process_group!r} ({exc})") from exc
    if rank < 0:
        raise ValueError("process_group: this rank is not a member of the group")
    backend = dist.get_backend(pg)
    want = torch.device("cpu") if backend == "gloo" else device
    if backend != "gloo" and device.type == "cpu":
        raise ValueError(f"process_group uses the {backend} backend, which needs device tensors; got CPU tensors")
    return Group(pg, world, rank, want)


def fingerprint(*items) -> int:
    """A number that two ranks agree on when their options agree (crc32 of the options' repr)."""
    return zlib.crc32(repr(items).encode()) & 0x7FFFFFFF


def checks_enabled() -> bool:
    return os.environ.get(ENV_CHECKS, "1") not in ("0",)


def agree(group: Group, what: str, same: dict, per_rank: dict) -> dict[str, list[int]]:
    """Every rank's `per_rank` values, after checking that all ranks pass the same `same` values.

    `same` and `per_rank` map names to ints (the names are in the error messages). Collective: all
    ranks of the group must call it. Without checks (LOSSFORGE_DISTRIBUTED_CHECKS=0) each per-rank
    value is assumed to be this rank's on every rank.
    """
    names = list(same) + list(per_rank)
    mine = [int(v) for v in list(same.values()) + list(per_rank.values())]
    if not checks_enabled() or group.world == 1:
        return {k: [int(v)] * group.world for k, v in per_rank.items()}
    local = torch.tensor([len(mine)] + mine, dtype=torch.int64, device=group.device)
    table = [torch.empty_like(local) for _ in range(group.world)]
    dist.all_gather(table, local, group=group.pg)
    rows = [t.tolist() for t in table]  # the one host read: every rank has the same table
    if any(r[0] != len(mine) for r in rows):
        raise ValueError(f"{what}: ranks called different losses or options (records of lengths "
                         f"{[r[0] for r in rows]})")
    for i, name in enumerate(names[:len(same)]):
        values = [r[1 + i] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(f"{what}: ranks disagree on {name}: " +
                             ", ".join(f"rank {k} has {v}" for k, v in enumerate(values)))
    base = 1 + len(same)
    return {name: [r[base + i] for r in rows] for i, name in enumerate(per_rank)}


def all_gather_values(t: torch.Tensor, group: Group) -> torch.Tensor:
    """(W, *t.shape): every rank's `t` (the same shape on every rank), no gradient."""
    t = t.contiguous()
    src = t.to(group.device)
    out = [torch.empty_like(src) for _ in range(group.world)]
    dist.all_gather(out, src, group=group.pg)
    return torch.stack(out).to(t.device)


def all_reduce_value(t: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of `t` over the group, no gradient."""
    src = t.detach().clone().to(group.device)
    dist.all_reduce(src, group=group.pg)
    return src.to(t.device)


def global_loss(share: torch.Tensor, group: Group) -> torch.Tensor:
    """The global loss (the sum of every rank's share) whose gradient is that of W * share (see above)."""
    scaled = share * group.world
    return scaled + (all_reduce_value(share, group) - scaled).detach()


def _all_gather_rows(x, group, sizes):
    """Rows of every rank (rank r has sizes[r]), concatenated in rank order: one all_gather of
    equal-size padded blocks."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x
    src = padded.to(group.device)
    parts = [torch.empty_like(src) for _ in range(group.world)]
    dist.all_gather(parts, src, group=group.pg)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the backward sums, over the ranks, the gradient
    of each rank's rows and hands it to that rank."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return _all_gather_rows(x, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        group, sizes = ctx.group, ctx.sizes
        rank_rows = max(sizes)
        padded = grad.new_zeros((group.world, rank_rows, *grad.shape[1:]))
        for r, (start, n) in enumerate(zip(offsets(sizes), sizes)):
            padded[r, :n] = grad[start:start + n]
        src = padded.to(group.device)
        if group.reduce_scatters:
            mine = torch.empty_like(src[0])
            dist.reduce_scatter_tensor(mine, src.reshape(group.world * rank_rows, *grad.shape[1:]), group=group.pg)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's part
            dist.all_reduce(src, group=group.pg)
            mine = src[group.rank]
        return mine[:sizes[group.rank]].to(grad.device), None, None


def offsets(sizes: list[int]) -> list[int]:
    """Where each rank's rows start in the concatenation."""
    out, start = [], 0
    for n in sizes:
        out.append(start)
        start += n
    return out


def gather_rows(x: torch.Tensor, group: Group, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows of x (rank r holds sizes[r] of them) in rank order, with gradients to their owners."""
    if group.world == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, group, sizes)
    return _all_gather_rows(x.detach(), group, sizes)


class _SumGradients(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (a replicated input whose
    ranks each computed part of its gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_value(grad.contiguous(), ctx.group), None


def sum_gradients(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _SumGradients.apply(x, group) if group.world > 1 and x.requires_grad else x


class Ring:
    """A ring over the group: each step sends a tensor to the next rank and receives the previous
    rank's, asynchronously, so that a step's compute overlaps its exchange. Tensors must have the
    same shape on every rank (pad them)."""

    def __init__(self, group: Group):
        self.group = group
        ranks = dist.get_process_group_ranks(group.pg)
        self.next = ranks[(group.rank + 1) % group.world]
        self.prev = ranks[(group.rank - 1) % group.world]

    def start(self, *tensors):
        """Starts passing `tensors` on; returns (pending requests, the buffers that will hold the
        previous rank's)."""
        sent = [t.contiguous().to(self.group.device) for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group.pg) for t in sent] + \
              [dist.P2POp(dist.irecv, t, self.prev, self.group.pg) for t in received]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def finish(pending, received, device):
        for request in pending:
            request.wait()
        return [t.to(device) for t in received]
