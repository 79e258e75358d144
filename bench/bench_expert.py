"""Expert stage: our coreset vs anomalib's KCenterGreedy, our batched scoring vs anomalib's per-image path, and
the full expert against its ceiling, the backbone's forward pass alone.

One run, same features and images for both sides; prints three tables.

Coreset: patch features of `--train` synthetic 'marble' images (784 patches each with the 224 crop; WRN50
layer2+layer3 = 1536 dims), 10% kept. Coverage = the largest distance from any patch to its nearest coreset
member (lower is better). Scoring: the same backbone weights and memory bank on both sides; anomalib's stock
per-image path is its PatchCore pre-processor + ``PatchcoreModel.forward`` one image at a time (what
``Engine.predict``/``TorchInferencer`` run per image, minus file I/O); ours is ``Expert.score`` in batches,
which also maps the anomaly map back to the original image size.

The third table is the expert stage as the pipeline runs it: `Expert.score_inputs` on the uint8 model inputs
the decode tasks send (normalise, backbone, patch embedding, nearest-neighbour search, anomaly maps at the
original size) next to the backbone forward alone on the same inputs, in images/s; the same command measures a
GPU with ``--device cuda``.

    OMP_NUM_THREADS=1 python bench/bench_expert.py
    python bench/bench_expert.py --skip-coreset --test 32 --batch 16 --threads 2
    python bench/bench_expert.py --device cuda --dtypes float32,bfloat16 --test 256 --batch 64
    python bench/bench_expert.py --device cuda --skip-coreset --searches exact,float16,bfloat16 --test 512 --batch 64

``--searches`` (eagle/expert/search.py's modes) adds the search table: per backbone dtype and search mode the
full expert, the nearest-neighbour search alone, how the search answered the patch queries (certified by the
low-precision shortlist / float64 shortlist / float64 brute force), and the scores and nearest rows against
the 'exact' mode's.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # KCenterGreedy's progress bar
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eagle.config import ExpertConfig  # noqa: E402
from eagle.expert.coreset import greedy_coreset  # noqa: E402
from eagle.expert.fitted import Expert  # noqa: E402
from eagle.expert.patchcore import PatchCore  # noqa: E402
from eagle.expert.search import brute_force  # noqa: E402
from eagle.testing.synth import render_defect, render_normal  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def coverage(features: torch.Tensor, idx: torch.Tensor) -> float:
    """Largest distance from any row of `features` to its nearest row among features[idx]."""
    dist, _ = brute_force(features, features[idx], 1)
    return float(dist.max())


def images(n: int, size: int, seed: int, defects: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if defects and i % 2:
            out.append(render_defect("marble", ("scratch", "hole", "stain")[i % 3], 0.8, rng, size)[0])
        else:
            out.append(render_normal("marble", rng, size))
    return out


def bench_coreset(features: torch.Tensor, ratio: float, seed: int, device: str) -> list[tuple[str, float, float]]:
    from anomalib.models.components import KCenterGreedy

    rows = []
    np.random.seed(seed)
    torch.manual_seed(seed)  # KCenterGreedy draws its projection and start from the global RNGs
    sync(device)
    start = time.perf_counter()
    reference = torch.tensor(KCenterGreedy(features, sampling_ratio=ratio).select_coreset_idxs(), device=device)
    sync(device)
    rows.append(("anomalib KCenterGreedy", time.perf_counter() - start, coverage(features, reference)))
    start = time.perf_counter()
    ours = greedy_coreset(features, len(reference), seed=seed)
    sync(device)
    rows.append(("eagle greedy_coreset", time.perf_counter() - start, coverage(features, ours)))
    return rows


def stock_per_image(model, test: list[np.ndarray], resize: int, crop: int, device: str) -> tuple[float, list]:
    """anomalib's pre-processor + PatchcoreModel.forward, one image at a time."""
    from anomalib.models import Patchcore

    pre = Patchcore.configure_pre_processor(image_size=(resize, resize), center_crop_size=(crop, crop))
    transform = pre.transform
    scores = []
    for i, image in enumerate([test[0]] + test):  # the first is a warm-up
        if i == 1:
            sync(device)
            start = time.perf_counter()
        x = torch.from_numpy(image).to(device).permute(2, 0, 1).unsqueeze(0).float() / 255
        out = model(transform(x))
        if i:
            scores.append(float(out.pred_score[0]))
    sync(device)
    return time.perf_counter() - start, scores


def ours_batched(expert: Expert, test: list[np.ndarray], batch: int, device: str) -> tuple[float, list]:
    expert.score(test[:batch])  # warm-up
    sync(device)
    start = time.perf_counter()
    scores = [r.score for i in range(0, len(test), batch) for r in expert.score(test[i:i + batch])]
    sync(device)
    return time.perf_counter() - start, scores


def full_vs_backbone(expert: Expert, test: list[np.ndarray], batch: int, device: str,
                     backbone_too: bool = True) -> tuple[float, float]:
    """(seconds of the full expert, seconds of the backbone forward alone) over `test` from model inputs."""
    inputs = [expert.model_input(im) for im in test]
    sizes = [im.shape[:2] for im in test]
    model = expert.model

    def backbone(i: int) -> None:
        with torch.inference_mode():
            x = model.preprocessor.normalise(inputs[i:i + batch], model.device, model.dtype)
            model.extractor(x.contiguous(memory_format=torch.channels_last))

    def full(i: int) -> None:
        expert.score_inputs(inputs[i:i + batch], sizes[i:i + batch])

    out = []
    for step in (full, backbone) if backbone_too else (full,):
        step(0)  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            step(i)
        sync(device)
        out.append(time.perf_counter() - start)
    return out[0], out[-1]


def search_table(expert: Expert, test: list[np.ndarray], batch: int, device: str,
                 modes: list[str]) -> list[tuple]:
    """Per search mode: (mode, full s, search-alone s, answer counts, max rel. score diff vs 'exact', share of
    nearest rows equal to 'exact''s)."""
    model = expert.model
    inputs = [expert.model_input(im) for im in test]
    sizes = [im.shape[:2] for im in test]
    with torch.inference_mode():
        flats = [model.embed(model.preprocessor.normalise(inputs[i:i + batch], model.device, model.dtype)).flatten(0, 2)
                 for i in range(0, len(inputs), batch)]
    rows, reference = [], None
    for mode in ["exact"] + [m for m in modes if m != "exact"]:
        model.search_mode = mode
        bank = model.bank
        full_s, _ = full_vs_backbone(expert, test, batch, device, backbone_too=False)
        bank.search(flats[0], 1)  # warm-up
        if bank.shortlist is not None:
            bank.shortlist.counts.clear()
        sync(device)
        start = time.perf_counter()
        found = [bank.search(f, 1) for f in flats]
        sync(device)
        search_s = time.perf_counter() - start
        scores = np.array([r.score for i in range(0, len(inputs), batch)
                           for r in expert.score_inputs(inputs[i:i + batch], sizes[i:i + batch])])
        index = torch.cat([i for _, i in found]).cpu()
        counts = dict(bank.shortlist.counts) if bank.shortlist is not None else {}
        if reference is None:
            reference = (scores, index)
        rel = float(np.max(np.abs(scores - reference[0]) / np.abs(reference[0])))
        same = float((index == reference[1]).float().mean())
        rows.append((mode, full_s, search_s, counts, rel, same))
    model.search_mode = "auto"
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--train", type=int, default=50, help="training images: 50 x 784 = 39,200 patches")
    p.add_argument("--test", type=int, default=16, help="images scored by each side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="synthetic image side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated backbone dtypes for our side (float32, float16, bfloat16); anomalib's "
                   "side stays float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank-ratio", type=float, default=0.1,
                   help="share of the patches in the scoring bank (0.4 of 50 images ~ the bank of 200 images)")
    p.add_argument("--skip-coreset", action="store_true", help="only the scoring table")
    p.add_argument("--searches", default="",
                   help="comma-separated search modes (exact, float16, bfloat16, tf32, auto) for the search table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ExpertConfig(backbone=args.backbone, weights="random", seed=args.seed)
    model = PatchCore.from_config(cfg).to(args.device)
    train = images(args.train, args.size, args.seed, defects=False)
    start = time.perf_counter()
    features = torch.cat([model.embed(model.preprocess(train[i:i + 8])) for i in range(0, len(train), 8)])
    features = features.reshape(-1, features.shape[-1]).clone()
    embed_s = time.perf_counter() - start
    coreset_rows = [] if args.skip_coreset else bench_coreset(features, cfg.patchcore.coreset_ratio, args.seed, args.device)
    selected = greedy_coreset(features, int(len(features) * args.bank_ratio), seed=args.seed)

    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    stock = PatchcoreModel(layers=cfg.layers, backbone=cfg.backbone, pre_trained=False).eval().to(args.device)
    stock.feature_extractor.load_state_dict(model.extractor.state_dict())
    stock.memory_bank = features[selected].clone()
    model.memory_bank = features[selected].clone()
    test = images(args.test, args.size, args.seed + 1, defects=True)
    stock_s, stock_scores = stock_per_image(stock, test, cfg.resize, cfg.crop, args.device)
    rows = [("anomalib per image (float32)", 1, stock_s, 0.0)]
    ceiling, searches = [], []
    for dtype in args.dtypes.split(","):
        model.extractor.to(getattr(torch, dtype))
        for batch in (1, args.batch):
            sec, scores = ours_batched(Expert(model), test, batch, args.device)
            rel = float(np.max(np.abs(np.array(scores) - stock_scores) / np.abs(stock_scores)))
            rows.append((f"eagle Expert.score ({dtype})", batch, sec, rel))
        ceiling.append((dtype, *full_vs_backbone(Expert(model), test, args.batch, args.device)))
        if args.searches:
            searches += [(dtype, *row) for row in search_table(Expert(model), test, args.batch, args.device,
                                                               args.searches.split(","))]

    threads = f"cpu, {torch.get_num_threads()} thread(s)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else threads
    print(f"\n{args.backbone} (random weights), {device}; {features.shape[0]} patches x {features.shape[1]} dims "
          f"from {args.train} images (embedding took {embed_s:.1f} s)")
    if coreset_rows:
        print(f"{'coreset (10%)':26s} {'seconds':>9s} {'speed-up':>9s} {'coverage':>9s} {'vs anomalib':>12s}")
        (_, ref_s, ref_cov) = coreset_rows[0]
    for name, sec, cov in coreset_rows:
        print(f"{name:26s} {sec:9.2f} {ref_s / sec:8.1f}x {cov:9.4f} {cov / ref_cov - 1:+11.1%}")
    print(f"\nscoring {args.test} images {args.size}x{args.size}, memory bank {len(selected)} x {features.shape[1]}")
    print(f"{'scoring':34s} {'batch':>5s} {'seconds':>8s} {'images/s':>9s} {'speed-up':>9s} {'max rel. diff':>14s}")
    for name, batch, sec, rel in rows:
        print(f"{name:34s} {batch:5d} {sec:8.2f} {args.test / sec:9.2f} {stock_s / sec:8.2f}x {rel:14.1e}")
    print("max rel. diff: largest relative difference of an image score from anomalib's")
    print(f"\nthe expert stage from model inputs, batch {args.batch}: full expert vs the backbone forward alone")
    print(f"{'dtype':10s} {'full images/s':>14s} {'backbone images/s':>18s} {'full / backbone':>16s}")
    for dtype, full_s, backbone_s in ceiling:
        print(f"{dtype:10s} {args.test / full_s:14.2f} {args.test / backbone_s:18.2f} {backbone_s / full_s:15.2f}x")
    if searches:
        backbone = {dtype: backbone_s for dtype, _, backbone_s in ceiling}
        print(f"\nsearch modes, batch {args.batch} ({args.test * 784} patch queries per mode; answered: c certified "
              "shortlist, f float64 shortlist, b float64 brute force)")
        print(f"{'dtype':9s} {'search':9s} {'full img/s':>10s} {'full/backbone':>14s} {'search img/s':>13s} "
              f"{'answered c/f/b':>18s} {'scores vs exact':>16s} {'same nn':>8s}")
        for dtype, mode, full_s, search_s, counts, rel, same in searches:
            answered = "/".join(str(counts.get(key, 0)) for key in ("certified", "float64", "brute")) if counts else "-"
            print(f"{dtype:9s} {mode:9s} {args.test / full_s:10.2f} {backbone[dtype] / full_s:13.2f}x "
                  f"{args.test / search_s:13.2f} {answered:>18s} {rel:16.1e} {same:8.4f}")


if __name__ == "__main__":
    main()
