"""Global-batch InfoNCE, SupCon and SigLIP on 2 and 4 CPU processes (gloo): each rank's loss is the
loss of one process on the concatenated batch, its embeddings get W times that loss's gradient
(so that DistributedDataParallel's average is right), with uneven batches and uneven labels; and
DDP training of a small model gives one process's parameter gradients."""
import pytest
import torch

import lossforge_kernels as lf
from tests import distributed

REDUCTIONS = ("none", "mean", "sum")


def _sizes(world, total):
    """Uneven local batch sizes, the first rank smallest."""
    base = [total // world] * world
    for r in range(total % world):
        base[world - 1 - r] += 1
    return base


def _offset(sizes, rank):
    return sum(sizes[:rank])


def _check(what, got, want, failures, rtol=1e-9):
    if not torch.allclose(got, want, rtol=rtol, atol=1e-11, equal_nan=True):
        failures.append(f"{what}: {got.flatten()[:4]} vs {want.flatten()[:4]}")


def _info_nce_cases(rank, world, failures):
    import torch.distributed as dist

    for symmetric, normalize, extra in ((True, True, 0), (True, False, 0), (False, True, 2)):
        for reduction in REDUCTIONS:
            g = torch.Generator().manual_seed(300 + 7 * extra + symmetric + 2 * normalize)
            sizes = _sizes(world, 4 * world + 3)
            b, d = sum(sizes), 6
            q = torch.randn(b, d, generator=g, dtype=torch.float64)
            k = torch.randn(b, d, generator=g, dtype=torch.float64)
            extras = torch.randn(world * extra, d, generator=g, dtype=torch.float64)
            scale = torch.tensor(3.0, dtype=torch.float64)
            lo, n = _offset(sizes, rank), sizes[rank]
            ql = q[lo:lo + n].clone().requires_grad_(True)
            kl = torch.cat([k[lo:lo + n], extras[rank * extra:(rank + 1) * extra]]).clone().requires_grad_(True)
            sl = scale.clone().requires_grad_(True)
            loss = lf.info_nce(ql, kl, logit_scale=sl, symmetric=symmetric, normalize=normalize,
                               reduction=reduction, process_group=dist.group.WORLD)
            # one process: the concatenated queries, all positives, then every rank's extra keys
            qr, kr, sr = q.clone().requires_grad_(True), torch.cat([k, extras]).requires_grad_(True), \
                scale.clone().requires_grad_(True)
            want = lf.info_nce(qr, kr, logit_scale=sr, symmetric=symmetric, normalize=normalize, reduction=reduction)
            what = f"info_nce sym={symmetric} norm={normalize} extra={extra} {reduction}"
            _check(f"{what} loss", loss, want[lo:lo + n] if reduction == "none" else want, failures)
            # every rank backpropagates its output (its rows, for 'none'): W times the gradient of the
            # sum of all ranks' outputs reaches each rank's embeddings, and the replicated scale's
            # gradients add up over the ranks to W times its gradient
            loss.backward(torch.ones_like(loss))
            want.backward(torch.full_like(want, float(world)))
            _check(f"{what} query grad", ql.grad, qr.grad[lo:lo + n], failures)
            own_keys = torch.cat([kr.grad[lo:lo + n], kr.grad[b + rank * extra:b + (rank + 1) * extra]])
            _check(f"{what} key grad", kl.grad, own_keys, failures)
            scale_grad = sl.grad.clone()
            dist.all_reduce(scale_grad)
            _check(f"{what} scale grad (summed over ranks)", scale_grad, sr.grad, failures)


def _supcon_cases(rank, world, failures):
    import torch.distributed as dist

    for reduction in REDUCTIONS:
        g = torch.Generator().manual_seed(400)
        sizes = _sizes(world, 5 * world + 1)
        b = sum(sizes)
        f = torch.randn(b, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 4, (b,), generator=g)
        labels[0] = 99  # a singleton class: its anchor has no positive anywhere
        labels[-3:] = 7  # a class whose members sit on the last rank only
        lo, n = _offset(sizes, rank), sizes[rank]
        fl = f[lo:lo + n].clone().requires_grad_(True)
        loss = lf.supcon_loss(fl, labels[lo:lo + n], temperature=0.2, reduction=reduction,
                              process_group=dist.group.WORLD)
        fr = f.clone().requires_grad_(True)
        want = lf.supcon_loss(fr, labels, temperature=0.2, reduction=reduction)
        mine = want[lo:lo + n] if reduction == "none" else want
        _check(f"supcon {reduction} loss", loss, mine, failures)
        loss.backward(torch.ones_like(loss))
        want.backward(torch.full_like(want, float(world)))
        _check(f"supcon {reduction} grad", fl.grad, fr.grad[lo:lo + n], failures)


def _siglip_cases(rank, world, failures):
    import torch.distributed as dist

    for extra in (0, 2):
        for reduction in REDUCTIONS:
            g = torch.Generator().manual_seed(500 + extra)
            sizes = _sizes(world, 3 * world + 2)
            b = sum(sizes)
            q = torch.randn(b, 4, generator=g, dtype=torch.float64)
            k = torch.randn(b, 4, generator=g, dtype=torch.float64)
            extras = torch.randn(world * extra, 4, generator=g, dtype=torch.float64)
            scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
            lo, n = _offset(sizes, rank), sizes[rank]
            ql = q[lo:lo + n].clone().requires_grad_(True)
            kl = torch.cat([k[lo:lo + n], extras[rank * extra:(rank + 1) * extra]]).clone().requires_grad_(True)
            sl, bl = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
            loss = lf.siglip_loss(ql, kl, sl, bl, reduction=reduction, process_group=dist.group.WORLD)
            qr, kr = q.clone().requires_grad_(True), torch.cat([k, extras]).requires_grad_(True)
            sr, br = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
            want = lf.siglip_loss(qr, kr, sr, br, reduction=reduction)
            what = f"siglip extra={extra} {reduction}"
            _check(f"{what} loss", loss, want[lo:lo + n] if reduction == "none" else want, failures)
            loss.backward(torch.ones_like(loss))
            want.backward(torch.full_like(want, float(world)))
            _check(f"{what} query grad", ql.grad, qr.grad[lo:lo + n], failures)
            own_keys = torch.cat([kr.grad[lo:lo + n], kr.grad[b + rank * extra:b + (rank + 1) * extra]])
            _check(f"{what} key grad", kl.grad, own_keys, failures)
            for name, mine, ref in (("scale", sl.grad, sr.grad), ("bias", bl.grad, br.grad)):
                total = mine.clone()
                dist.all_reduce(total)
                _check(f"{what} {name} grad (summed over ranks)", total, ref, failures)


def _ring_worker(rank, world):
    # InfoNCE and SigLIP on the ring of point-to-point exchanges, which groups of 8 or more ranks take
    import os

    os.environ["LOSSFORGE_RING_MIN_WORLD"] = "2"
    failures = []
    _info_nce_cases(rank, world, failures)
    _siglip_cases(rank, world, failures)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_info_nce_and_siglip_on_a_ring_match_one_process(world):
    distributed.run(world, _ring_worker)


def _worker(rank, world):
    failures = []
    _info_nce_cases(rank, world, failures)
    _supcon_cases(rank, world, failures)
    _siglip_cases(rank, world, failures)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_global_batch_contrastive_losses_match_one_process(world):
    distributed.run(world, _worker)


def _ddp_worker(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    image_tower, text_tower = torch.nn.Linear(6, 4).double(), torch.nn.Linear(5, 4).double()
    single = [m for m in (image_tower, text_tower)]
    sizes = _sizes(world, 3 * world + 1)  # uneven local batches
    g = torch.Generator().manual_seed(1)
    images = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    texts = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    # one process on the concatenated batch
    ref = [torch.nn.Linear(6, 4).double(), torch.nn.Linear(5, 4).double()]
    for m, src in zip(ref, single):
        m.load_state_dict(src.state_dict())
    lf.info_nce(ref[0](images), ref[1](texts), temperature=0.1).backward()
    want = [p.grad.clone() for m in ref for p in m.parameters()]
    # DDP on W processes, each with its rows
    ddp = [DistributedDataParallel(m) for m in single]
    lo, n = _offset(sizes, rank), sizes[rank]
    loss = lf.info_nce(ddp[0](images[lo:lo + n]), ddp[1](texts[lo:lo + n]), temperature=0.1,
                       process_group=dist.group.WORLD)
    loss.backward()
    got = [p.grad for m in single for p in m.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(got, want)), (got, want)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_ddp_training_gives_one_process_parameter_gradients(world):
    distributed.run(world, _ddp_worker)


def test_process_group_argument_is_checked():
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.info_nce(q, k, process_group=object())
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.siglip_loss(q, k, 10.0, -10.0, process_group="world")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup"):
        lf.SupConLoss(process_group=1)


# ---- the local rows' cross-entropy: the ops layer's, not the public function --------------------------

def test_global_batch_info_nce_takes_no_cross_entropy_function():
    import inspect

    from lossforge_kernels.distributed import contrastive as dist_contrastive

    assert "cross_entropy" not in inspect.signature(dist_contrastive.info_nce).parameters


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_local_rows_cross_entropy_matches_the_reference(backend, kernel_backend, monkeypatch):
    from lossforge_kernels.ops.cross_entropy import class_rows_loss
    from lossforge_kernels.reference.cross_entropy import cross_entropy_rows
    from tests.conftest import device_for

    monkeypatch.setenv("LOSSFORGE_BACKEND", kernel_backend if backend == "auto" else "")
    device = device_for(kernel_backend)
    g = torch.Generator().manual_seed(41)
    logits = (torch.randn(9, 13, generator=g) * 4).requires_grad_(True)
    target = torch.randint(0, 13, (9,), generator=g)
    wide = logits.detach().double().requires_grad_(True)
    want = cross_entropy_rows(wide, target)
    got = class_rows_loss(logits.to(device), target.to(device), backend=backend)
    assert got.shape == (9,) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    weights = torch.linspace(0.5, 1.5, 9, dtype=torch.float64)
    (got.cpu().double() * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(logits.grad.double(), wide.grad, rtol=1e-5, atol=1e-6)
