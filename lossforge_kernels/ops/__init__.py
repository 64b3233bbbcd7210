"""torch.library ops of the `lossforge` namespace, one module per loss family with kernels."""
from . import cross_entropy, sigmoid_focal  # noqa: F401
