"""A gradient penalty across processes (2 CPU processes, gloo): the collectives' gradients are not
differentiable again, so every loss with a process_group refuses a second derivative, by backward()
or by autograd.grad with another path to the input, instead of dropping the gradient's own term.
One launch runs every loss."""
import torch

import lossforge_kernels as lf
from tests import distributed

LOSSES = {
    "cross_entropy": lambda x, labels: lf.cross_entropy(x, labels, process_group=torch.distributed.group.WORLD),
    "linear_cross_entropy": lambda x, labels: lf.linear_cross_entropy(
        x, torch.randn(5, 4, dtype=x.dtype, generator=torch.Generator().manual_seed(3)), labels,
        process_group=torch.distributed.group.WORLD),
    "info_nce": lambda x, labels: lf.info_nce(x, x.flip(0), process_group=torch.distributed.group.WORLD),
    "supcon_loss": lambda x, labels: lf.supcon_loss(x, labels, process_group=torch.distributed.group.WORLD),
    "siglip_loss": lambda x, labels: lf.siglip_loss(x, x.flip(0), 10.0, -10.0,
                                                    process_group=torch.distributed.group.WORLD),
    "triplet_loss": lambda x, labels: lf.triplet_loss(x, labels, mining="batch_all",
                                                      process_group=torch.distributed.group.WORLD),
}


def _worker(rank, world):
    out = {}
    for name, loss_of in LOSSES.items():
        g = torch.Generator().manual_seed(rank)
        leaf = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 2, 0, 1, 2]) if name != "linear_cross_entropy" else torch.tensor(
            [0, 4, 2, 3, 1, 4])  # linear CE's input and targets are replicated
        x = leaf * 1.0
        if name == "linear_cross_entropy":
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64,
                            requires_grad=True) * 1.0
        (grad,) = torch.autograd.grad(loss_of(x, labels), x, create_graph=True)
        penalty = grad.square().sum() + 1e-3 * x.square().sum()
        try:
            torch.autograd.grad(penalty, x)
            out[name] = "no error"
        except RuntimeError as exc:
            out[name] = str(exc)
    return out


def test_a_second_derivative_across_processes_is_refused():
    for got in distributed.run(2, _worker):
        for name, message in got.items():
            assert "not differentiable again" in message and "backend='reference'" in message, (name, message)
