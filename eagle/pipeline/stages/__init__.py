"""Ray Data stages of the inspect pipeline, in data-flow order: decode → expert → mllm | finish → stamp.

Each module holds one `Stage` subclass: its per-batch work and its declarations (the columns it requires,
produces and drops, and `sized_by`: the ``resources.<entry>`` of the config that sizes it); `base.py` owns the
plumbing that every stage shares and `COLUMNS`, the one description of every column they pass on.
"""
