"""The expert: per product, a model of its normal images (PatchCore, PaDiM or STFPM, `experts.py`) fitted with a
label-free threshold, stored as a versioned artifact, loaded to score images, its scores classified.

    art = load_artifact(store_uri, product)                  # eagle.expert.artifact; verified against its hash
    expert = Expert.from_artifact(art, device="cpu", dtype="float32")   # eagle.expert.fitted
    results = expert.score([image, ...])                     # HxWx3 uint8 RGB, any sizes
    verdict, confidence = classify(results[0].score, art.threshold, art.score_max, cfg.confidence)

Import from the modules: this package imports nothing, so reading artifact metadata never loads torch.
"""
