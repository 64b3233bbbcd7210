"""Adapters that put the fused losses into other libraries' models, one module per library.

Each module imports its library (an optional dependency) when it is imported itself:
`from lossforge_kernels.integrations import transformers` needs Hugging Face transformers.
"""
