"""The PatchCore expert: fit per product, store as versioned artifacts, score images, classify scores.

    art = load_artifact(store_uri, product)                  # verified against its content hash
    expert = Expert.from_artifact(art, device="cpu", dtype="float32")
    results = expert.score([image, ...])                     # HxWx3 uint8 RGB, any sizes
    verdict, confidence = classify(results[0].score, art.threshold, art.score_max, cfg.confidence)
"""

from eagle.expert.artifact import ArtifactError, ExpertArtifact, load_artifact, save_artifact
from eagle.expert.expert import Expert, ExpertResult, build_model
from eagle.threshold import classify

__all__ = ["ArtifactError", "Expert", "ExpertArtifact", "ExpertResult", "build_model", "classify",
           "load_artifact", "save_artifact"]
