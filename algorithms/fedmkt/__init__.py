"""FedMKT: mutual knowledge transfer between heterogeneous client SLMs and a server LLM through
top-k logits on a public set (token alignment in :mod:`algorithms.core.token_alignment`).

The payload schema both halves share is :mod:`algorithms.fedmkt.payload`; import it explicitly
(this package imports nothing, so a device that never runs FedMKT pays nothing for it).
"""
