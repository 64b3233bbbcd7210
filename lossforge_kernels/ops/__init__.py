"""torch.library ops of the `lossforge` namespace, one module per loss family with kernels."""
from . import contrastive, cross_entropy, sigmoid_focal, triplet  # noqa: F401
