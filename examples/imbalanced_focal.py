"""An imbalanced classifier trained with the focal loss: stock torch against lossforge.

Synthetic data: C classes whose frequencies fall off as 1 / rank (a long tail), each class a
Gaussian cluster in D dimensions; an MLP classifier; focal loss with gamma = 2. Both runs start
from the same seed and see the same batches, so their loss curves agree up to rounding.

    python examples/imbalanced_focal.py                  # on a GPU: 32768 x 4096 classes
    python examples/imbalanced_focal.py --device cpu --steps 5 --batch 256 --classes 100
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import lossforge_kernels as lf

try:
    from . import _common as common
except ImportError:  # run as a script
    import _common as common


def torch_focal(logits, target, gamma):
    """The textbook form: (1 - p_t)^gamma * CE, averaged over the batch."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def main(argv=None):
    args = common.arguments(__doc__.splitlines()[0], 100, argv, batch=32768, classes=4096, dim=256, gamma=2.0)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(args.classes, args.dim, generator=g)
    freq = 1.0 / torch.arange(1, args.classes + 1, dtype=torch.float64)

    def batches(step):
        gen = torch.Generator().manual_seed(100 + step)
        y = torch.multinomial(freq, args.batch, replacement=True, generator=gen)
        x = centers[y] + torch.randn(args.batch, args.dim, generator=gen)
        return x.to(device), y.to(device)

    def make_model():
        return torch.nn.Sequential(torch.nn.Linear(args.dim, 512), torch.nn.GELU(), torch.nn.Linear(512, args.classes))

    runs = [
        common.train("torch", make_model, batches, lambda m, x, y: torch_focal(m(x), y, args.gamma), args.steps,
                     device),
        common.train("lossforge", make_model, batches,
                     lambda m, x, y: lf.focal_loss(m(x), y, gamma=args.gamma, backend=args.backend), args.steps,
                     device),
    ]
    common.report("imbalanced_focal", runs, args.out, args.device)
    return runs


if __name__ == "__main__":
    main()
