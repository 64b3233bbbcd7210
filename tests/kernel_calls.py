"""One small call of every kernel family, forward and backward, on one backend:
`python -m tests.kernel_calls BACKEND DEVICE`. Run under AddressSanitizer on the CUDA emulation
(tests/test_cuda_emulation.py) and under compute-sanitizer on a GPU (python -m tests.gpu), so that a
memory error with the kernels' real index arithmetic fails. Shapes are odd and small: every kernel
meets a ragged edge, and a sanitizer run stays short."""
import sys

import torch

import lossforge_kernels as lf
from lossforge_kernels.ops._library import SCALE_GRAD


def _backward(loss):
    loss.backward()
    if not torch.isfinite(loss).all():
        raise AssertionError(f"non-finite loss {loss}")


def every_family(backend: str, device: str) -> None:
    torch.manual_seed(0)

    def rand(*shape, dtype, grad=True):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)

    for dtype in (torch.float32, torch.bfloat16):
        x = rand(7, 45, dtype=dtype)
        t = torch.randint(0, 45, (7,), device=device)
        _backward(lf.cross_entropy(x, t, label_smoothing=0.1, backend=backend))
        soft = torch.softmax(torch.randn(7, 45, device=device), -1).to(dtype)
        _backward(lf.cross_entropy(x, soft, backend=backend))
        _backward(lf.cross_entropy(x, t, reduction="none", focal_gamma=2.0, softcap=20.0, backend=backend).sum())
        h, w = rand(7, 24, dtype=dtype), rand(45, 24, dtype=dtype)
        _backward(lf.linear_cross_entropy(h, w, t, backend=backend))
        _backward(lf.sigmoid_focal_loss(x, torch.rand(7, 45, device=device).to(dtype), reduction="mean",
                                        backend=backend))
        q, k = rand(9, 20, dtype=dtype), rand(11, 20, dtype=dtype)
        _backward(lf.info_nce(q, k, symmetric=False, backend=backend))
        _backward(lf.info_nce(q, k[:9], backend=backend))
        scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
        _backward(lf.siglip_loss(q, k[:9], scale, bias, backend=backend))
        _backward(lf.supcon_loss(q, torch.arange(9, device=device) % 3, backend=backend))
        e = rand(12, 20, dtype=dtype)
        labels = torch.arange(12, device=device) % 4
        # through the row norms (the gradient kernels then store fp32 partial gradients, also for bf16)
        for mining, distance in (("batch_hard", "cosine"), ("semi_hard", "euclidean"), ("batch_all", "cosine")):
            _backward(lf.triplet_loss(e, labels, mining=mining, distance=distance, normalize=mining == "semi_hard",
                                      backend=backend))
        # the mining tiles over several blocks and tiles with tails, at a width that is not a multiple
        # of 8; semi_hard / batch_all on both paths: small classes promised (the register path: Triton,
        # and CUDA's half rows) and a class of 20 rows (the chunked path)
        e = rand(70, 36, dtype=dtype)
        _backward(lf.triplet_loss(e, torch.arange(70, device=device) % 20, backend=backend))
        for mining in ("semi_hard", "batch_all"):
            _backward(lf.triplet_loss(e, torch.arange(70, device=device) % 20, mining=mining, max_class_size=4,
                                      backend=backend))
            _backward(lf.triplet_loss(e[:40], (torch.arange(40, device=device) % 20).clamp(max=10), mining=mining,
                                      backend=backend))
        lp, entropy = lf.log_probs(x, t, return_entropy=True, temperature=0.7, backend=backend)
        _backward(lp.sum() + entropy.sum())
        lp, entropy = lf.linear_log_probs(h, w, t, return_entropy=True, backend=backend)
        _backward(lp.sum() + entropy.sum())
        teacher = rand(7, 45, dtype=dtype, grad=False)
        for divergence in ("kl", "reverse_kl", "jsd"):
            _backward(lf.distillation_loss(x, teacher, t, divergence=divergence, backend=backend))
        ht, wt = rand(7, 16, dtype=dtype, grad=False), rand(45, 16, dtype=dtype, grad=False)
        _backward(lf.linear_distillation_loss(h, w, ht, wt, divergence="jsd", backend=backend))
        SCALE_GRAD[backend](torch.randn(5, 33, dtype=dtype, device=device), torch.tensor(0.5, device=device))
    # fp16 rows, whose tiles scale their weights per row: the contrastive backward, batch_all's coefficients
    q, k = rand(9, 20, dtype=torch.float16), rand(9, 20, dtype=torch.float16)
    _backward(lf.info_nce(q, k, backend=backend))
    e = rand(40, 36, dtype=torch.float16)
    _backward(lf.triplet_loss(e, torch.arange(40, device=device) % 20, mining="batch_all", max_class_size=4,
                              backend=backend))
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    every_family(*sys.argv[1:3])
    print("every family ran")
