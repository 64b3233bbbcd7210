"""Triton kernels, installed as lossforge_kernels.triton_kernels (one module per loss family)."""
import os


def interpreting() -> bool:
    """Whether the kernels run in the Triton interpreter (TRITON_INTERPRET), read at launch time: the
    launchers pick GPU or interpreter block sizes from it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
