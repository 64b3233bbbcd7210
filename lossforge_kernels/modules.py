"""nn.Module wrappers, with the same arguments as the functions: every family's `MODULES`."""
from .losses import MODULES

globals().update(MODULES)
__all__ = list(MODULES)
del MODULES
