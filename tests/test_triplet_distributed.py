"""Global-batch triplet mining on 2 and 4 CPU processes (gloo): every rule, distance and reduction,
anchors whose positives sit on other ranks or nowhere, against one process on the concatenated batch."""
import pytest
import torch

import lossforge_kernels as lf
from tests import distributed
from tests.test_contrastive_distributed import _check, _offset, _sizes

CASES = [dict(mining=m, distance=d, soft_margin=s, normalize=n)
         for m in ("batch_hard", "semi_hard", "batch_all")
         for d, s, n in (("euclidean", False, False), ("squared_euclidean", True, False), ("cosine", False, True))]


def _worker(rank, world):
    import torch.distributed as dist

    failures = []
    for i, opts in enumerate(CASES):
        for reduction in ("none", "mean", "sum"):
            g = torch.Generator().manual_seed(600 + i)
            sizes = _sizes(world, 5 * world + 2)
            b = sum(sizes)
            # no exact ties: the ranks' (B_r x B) distance blocks round differently from one process's
            # (B x B) block, so exactly tied candidates could resolve differently
            x = torch.randn(b, 4, generator=g, dtype=torch.float64)
            labels = torch.randint(0, 3, (b,), generator=g)  # classes spread over every rank, unevenly
            labels[1] = 50  # an anchor without a positive
            lo, n = _offset(sizes, rank), sizes[rank]
            xl = x[lo:lo + n].clone().requires_grad_(True)
            loss = lf.triplet_loss(xl, labels[lo:lo + n], margin=0.3, reduction=reduction,
                                   process_group=dist.group.WORLD, **opts)
            xr = x.clone().requires_grad_(True)
            want = lf.triplet_loss(xr, labels, margin=0.3, reduction=reduction, **opts)
            what = f"triplet {opts} {reduction}"
            _check(f"{what} loss", loss, want[lo:lo + n] if reduction == "none" else want, failures)
            loss.backward(torch.ones_like(loss))
            want.backward(torch.full_like(want, float(world)))
            _check(f"{what} grad", xl.grad, xr.grad[lo:lo + n], failures)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [3])  # more than a pair, odd, uneven shards: the paths 2 and 4 took
def test_global_batch_triplet_mining_matches_one_process(world):
    distributed.run(world, _worker)
