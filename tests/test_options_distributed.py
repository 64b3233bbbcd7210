"""Ranks that disagree on an option of a loss across processes (2 CPU processes, gloo): every loss,
every kind of option (float, 0-dim tensor, bool, string, int, None), each raising the same
ValueError on every rank that names the option and each rank's value; and options that agree as
numbers, or that shape only a rank's own work, passing. One launch runs every case."""
import torch

import lossforge_kernels as lf
from tests import distributed


def _inputs(rank):
    g = torch.Generator().manual_seed(rank)
    rows = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return rows, torch.randint(0, 3, (6,), generator=g)


def _ce(rank, input=None, **opts):
    rows, _ = _inputs(rank)
    target = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(1))  # the same on every rank
    return lf.cross_entropy(rows(6, 5) if input is None else input, target, **opts)


def _linear_ce(rank, **opts):
    rows, _ = _inputs(rank)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # replicated
    target = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(1))
    return lf.linear_cross_entropy(x, rows(5, 4), target, **opts)


def _info_nce(rank, **opts):
    rows, _ = _inputs(rank)
    return lf.info_nce(rows(6, 4), rows(6, 4), **opts)


def _info_nce_direct(rank, **opts):
    """The distributed function as the public one calls it with a temperature."""
    from lossforge_kernels.distributed import contrastive

    rows, _ = _inputs(rank)
    defaults = dict(symmetric=True, normalize=True, reduction="mean", backend="reference")
    return contrastive.info_nce(rows(6, 4), rows(6, 4), None, **{**defaults, **opts})


def _supcon(rank, **opts):
    rows, labels = _inputs(rank)
    return lf.supcon_loss(rows(6, 4), labels, **opts)


def _siglip(rank, logit_scale=10.0, logit_bias=-10.0, **opts):
    rows, _ = _inputs(rank)
    return lf.siglip_loss(rows(6, 4), rows(6, 4), logit_scale, logit_bias, **opts)


def _triplet(rank, **opts):
    rows, labels = _inputs(rank)
    return lf.triplet_loss(rows(6, 4), labels, **opts)


# (loss, option, rank 0's value, rank 1's value): the messages show the values as repr does
DISAGREEING = [
    ("cross_entropy", "label_smoothing", 0.1, 0.2),
    ("cross_entropy", "ignore_index", -100, 3),
    ("cross_entropy", "softcap", None, 30.0),
    ("cross_entropy", "z_loss", 0.0, 1e-4),
    ("cross_entropy", "focal_gamma", 0.0, 2.0),
    ("cross_entropy", "focal_alpha", 0.25, None),
    ("cross_entropy", "reduction", "mean", "sum"),
    ("linear_cross_entropy", "label_smoothing", 0.0, 0.1),
    ("linear_cross_entropy", "ignore_index", -100, 0),
    ("linear_cross_entropy", "reduce_input_grad", True, False),
    ("linear_cross_entropy", "reduction", "sum", "none"),
    ("info_nce", "logit_scale", 14.0, 2.0),
    ("info_nce", "symmetric", True, False),
    ("info_nce", "normalize", True, False),
    ("info_nce", "reduction", "mean", "none"),
    ("info_nce_direct", "temperature", 0.07, 0.5),
    ("supcon_loss", "temperature", 0.07, 0.5),
    ("supcon_loss", "normalize", False, True),
    ("supcon_loss", "reduction", "none", "mean"),
    ("siglip_loss", "logit_scale", 10.0, 10.5),
    ("siglip_loss", "logit_bias", -10.0, -9.0),
    ("siglip_loss", "normalize", True, False),
    ("siglip_loss", "reduction", "sum", "mean"),
    ("triplet_loss", "margin", 0.2, 0.3),
    ("triplet_loss", "mining", "batch_hard", "semi_hard"),
    ("triplet_loss", "distance", "euclidean", "cosine"),
    ("triplet_loss", "soft_margin", False, True),
    ("triplet_loss", "normalize", True, False),
    ("triplet_loss", "reduction", "mean", "sum"),
]
CALLS = {"cross_entropy": _ce, "linear_cross_entropy": _linear_ce, "info_nce": _info_nce,
         "info_nce_direct": _info_nce_direct, "supcon_loss": _supcon, "siglip_loss": _siglip,
         "triplet_loss": _triplet}
TENSOR = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
# (loss, what the message names, the call on rank r, how it shows rank 0's and rank 1's values)
SPECIAL = [
    ("cross_entropy", "dtype", lambda r, pg: _ce(r, input=torch.randn(6, 5, dtype=(torch.float64, torch.float32)[r]),
                                                  process_group=pg), "torch.float64", "torch.float32"),
    ("cross_entropy", "weight", lambda r, pg: _ce(r, weight=(None, torch.rand(5, dtype=torch.float64))[r],
                                                   process_group=pg), "None", "a tensor"),
    ("cross_entropy", "target", lambda r, pg: lf.cross_entropy(
        torch.randn(6, 5, dtype=torch.float64), (torch.zeros(6, dtype=torch.long),
                                                 torch.full((6, 5), 0.2, dtype=torch.float64))[r],
        process_group=pg), "'class indices'", "'probabilities'"),
    ("info_nce", "logit_scale", lambda r, pg: _info_nce(r, logit_scale=TENSOR((3.0, 3.5)[r]), process_group=pg),
     "tensor(3.0)", "tensor(3.5)"),
    ("info_nce", "logit_scale", lambda r, pg: _info_nce(r, logit_scale=(4.0, TENSOR(4.0))[r], process_group=pg),
     "4.0", "tensor(4.0)"),
    ("siglip_loss", "logit_bias", lambda r, pg: _siglip(r, logit_bias=(-1.0, TENSOR(-1.0))[r], process_group=pg),
     "-1.0", "tensor(-1.0)"),
    ("siglip_loss", "logit_scale", lambda r, pg: _siglip(
        r, logit_scale=TENSOR((2.0, 2.0 + 2 ** -40)[r]).requires_grad_(True), process_group=pg),
     "tensor(2.0)", f"tensor({2.0 + 2 ** -40!r})"),
    ("supcon_loss", "features", lambda r, pg: lf.supcon_loss(torch.randn(6, 3 + r, dtype=torch.float64),
                                                             torch.zeros(6, dtype=torch.long), process_group=pg),
     "3", "4"),
]


def _call(loss, name, values, pg):
    def run(rank):
        return CALLS[loss](rank, **{name: values[rank]}, process_group=pg)
    return run


def _message(call, rank):
    try:
        call(rank)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _worker(rank, world):
    import os

    import torch.distributed as dist

    pg = dist.group.WORLD
    got = [_message(_call(loss, name, (a, b), pg), rank) for loss, name, a, b in DISAGREEING]
    got += [_message(lambda r, call=call: call(r, pg), rank) for _, _, call, _, _ in SPECIAL]
    # the public info_nce hands the distributed one 1 / temperature or the temperature itself
    got.append(_message(lambda r: _info_nce(r, temperature=(0.07, 0.5)[r], process_group=pg), rank))
    # options that agree as numbers, and those that shape only a rank's own work
    agreeing = [lambda r: _siglip(r, logit_bias=(0.0, -0.0)[r], process_group=pg),
                lambda r: _supcon(r, temperature=(1, 1.0)[r], process_group=pg),
                lambda r: _siglip(r, logit_scale=(TENSOR(3.0), TENSOR(3.0).float())[r], logit_bias=TENSOR(-2.0),
                                  process_group=pg),
                lambda r: _linear_ce(r, chunk_size=(2, 5)[r], process_group=pg),
                lambda r: _info_nce(r, backend=("auto", "reference")[r], process_group=pg)]
    got += [_message(call, rank) for call in agreeing]
    os.environ["LOSSFORGE_DISTRIBUTED_CHECKS"] = "0"  # unchecked: no error, no hang
    got.append(_message(lambda r: _supcon(r, temperature=(0.1, 0.2)[r], process_group=pg), rank))
    os.environ.pop("LOSSFORGE_DISTRIBUTED_CHECKS")
    # ranks calling different losses: each names its own loss, both name the disagreement
    got.append(_message(lambda r: (_triplet, _supcon)[r](r, process_group=pg), rank))
    return got


def test_ranks_that_disagree_on_any_option_get_the_same_error_naming_it():
    ranks = distributed.run(2, _worker)
    for r, loss in enumerate(("triplet_loss", "supcon_loss")):
        assert ranks[r].pop() == (f"{loss}(process_group=...): ranks disagree on loss: rank 0 has 'triplet_loss', "
                                  f"rank 1 has 'supcon_loss'")
    assert ranks[0] == ranks[1]  # the same error on every rank, after the same one collective
    got = ranks[0]
    want = [f"{loss.removesuffix('_direct')}(process_group=...): ranks disagree on {name}: "
            f"rank 0 has {a!r}, rank 1 has {b!r}" for loss, name, a, b in DISAGREEING]
    want += [f"{loss}(process_group=...): ranks disagree on {name}: rank 0 has {a}, rank 1 has {b}"
             for loss, name, _, a, b in SPECIAL]
    failures = [f"want {w!r}\n got {g!r}" for w, g in zip(want, got) if g != w]
    temperature = got[len(want)]
    want_temperature = "info_nce(process_group=...): ranks disagree on temperature: rank 0 has 0.07, rank 1 has 0.5"
    if temperature != want_temperature:
        failures.append(f"want {want_temperature!r}\n got {temperature!r}")
    failures += [f"agreeing case {i}: {g!r}" for i, g in enumerate(got[len(want) + 1:]) if g != "no error"]
    assert not failures, "\n".join(failures)
