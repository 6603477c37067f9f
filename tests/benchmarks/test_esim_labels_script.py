"""benchmarks/esim_labels.py: coverage of ESIM's item labels and their agreement with the
items' categories, on a bundle whose items.json carries hand-made labels."""

from __future__ import annotations

import json
import shutil

from tests.helpers import benchmark_script


def test_label_report_counts_coverage_and_agreement(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    items = json.loads((bundle / "items.json").read_text())
    topics = items["fields"]["category"]
    three, four = topics["topic-3"][:4], topics["topic-4"][:2]
    # "topic-3" on four of its own items and on two topic-4 items (disagreeing)
    items["fields"]["esim_label"] = {"topic-3": sorted(three + four), "Space": [three[0]]}
    (bundle / "items.json").write_text(json.dumps(items))
    with benchmark_script("esim_labels") as script:
        report = script.label_report(bundle)
    assert report["labelled_items"] == 6 and report["labels"] == 2
    assert report["coverage"] == round(6 / len(items["item_ids"]), 4)
    assert report["item_label_pairs"] == 7
    assert report["agree_with_a_category"] == round(4 / 7, 4)
    assert report["per_label"]["topic-3"] == {"items": 6, "agree_with_a_category": round(4 / 6, 4)}
    assert report["per_label"]["Space"]["agree_with_a_category"] == 0.0
