"""A metric-learning model with batch-hard triplet loss: stock torch (the B x B distance matrix)
against lossforge's fused mining (never the B x B matrix).

Synthetic data: K identities, each a Gaussian cluster (noise larger than the clusters' spread), seen
4 times per batch; an MLP embedder.

    python examples/metric_learning_triplet.py            # on a GPU: batch 32768
    python examples/metric_learning_triplet.py --device cpu --steps 5 --batch 128
"""
from __future__ import annotations

import torch

import lossforge_kernels as lf

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common


def torch_batch_hard(emb, labels, margin):
    """The textbook form: all pairwise distances, the farthest positive and nearest negative per anchor."""
    x = emb.float()
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0).add(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    d_ap = dist.masked_fill(~same | eye, float("-inf")).amax(1)
    d_an = dist.masked_fill(same, float("inf")).amin(1)
    kept = torch.isfinite(d_ap) & torch.isfinite(d_an)
    return torch.relu(d_ap - d_an + margin)[kept].mean()


def main(argv=None):
    args = common.arguments(__doc__.splitlines()[0], 100, argv, batch=32768, identities=20000, dim=256, emb=128,
                            margin=0.2)
    device = torch.device(args.device)

    centers = 0.5 * torch.randn(args.identities, args.dim, generator=torch.Generator().manual_seed(3))

    def batches(step):
        gen = torch.Generator().manual_seed(300 + step)
        ids = torch.randint(0, args.identities, (args.batch // 4,), generator=gen).repeat_interleave(4)
        x = centers[ids] + torch.randn(args.batch, args.dim, generator=gen)
        return x.to(device), ids.to(device)

    def make_model():
        return torch.nn.Sequential(torch.nn.Linear(args.dim, 512), torch.nn.GELU(), torch.nn.Linear(512, args.emb))

    def ours(model, x, ids):
        return lf.triplet_loss(model(x), ids, margin=args.margin, mining="batch_hard", backend=args.backend)

    runs = [common.train("torch", make_model, batches, lambda m, x, ids: torch_batch_hard(m(x), ids, args.margin),
                         args.steps, device),
            common.train("lossforge", make_model, batches, ours, args.steps, device)]
    common.report("metric_learning_triplet", runs, args.out, args.device)
    return runs


if __name__ == "__main__":
    main()
