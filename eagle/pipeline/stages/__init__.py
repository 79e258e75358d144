"""Ray Data stages of the inspect pipeline, in data-flow order: decode → expert → mllm | finish → stamp.

Each module pairs a `Stage` subclass (the per-batch work) with the config that sizes it; `base.py` owns the
plumbing that every stage shares.
"""
