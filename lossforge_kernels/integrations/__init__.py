"""Adapters that put the fused losses into other libraries' models and training code, one module per
library: a one-line patch for Hugging Face transformers' causal LMs, and drop-in loss modules with the
constructor arguments and forward conventions of open_clip's and sentence-transformers' losses.

`transformers` imports Hugging Face transformers (an optional dependency) when it is imported itself;
the drop-in modules import nothing of their peers.
"""
