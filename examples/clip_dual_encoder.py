"""A CLIP-style dual encoder at a large batch: symmetric InfoNCE with a learnable logit scale,
stock torch (the B x B logits) against lossforge's fused kernels (never the B x B matrix).

Synthetic pairs: a shared latent seen through two noisy random projections; two MLP towers.

    python examples/clip_dual_encoder.py                 # on a GPU: batch 32768
    python examples/clip_dual_encoder.py --device cpu --steps 5 --batch 128
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lossforge_kernels as lf

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common


class DualEncoder(torch.nn.Module):
    def __init__(self, dim_a, dim_b, width, emb):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(dim_a, width), torch.nn.GELU(), torch.nn.Linear(width, emb))
        self.b = torch.nn.Sequential(torch.nn.Linear(dim_b, width), torch.nn.GELU(), torch.nn.Linear(width, emb))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, xa, xb):
        return self.a(xa), self.b(xb), self.log_scale.exp()


def torch_clip(model, xa, xb):
    """The textbook form: normalise, s * A B^T, cross-entropy both ways."""
    a, b, s = model(xa, xb)
    logits = s * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def main(argv=None):
    args = common.arguments(__doc__.splitlines()[0], 100, argv, batch=32768, latent=64, dim=256, emb=256)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(2)
    proj_a, proj_b = torch.randn(args.latent, args.dim, generator=g), torch.randn(args.latent, args.dim, generator=g)

    def batches(step):
        gen = torch.Generator().manual_seed(200 + step)
        z = torch.randn(args.batch, args.latent, generator=gen)
        xa = z @ proj_a + 0.5 * torch.randn(args.batch, args.dim, generator=gen)
        xb = z @ proj_b + 0.5 * torch.randn(args.batch, args.dim, generator=gen)
        return xa.to(device), xb.to(device)

    def ours(model, xa, xb):
        a, b, s = model(xa, xb)
        return lf.info_nce(a, b, logit_scale=s, backend=args.backend)

    make = lambda: DualEncoder(args.dim, args.dim, 512, args.emb)  # noqa: E731
    runs = [common.train("torch", make, batches, torch_clip, args.steps, device),
            common.train("lossforge", make, batches, ours, args.steps, device)]
    common.report("clip_dual_encoder", runs, args.out, args.device)
    return runs


if __name__ == "__main__":
    main()
