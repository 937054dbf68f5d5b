"""Shared ML kernels used by several algorithms (tokenizers, losses, alignment, ...).

Submodules are imported explicitly (``from algorithms.core.tokenizer import ...``) so that
importing this package stays cheap on devices that never touch torch or transformers.
"""
