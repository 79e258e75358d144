"""Routing efficiency: how many of the expert's errors each routing policy puts in front of the MLLM, and at what
share of the images, computed from a run's output rows and the ground truth.

The MLLM is the only part that can overrule the expert, and it costs ~200x the expert per image: a policy is
good when its routed set is small and holds the expert's errors, above all its missed defects. Every policy is
judged on the same scores (the run's rows), so one run shows what the others would have routed:

* ``routed``: the images this run actually sent to the MLLM (``mllm_ran``);
* ``band``: this run's unsure band (``confidence = 'uncertain'``; with ``routing.policy: borderline`` the
  borderline band, which is also what that policy routes);
* ``all``, ``not-confident-normal`` (score >= threshold, EAGLE's band included), ``uncertain`` (EAGLE's band,
  threshold <= score < score_max), with `eagle.config.ConfidenceConfig`'s default factors;
* ``near-threshold``: score / threshold in [0.9, 1.1), a fixed reference band;
* ``best band``: an upper bound that uses the labels, the most errors any one band of score / threshold could hold
  with as many images as this run routed (or a given share): a policy close to it is as good as a band gets, and
  one far below it says the band is placed badly; a best band that is itself short of the errors says the
  expert's ranking, not the policy, is what keeps them from the MLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Row = dict[str, Any]
NEAR = (0.9, 1.1)


def _ratio(row: Row) -> float:
    return float(row["expert_score"]) / float(row["threshold"]) if row["threshold"] else float("nan")


def _in_eagle_band(row: Row) -> bool:
    return row.get("score_max") is not None and row["threshold"] <= row["expert_score"] < row["score_max"]


POLICIES: dict[str, Callable[[Row], bool]] = {
    "routed": lambda r: bool(r.get("mllm_ran")),
    "band": lambda r: r.get("confidence") == "uncertain",
    "all": lambda r: True,
    "not-confident-normal": lambda r: r["expert_score"] >= r["threshold"],
    "uncertain": _in_eagle_band,
    "near-threshold": lambda r: NEAR[0] <= _ratio(r) < NEAR[1],
}


def routing_efficiency(rows: list[Row], anomalous: np.ndarray,
                       best_share: float | None = None) -> dict[str, dict[str, Any]]:
    """Per policy: the share of images it routes and how many of the expert's errors (false alarms, missed
    defects, both) fall inside its routed set. `anomalous`: the ground truth of each row, in order. The
    ``best band`` holds as many images as the run routed, or `best_share` of them when given; it is left out
    when that is none or all."""
    n = len(rows)
    expert = np.array([r["expert_verdict"] == "anomalous" for r in rows], bool)
    false_alarm, missed = expert & ~anomalous, ~expert & anomalous
    out = {}
    for name, rule in POLICIES.items():
        out[name] = _efficiency(np.array([rule(r) for r in rows], bool), false_alarm, missed)
    size = round(best_share * n) if best_share is not None else out["routed"]["routed"]
    if 0 < size < n:
        out["best band"] = _efficiency(best_band(np.array([_ratio(r) for r in rows]), false_alarm | missed, size),
                                       false_alarm, missed)
    return out


def best_band(ratios: np.ndarray, wrong: np.ndarray, size: int) -> np.ndarray:
    """The `size` images adjacent in score / threshold (a band) that hold the most `wrong` ones, as a mask; the
    lowest such band on ties. Images without a ratio (no threshold) are never in it."""
    known = np.flatnonzero(~np.isnan(ratios))
    order = known[np.argsort(ratios[known], kind="stable")]
    inside = np.zeros(len(ratios), bool)
    if size > len(order):
        inside[order] = True
        return inside
    held = np.concatenate([[0], np.cumsum(wrong[order])])
    start = int(np.argmax(held[size:] - held[:-size]))
    inside[order[start:start + size]] = True
    return inside


def _efficiency(inside: np.ndarray, false_alarm: np.ndarray, missed: np.ndarray) -> dict[str, Any]:
    return {"routed": int(inside.sum()), "routed_share": float(inside.mean()) if len(inside) else None,
            **_caught("errors", inside, false_alarm | missed), **_caught("false_alarms", inside, false_alarm),
            **_caught("missed_defects", inside, missed)}


def _caught(kind: str, inside: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    total = int(wrong.sum())
    caught = int((inside & wrong).sum())
    return {f"{kind}": total, f"{kind}_routed": caught, f"{kind}_routed_share": caught / total if total else None}
