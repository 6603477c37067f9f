"""Interest rows measured offline (docs/architecture.md, "Interest rows"): the service's own row
code (service/serving/rows.py) run for each evaluated user, against the list at the same size.

Per user:

* rows' recall: the union of the rows' items (m of them) against the targets, beside the
  list's Recall@m (the merged top m: as many items as the rows show);
* the same on minority-interest targets (outside the user's dominant model-free cluster,
  trainer/training/interests.py), where the item clusters exist;
* rows per user, and whether the user has two or more differently named rows;
* coherence: the share of a row's items inside its interest (1.0 by construction for rows
  filled by a search inside the interest; measured, so that another filling would show);
* with ESIM's item labels (a model trained with ESIM): how many rows are ESIM labels (the
  report adds the share of catalogue items they cover);
* on data with planted topics (one category per item, the synthetic generator's), how many
  of the rows' interests are among the user's planted topics (the categories of the whole
  sequence) and how many planted topics the user has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.bundle.format import (
    CATEGORY_FIELD,
    ESIM_LABEL_FIELD,
    field_postings,
    split_values,
)
from service.bundle.naming_files import NamingTables
from service.serving.filters import exact_search
from service.serving.retrieval import merge_interest_results
from service.serving.row_policy import RowPolicy
from service.serving.rows import FieldLabels, best_by_scores, interest_rows
from trainer.data.dataset import EvalSplit, SequenceDataset
from trainer.training.interests import dominant_cluster

# The rows measured in every evaluation: the page's four rows of ten (service defaults).
MEASURED_ROWS = RowPolicy(rows=4)
# What row_measures reports per user (per_user.json "interests"; the report's "rows").
ROW_MEASURES = ("rows_recall", "list_recall_at_rows", "rows_minority_recall",
                "list_minority_recall_at_rows", "rows_per_user", "esim_rows", "two_named_rows",
                "rows_coherence", "rows_items", "rows_planted", "planted_topics")
# Candidates per interest that give the model's mass per explicit interest: the service's
# default PER_INTEREST_FANOUT.
LIST_FANOUT = 50


def item_labels(dataset: SequenceDataset, field: str = CATEGORY_FIELD) -> FieldLabels:
    """The field of every trained item as the bundle carries it (rows: internal id - 1)."""
    values = dataset.categories if field == CATEGORY_FIELD else dataset.fields[field]
    postings = field_postings({field: [split_values(v) for v in values[1:]]})[field]
    return FieldLabels.from_postings(
        field, {name: np.asarray(rows, dtype=np.int64) for name, rows in postings.items()},
        dataset.n_items)


def esim_labels(naming: NamingTables | None, n_items: int) -> FieldLabels | None:
    """ESIM's item labels (the bundle's ESIM_LABEL_FIELD) as rows use them; None without."""
    if naming is None or not naming.item_labels:
        return None
    postings: dict[str, list[int]] = {}
    for item, rows in naming.item_labels.items():
        for row in rows:
            postings.setdefault(naming.names[row], []).append(item - 1)
    return FieldLabels.from_postings(
        ESIM_LABEL_FIELD, {name: np.asarray(sorted(r), dtype=np.int64)
                           for name, r in postings.items()}, n_items)


def planted_topics(dataset: SequenceDataset, split: EvalSplit, labels: FieldLabels
                   ) -> list[set[str]] | None:
    """Each user's categories over the whole sequence, where every item has exactly one
    (planted topics); None otherwise."""
    if np.any(np.diff(labels.offsets) != 1):
        return None
    out = []
    for user in split.users:
        items = dataset.flat[dataset.offsets[user] : dataset.offsets[user + 1]]
        out.append({labels.names[v] for v in labels.values[labels.offsets[items - 1]]})
    return out


def row_measures(dataset: SequenceDataset, split: EvalSplit, interests: np.ndarray,
                 item_vectors: np.ndarray, clusters: np.ndarray | None,
                 policy: RowPolicy = MEASURED_ROWS,
                 fields: Sequence[FieldLabels] | None = None) -> dict[str, np.ndarray]:
    """The measures of the module docstring for every user of `split`; `interests` [U, K, d]
    (the model's, for split.histories), `item_vectors` [N, d] (row = internal id - 1),
    `clusters`: item_clusters' labels (None: no minority measures)."""
    fields = list(fields) if fields is not None else [item_labels(dataset)]
    categories = next((f for f in fields if f.field == CATEGORY_FIELD), None)
    planted = planted_topics(dataset, split, categories) if categories is not None else None
    users = len(split.histories)
    out: dict[str, list[float]] = {name: [] for name in ROW_MEASURES}
    empty = np.zeros(0, dtype=np.int64)
    nan = float("nan")
    for u in range(users):
        history = split.histories[u][split.histories[u] > 0] - 1
        every = interests[u] @ item_vectors.T  # [K, N]: exact, as the service on a small catalogue
        scores, rows = exact_search(interests[u], item_vectors, np.arange(len(item_vectors)),
                                    LIST_FANOUT)
        list_rows, list_scores, _ = merge_interest_results(scores, rows, scores.size)
        shown = interest_rows(history, fields, list_rows, list_scores, best_by_scores(every),
                              policy, empty)
        union = np.asarray([r for row in shown for r in row.rows], dtype=np.int64) + 1
        ranked = list_rows[: len(union)] + 1  # the list's top m (internal ids)
        targets = split.targets[u]
        out["rows_recall"].append(float(np.isin(targets, union).mean()))
        out["list_recall_at_rows"].append(float(np.isin(targets, ranked).mean()))
        minority, list_minority = nan, nan
        if clusters is not None:
            main, _ = dominant_cluster(split.histories[u], clusters)
            outside = targets[clusters[targets] != main]
            if len(outside):
                minority = float(np.isin(outside, union).mean())
                list_minority = float(np.isin(outside, ranked).mean())
        out["rows_minority_recall"].append(minority)
        out["list_minority_recall_at_rows"].append(list_minority)
        names = {(row.interest.field, row.interest.name) for row in shown}
        out["rows_per_user"].append(float(len(shown)))
        out["esim_rows"].append(float(sum(r.interest.field == ESIM_LABEL_FIELD for r in shown)))
        out["two_named_rows"].append(float(len({n for _, n in names}) >= 2))
        by_field = {f.field: f for f in fields}
        inside = [np.isin(row.rows, by_field[row.interest.field].postings[row.interest.value])
                  for row in shown]
        out["rows_coherence"].append(float(np.concatenate(inside).mean()) if inside else nan)
        out["rows_items"].append(float(len(union)))
        if planted is not None:
            out["rows_planted"].append(float(len({n for _, n in names} & planted[u])))
            out["planted_topics"].append(float(len(planted[u])))
    return {name: np.asarray(values, dtype=float) for name, values in out.items() if values}
