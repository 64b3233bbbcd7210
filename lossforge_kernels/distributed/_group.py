"""What every distributed loss needs from torch.distributed: agreement between ranks, gathers that carry
gradients back to the rank that owns each row, and the gradient convention under data parallelism.

Agreement: before its first collective a call all-gathers a short int64 record (the loss, every option
by name, feature size, dtype and each rank's sizes) over the loss's group and checks it on every
rank, so a mismatch raises the same ValueError everywhere, naming the option and each rank's value,
instead of a hang or a wrong answer in a later collective. Options are compared exactly (a float by
its float64 bits; a 0-dim tensor such as a learnable logit_scale by its value, read on the device
into the same record). On a CPU (gloo) group that costs nothing; on a GPU group it is one small
device-to-host copy per call, which also gives every rank the others' batch sizes (uneven batches
work). LOSSFORGE_DISTRIBUTED_CHECKS=0 skips it: sizes are then assumed equal on every rank, unchecked.

Gradients of global-batch losses (data parallelism): every rank returns the global loss L; its
autograd graph carries W times the rank's share of L (its rows' part), and gathered rows send their
gradients back to their owner. DistributedDataParallel averages parameter gradients over the W
ranks, so training gives the gradients of L on the concatenated batch, as one process would.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import struct

import torch
import torch.distributed as dist

from .._once_differentiable import differentiable_once, keep_anchor

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


def checks_enabled() -> bool:
    return os.environ.get(ENV_CHECKS, "1") not in ("0",)


# The agreement record: [options, sizes, a slot per option, the sizes, zeros up to RECORD_WORDS]. Every
# call of every loss exchanges the same length, so ranks that call different losses still meet.
# A slot is a kind and three words: an int or bool as is, a float as its float64 bits, a string or
# dtype as up to 24 bytes of UTF-8; a 0-dim tensor's value goes in on the device; a larger tensor
# (a class-weight vector, which ranks may hold as their own slices) counts only as given.
RECORD_WORDS = 128
SLOT = 4
NONE, BOOL, INT, FLOAT, STR, DTYPE, SCALAR, TENSOR = range(8)


def _float_bits(x) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x) + 0.0))[0]  # + 0.0: -0.0 agrees with 0.0


def _slot(what: str, name: str, value) -> list[int]:
    if value is None:
        return [NONE, 0, 0, 0]
    if isinstance(value, bool):
        return [BOOL, int(value), 0, 0]
    if isinstance(value, numbers.Integral):
        return [INT, int(value), 0, 0]
    if isinstance(value, numbers.Real):
        return [FLOAT, _float_bits(value), 0, 0]
    if isinstance(value, torch.Tensor):
        return [SCALAR if value.dim() == 0 else TENSOR, 0, 0, 0]
    if isinstance(value, (str, torch.dtype)):
        text = str(value).encode()
        if len(text) > 8 * (SLOT - 1):
            raise ValueError(f"{what}: {name}={value!r} is too long to compare across processes")
        text = text.ljust(8 * (SLOT - 1), b"\0")
        return [STR if isinstance(value, str) else DTYPE] + [int.from_bytes(text[i:i + 8], "little", signed=True)
                                                              for i in range(0, len(text), 8)]
    raise TypeError(f"{what}: {name} of type {type(value).__name__} cannot be compared across processes")


def _shown(slot: list[int]) -> str:
    """An option's value as its slot holds it."""
    kind, word = slot[0], slot[1]
    if kind in (FLOAT, SCALAR):
        x = repr(struct.unpack("<d", struct.pack("<q", word))[0])
        return x if kind == FLOAT else f"tensor({x})"
    if kind in (STR, DTYPE):
        text = b"".join(w.to_bytes(8, "little", signed=True) for w in slot[1:]).rstrip(b"\0").decode()
        return repr(text) if kind == STR else text
    return {NONE: "None", BOOL: str(bool(word)), TENSOR: "a tensor"}.get(kind, str(word))


def _record(what: str, same: dict, per_rank: dict, device) -> torch.Tensor:
    words = [len(same), len(per_rank)]
    scalars = []  # (word, 0-dim tensor)
    for name, value in same.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            scalars.append((len(words) + 1, value))
        words += _slot(what, name, value)
    words += [int(v) for v in per_rank.values()]
    if len(words) > RECORD_WORDS:
        raise ValueError(f"{what}: too many options to compare across processes ({len(words)} words)")
    record = torch.tensor(words + [0] * (RECORD_WORDS - len(words)), dtype=torch.int64).to(device)
    for at, value in scalars:  # device to device: no host read
        record[at] = value.detach().to(device, torch.float64).add(0.0).view(torch.int64)
    return record


def agree(group: Group, what: str, same: dict, per_rank: dict) -> dict[str, list[int]]:
    """Every rank's `per_rank` values, after checking that all ranks pass the same `same` values.

    `same` maps option names to values (None, bool, int, float, str, torch.dtype, tensor), the loss's
    name first; `per_rank` maps names to ints. A mismatch raises the same ValueError on every rank,
    naming the option and each rank's value. Collective: all ranks of the group must call it.
    Without checks (LOSSFORGE_DISTRIBUTED_CHECKS=0) each per-rank value is assumed to be this
    rank's on every rank.
    """
    if not checks_enabled() or group.world == 1:
        return {k: [int(v)] * group.world for k, v in per_rank.items()}
    local = _record(what, same, per_rank, group.device)
    table = [torch.empty_like(local) for _ in range(group.world)]
    dist.all_gather(table, local, group=group.pg)
    rows = torch.stack(table).tolist()  # the one host read: every rank has the same table
    layouts = {tuple(r[:2]) for r in rows}
    names = list(same) if len(layouts) == 1 else list(same)[:1]  # in other layouts only the loss lines up
    for i, name in enumerate(names):
        slots = [r[2 + SLOT * i:2 + SLOT * (i + 1)] for r in rows]
        if any(s != slots[0] for s in slots):
            raise ValueError(f"{what}: ranks disagree on {name}: " +
                             ", ".join(f"rank {k} has {_shown(s)}" for k, s in enumerate(slots)))
    if len(layouts) > 1:
        raise ValueError(f"{what}: ranks called different losses or options (records of "
                         f"{[r[0] for r in rows]} options)")
    base = 2 + SLOT * len(same)
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


def _not_again(ctx) -> str:
    return ("lossforge: a gradient across processes (process_group=) is not differentiable again (double backward "
            "after create_graph=True); higher-order gradients need one process and backend='reference'")


# The backward of every cross-process Function: its collectives are not differentiable, so a
# create_graph backward's gradients refuse to be differentiated again, however they are asked.
once_differentiable = differentiable_once(_not_again)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the backward sums, over the ranks, the gradient
    of each rank's rows and hands it to that rank."""

    @staticmethod
    def forward(ctx, x, group, sizes):
        keep_anchor(ctx, x)
        ctx.group, ctx.sizes = group, sizes
        return _all_gather_rows(x, group, sizes)

    @staticmethod
    @once_differentiable
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
        keep_anchor(ctx, x)
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    @once_differentiable
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
