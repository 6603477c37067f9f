"""benchmarks/long_tail.py's decisions: the new-item rule chosen on validation among what the
service serves, and the paired summary over seeds x folds (run data made up here: a real
run trains two models per fold for minutes)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from tests.helpers import BENCHMARKS, benchmark_script


@pytest.fixture(scope="module")
def long_tail():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling folds.py
    try:
        with benchmark_script("long_tail") as module:
            yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def means(long_tail, overall: dict[str, float], new: dict[str, float]) -> dict:
    rules = [long_tail.rule_name(p, g) for p in long_tail.PLACEMENTS for g in long_tail.BLENDS]
    rules += [long_tail.slot_rule_name(p, g, m) for p in long_tail.PLACEMENTS
              for g in long_tail.SLOT_BLENDS for m in long_tail.SLOTS]
    return {r: {"recall@50": overall.get(r, 0.20), "new_item_recall@50": new.get(r, 0.0)}
            for r in [*rules, "new_no_new_items"]}


def test_the_rule_is_the_best_for_new_items_that_keeps_overall_recall(long_tail):
    ridge = long_tail.rule_name("ridge", 0.0)
    five = long_tail.slot_rule_name("projected", 0.0, 5)
    two = long_tail.slot_rule_name("ridge", 0.0, 2)
    blend = long_tail.rule_name("ridge", 2.0)  # not served: never chosen, however good
    valid = means(long_tail, {ridge: 0.210, five: 0.2055, two: 0.209, blend: 0.21},
                  {ridge: 0.02, five: 0.07, two: 0.03, blend: 0.5})
    assert long_tail.choose_rule(valid) == five  # within 0.005 of the ridge placement
    valid[five]["recall@50"] = 0.2049  # now it loses too much: the next best
    assert long_tail.choose_rule(valid) == two


def fake_run(rng: np.random.Generator, users: int, variants: dict[str, float]) -> dict:
    out: dict = {"_info": {"seconds": {"old": 100.0, "new": 120.0}, "load_1min": 2.0}}
    for split in ("valid", "test"):
        out[split] = {"users": [f"u{i}" for i in range(users)]}
        for name, level in variants.items():
            values = {m: (level + rng.normal(0, 0.01, users)).tolist()
                      for m in long_tail_metrics()}
            values["coverage"] = 0.1 if name == "old" else 0.25
            out[split][name] = values
    return out


def long_tail_metrics() -> tuple[str, ...]:
    return ("recall@50", "tail_recall@50", "new_item_recall@50")


def test_the_summary_pairs_the_chosen_rule_with_the_old_default(long_tail, tmp_path):
    rng = np.random.default_rng(0)
    variants = {name: 0.20 for name in means(long_tail, {}, {})}
    variants["old"] = 0.15
    variants["content_only"] = 0.05
    runs = {(s, f): fake_run(rng, 20, variants) for s in range(2) for f in range(3)}
    args = argparse.Namespace(folds=3, out=tmp_path)
    summary = long_tail.summarise(runs, [0, 1], args, 0.0, (0.0, 0.0, 0.0))
    rule = summary["rule_chosen_on_valid"]
    old = summary["pairs"][f"{rule} vs old"]["recall@50"]
    assert old["mean_difference"] == pytest.approx(0.05, abs=0.005) and old["excludes_zero"]
    assert old["seeds"] == 2 and old["folds"] == 3 and old["users"] == 60
    assert summary["coverage_ratio_new_vs_old"]["mean"] == pytest.approx(2.5)
    assert summary["training_time_ratio_new_vs_old"]["ratio_of_means"] == pytest.approx(1.2)
    assert json.loads((tmp_path / "summary.json").read_text())["rule_chosen_on_valid"] == rule
    assert rule in (tmp_path / "summary.md").read_text()
