"""Several runs over the same images side by side: routing policies, with and without guidance, two MLLMs.

Runs are compared on the images every one of them scored (so a policy is never judged on easier images), and
each later run is paired with the first, the baseline, image by image.
"""

from __future__ import annotations

from typing import Any

from eagle.evaluation.decisions import decision_metrics
from eagle.evaluation.ground_truth import Truth

Scored = dict[str, tuple[dict[str, Any], Truth]]  # test image path -> (its row, its truth)


def _final_right(pair: tuple[dict[str, Any], Truth]) -> bool:
    row, truth = pair
    return (row["verdict"] == "anomalous") == truth.anomalous


def compare_runs(runs: dict[str, Scored]) -> dict[str, Any]:
    """Decision metrics of each run (first = baseline) on the images all runs scored, and per later run the
    images whose final verdict it got right where the baseline was wrong (``better``) and the reverse
    (``worse``)."""
    baseline = next(iter(runs))
    common = sorted(set.intersection(*(set(scored) for scored in runs.values())))
    by_run = {run_id: decision_metrics([scored[p][0] for p in common], [scored[p][1] for p in common])
              for run_id, scored in runs.items()}
    paired = {}
    for run_id, scored in list(runs.items())[1:]:
        here = [_final_right(scored[p]) for p in common]
        there = [_final_right(runs[baseline][p]) for p in common]
        paired[run_id] = {"better": sum(h and not t for h, t in zip(here, there)),
                          "worse": sum(t and not h for h, t in zip(here, there))}
    return {"baseline": baseline, "n_common_images": len(common),
            "n_scored": {run_id: len(scored) for run_id, scored in runs.items()}, "runs": by_run,
            "paired_with_baseline": paired}
