"""The config hash recorded on every output row: which settings change *results*.

Sections that change results (expert, threshold, confidence, regions, prompts, guidance, mllm, routing) feed
the hash; sections that only change *how fast or where* a job runs (resources, storage, inputs, output, ray,
run id) do not, so resizing a cluster never invalidates earlier results. The expert section is hashed in the
flat layout its artifacts record (`ExpertConfig.record`), so its sub-sections did not change any hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from eagle.config.sections import EXPERT_MODELS, EnsembleConfig, JobConfig

RESULT_SECTIONS = ("expert", "threshold", "confidence", "regions", "prompts", "guidance", "mllm", "routing")
# Fields that change how fast a section's work runs but not what it computes (the expert's: flat record keys).
_HASH_EXCLUDE = {"expert": {"cache_size", "search"}, "mllm": {"cache", "compile"}}


# Fields added after results were first hashed: left out while at their defaults, so that a config which does
# not use them hashes (and a PatchCore fit is versioned) as before they existed. Every model's own sub-section
# is one of them (PatchCore's settings are top-level keys of the expert record).
LATER_FIELDS = {"expert": ("model", *EXPERT_MODELS, "ensemble", "combine", "search"), "threshold": ("folds",),
                "mllm": ("stop",), "routing": ("budget", "score_range"),
                "prompts": ("prior_borderline", "boxes_note_borderline")}


def recorded(cfg: JobConfig, section: str) -> dict[str, Any]:
    """A section as results and artifacts record it: its JSON dump (the expert's in its flat record layout)."""
    value = getattr(cfg, section)
    return value.record() if section == "expert" else value.model_dump(mode="json")


def without_unset_later_fields(section: str, dumped: dict) -> dict:
    """A section's `recorded` form less the `LATER_FIELDS` that hold their default values."""
    later = LATER_FIELDS.get(section, ())
    if not later:
        return dumped
    defaults = recorded(JobConfig(), section)
    return {k: v for k, v in dumped.items() if k not in later or v != defaults[k]}


def config_hash(cfg: JobConfig, sections: tuple[str, ...] = RESULT_SECTIONS) -> str:
    """Stable content hash (16 hex chars) of the result-affecting sections; key order never matters."""
    data = {name: {k: v for k, v in recorded(cfg, name).items() if k not in _HASH_EXCLUDE.get(name, ())}
            for name in sections}
    data = {name: without_unset_later_fields(name, value) for name, value in data.items()}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_view(cfg: JobConfig, model: str) -> JobConfig:
    """The config as a fit of expert `model` records it (artifact meta, its config hash): ``expert.model`` set
    to the model and the other models' sub-sections at their defaults, so that they do not change its version
    (PatchCore's settings excepted: every model's record has them, as before the sub-sections).
    PatchCore, whose artifacts predate the choice of model, records every `LATER_FIELDS` at its default."""
    legacy = model == "patchcore"
    expert = {name: type(getattr(cfg.expert, name))() for name in EXPERT_MODELS
              if name != "patchcore" and hasattr(cfg.expert, name) and (legacy or name != model)}
    expert["model"] = "auto" if legacy else model
    expert["ensemble"] = EnsembleConfig()  # how inspect combines fitted experts: no fit records it
    threshold = {"folds": type(cfg.threshold)().folds} if legacy else {}
    return cfg.model_copy(update={"expert": cfg.expert.model_copy(update=expert),
                                  "threshold": cfg.threshold.model_copy(update=threshold)})
