"""open_clip's `ClipLoss` and `SigLipLoss`, computed by lossforge_kernels.

Same constructor arguments and `forward(image_features, text_features, logit_scale, [logit_bias],
output_dict=False)`. open_clip's models normalise the features and exponentiate the scale before the
loss, so the features are used as given (`normalize=False`) and `logit_scale` is the multiplier.
Only one process is supported: `world_size > 1` raises NotImplementedError (for multi-process
training call `lossforge_kernels.info_nce` / `siglip_loss` with `process_group`).

Differences from open_clip:
- `ClipLoss` with `logit_bias`: the bias shifts every logit of a row equally and so cancels in the
  softmax; the loss is the same, but the bias gets no gradient here (open_clip gives it zeros).
- `cache_labels` is accepted and has no effect (no label tensor is built).
"""
from __future__ import annotations

from torch import nn

import lossforge_kernels as lf


def _single_process(world_size: int, options: str) -> None:
    if world_size != 1:
        raise NotImplementedError(
            f"world_size={world_size}: only world_size=1 is supported ({options} act only across processes); "
            "use lossforge_kernels.info_nce/siglip_loss with process_group for multi-process training")


def _output(loss, output_dict: bool):
    return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """CLIP's symmetric cross-entropy over `logit_scale * image @ text.T`, averaged over both directions."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, backend="auto"):
        super().__init__()
        _single_process(world_size, "local_loss, gather_with_grad, rank and use_horovod")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        # logit_bias cancels in each row's softmax (see the module docstring).
        loss = lf.info_nce(image_features, text_features, logit_scale=logit_scale, symmetric=True, normalize=False,
                           backend=self.backend)
        return _output(loss, output_dict)


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss over `logit_scale * image @ text.T + logit_bias`, summed and divided by B."""

    _DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, *, backend="auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in self._DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {self._DIST_IMPLS}, got {dist_impl!r}")
        _single_process(world_size, "rank and dist_impl")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = lf.siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize=False,
                              backend=self.backend)
        return _output(loss, output_dict)
