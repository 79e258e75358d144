"""The config hash recorded on every output row: which settings change *results*.

Sections that change results (expert, threshold, confidence, regions, prompts, guidance, mllm, routing) feed
the hash; sections that only change *how fast or where* a job runs (resources, storage, inputs, output, ray,
run id) do not, so resizing a cluster never invalidates earlier results.
"""

from __future__ import annotations

import hashlib
import json

from eagle.config.sections import JobConfig

RESULT_SECTIONS = ("expert", "threshold", "confidence", "regions", "prompts", "guidance", "mllm", "routing")
# Expert fields that change how fast the expert runs but not what it computes.
_HASH_EXCLUDE = {"expert": {"cache_size"}}


def config_hash(cfg: JobConfig, sections: tuple[str, ...] = RESULT_SECTIONS) -> str:
    """Stable content hash (16 hex chars) of the result-affecting sections; key order never matters."""
    data = cfg.model_dump(mode="json", include=set(sections), exclude=_HASH_EXCLUDE)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
