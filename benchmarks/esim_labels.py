"""ESIM's item labels in a bundle (the item field `esim_label`, which interest rows can come
from): how much of the catalogue they cover, which names, and how often a label agrees with
one of the item's own categories (MovieLens genres: a rough check of whether the names are
right; an LLM label need not be a genre to be right, so this is a floor, not a precision).
Prints JSON.

    python benchmarks/esim_labels.py models/esim-local/1
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from service.bundle.format import CATEGORY_FIELD, ESIM_LABEL_FIELD
from service.bundle.load import load_bundle


def label_report(bundle_dir: Path) -> dict:
    bundle = load_bundle(bundle_dir, verify=False)
    labels = bundle.fields.get(ESIM_LABEL_FIELD, {})
    categories = bundle.fields.get(CATEGORY_FIELD, {})
    genres: dict[int, set[str]] = {}
    for name, rows in categories.items():
        for row in rows.tolist():
            genres.setdefault(row, set()).add(name.casefold())
    items = {row for rows in labels.values() for row in rows.tolist()}
    pairs = [(name, row) for name, rows in labels.items() for row in rows.tolist()]
    agree = [name.casefold() in genres.get(row, set()) for name, row in pairs]
    per_label = {name: {"items": len(rows),
                        "agree_with_a_category": round(sum(
                            name.casefold() in genres.get(r, set()) for r in rows.tolist())
                            / max(len(rows), 1), 4)}
                 for name, rows in sorted(labels.items(), key=lambda kv: -len(kv[1]))}
    return {
        "bundle": str(bundle_dir), "catalogue": bundle.manifest.item_count,
        "labelled_items": len(items),
        "coverage": round(len(items) / bundle.manifest.item_count, 4),
        "labels": len(labels), "item_label_pairs": len(pairs),
        "labels_per_labelled_item": round(len(pairs) / max(len(items), 1), 3),
        "agree_with_a_category": round(sum(agree) / max(len(agree), 1), 4),
        "per_label": per_label,
        "label_counts_top": Counter({n: len(r) for n, r in labels.items()}).most_common(10),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a published bundle directory")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = label_report(args.bundle)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
