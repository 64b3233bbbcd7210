"""The functional API: one function per loss, every family's `FUNCTIONS` (each family's module holds its own)."""
from .losses import FUNCTIONS

globals().update(FUNCTIONS)
__all__ = list(FUNCTIONS)
del FUNCTIONS
