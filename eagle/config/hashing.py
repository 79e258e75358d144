"""The config hash recorded on every output row: which settings change *results*.

Sections that change results (expert, threshold, confidence, regions, prompts, guidance, mllm, routing) feed
the hash; sections that only change *how fast or where* a job runs (resources, storage, inputs, output, ray,
run id) do not, so resizing a cluster never invalidates earlier results.
"""

from __future__ import annotations

import hashlib
import json

from eagle.config.sections import EXPERT_MODELS, JobConfig

RESULT_SECTIONS = ("expert", "threshold", "confidence", "regions", "prompts", "guidance", "mllm", "routing")
# Expert fields that change how fast the expert runs but not what it computes.
_HASH_EXCLUDE = {"expert": {"cache_size", "search"}, "mllm": {"cache", "compile"}}


# Fields added after results were first hashed: left out while at their defaults, so that a config which does
# not use them hashes (and a PatchCore fit is versioned) as before they existed.
LATER_FIELDS = {"expert": ("model", "padim", "stfpm", "ensemble", "combine", "search"), "threshold": ("folds",),
                "mllm": ("stop",), "routing": ("budget", "score_range"),
                "prompts": ("prior_borderline", "boxes_note_borderline")}


def without_unset_later_fields(section: str, dumped: dict) -> dict:
    """A section's ``model_dump(mode="json")`` less the `LATER_FIELDS` that hold their default values."""
    later = LATER_FIELDS.get(section, ())
    if not later:
        return dumped
    defaults = type(getattr(JobConfig(), section)).model_construct().model_dump(mode="json")
    return {k: v for k, v in dumped.items() if k not in later or v != defaults[k]}


def config_hash(cfg: JobConfig, sections: tuple[str, ...] = RESULT_SECTIONS) -> str:
    """Stable content hash (16 hex chars) of the result-affecting sections; key order never matters."""
    data = cfg.model_dump(mode="json", include=set(sections), exclude=_HASH_EXCLUDE)
    data = {name: without_unset_later_fields(name, value) for name, value in data.items()}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_view(cfg: JobConfig, model: str) -> JobConfig:
    """The config as a fit of expert `model` records it (artifact meta, its config hash): ``expert.model`` set
    to the model and the other models' sub-sections at their defaults, so that they do not change its version.
    PatchCore, whose artifacts predate the choice of model, records every `LATER_FIELDS` at its default."""
    legacy = model == "patchcore"
    expert = {name: type(getattr(cfg.expert, name))() for name in EXPERT_MODELS
              if hasattr(cfg.expert, name) and (legacy or name != model)}
    expert["model"] = "auto" if legacy else model
    expert.update(ensemble=[], combine="max")  # how inspect combines fitted experts: no fit records it
    threshold = {"folds": type(cfg.threshold)().folds} if legacy else {}
    return cfg.model_copy(update={"expert": cfg.expert.model_copy(update=expert),
                                  "threshold": cfg.threshold.model_copy(update=threshold)})
