"""What a bundle needs to name interests online, built from a trained ESIM
(docs/architecture.md, "Named interests").

The interest vocabulary: ESIM's L labels, each a cluster of the semantic interests the LLM (or
the metadata / oracle labeller) named. A label's vector is the unit mean of its members'
MiniLM embeddings, its name the name of the member nearest that mean. The projection g is
ESIM's alignment head: g(v) of a behavioural interest v was trained (InfoNCE) to point at the
embedding of the semantic interest it matches. Serving names interest v by the label nearest
g(v), with the cosine as confidence (service/serving/interest_names.py).

A name is shown only above a confidence threshold calibrated here, on the supervised users: the
lowest cosine at which the named labels are right (the label of the semantic interest matched
to that behavioural interest) at least TARGET_PRECISION of the time, and no lower than the
FLOOR_QUANTILE of the correctly named rows' cosines. These users were trained on, so the
figures are optimistic; naming.json records them (`calibration`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from service.bundle.naming_files import NamingTables
from trainer.encoders.base import MultiInterestEncoder
from trainer.semantics.esim.objective import EsimObjective, labelled_items

TARGET_PRECISION = 0.8
FLOOR_QUANTILE = 0.1


def naming_state(naming: NamingTables) -> dict[str, Any]:
    """Tensors and plain values only: a checkpoint loads with weights_only=True."""
    return {"names": naming.names, "sizes": naming.sizes,
            "vocabulary": torch.from_numpy(naming.vocabulary),
            "projection": torch.from_numpy(naming.projection),
            "bias": torch.from_numpy(naming.bias), "min_confidence": naming.min_confidence,
            "calibration": naming.calibration,
            "item_labels": [[item, *rows] for item, rows in naming.item_labels.items()]}


def naming_from_state(state: dict[str, Any]) -> NamingTables:
    return NamingTables(names=list(state["names"]), sizes=list(state["sizes"]),
                        vocabulary=state["vocabulary"].numpy(),
                        projection=state["projection"].numpy(), bias=state["bias"].numpy(),
                        min_confidence=float(state["min_confidence"]),
                        calibration=dict(state["calibration"]),
                        item_labels={int(entry[0]): tuple(int(r) for r in entry[1:])
                                     for entry in state.get("item_labels") or []})


def item_labels(objective: EsimObjective, row_of: np.ndarray) -> dict[int, tuple[int, ...]]:
    """Internal item id -> the vocabulary rows of the semantic interests ESIM's supervision put
    it in (the items at an interest's history slots of a supervised user, as L_item uses
    them), each row once, in ascending order."""
    items, protos = labelled_items(objective.histories.numpy(), objective.owner.numpy(),
                                   objective.positions.numpy(), objective.proto.numpy())
    rows = row_of[objective.labels.numpy()[protos]]
    out: dict[int, set[int]] = {}
    for item, row in zip(items.tolist(), rows.tolist(), strict=True):
        if row >= 0:
            out.setdefault(item, set()).add(row)
    return {item: tuple(sorted(found)) for item, found in sorted(out.items())}


def interest_name(text: str) -> str:
    """'Space opera: epic films set in space' -> 'Space opera' (texts are "name: description")."""
    return text.partition(": ")[0].strip() or text.strip()


def vocabulary(semantic: np.ndarray, labels: np.ndarray, texts: list[str]
               ) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """The named vocabulary: (names, sizes, unit mean vectors, row of each label).

    Each non-empty label (k-means may leave one empty) is named by its member nearest the
    label's mean; labels that come out with the same name (k-means split "Action" in two) are
    one row, so a user never sees two interests named alike for two different labels. A row's
    vector is the unit mean of all its members."""
    by_name: dict[str, list[int]] = {}  # casefolded name -> members
    shown: dict[str, str] = {}  # casefolded name -> the name as first written
    label_name: dict[int, str] = {}
    for label in np.unique(labels).tolist():
        members = np.flatnonzero(labels == label)
        mean = semantic[members].mean(axis=0)
        nearest = members[int(np.argmax(semantic[members] @ mean))]
        label_name[label] = interest_name(texts[nearest])
        key = label_name[label].casefold()
        by_name.setdefault(key, []).extend(members.tolist())
        shown.setdefault(key, label_name[label])
    keys = list(by_name)
    names = [shown[k] for k in keys]
    sizes = [len(by_name[k]) for k in keys]
    means = np.stack([semantic[by_name[k]].mean(axis=0) for k in keys])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    row_of = np.full(int(labels.max()) + 1, -1)
    for label, name in label_name.items():
        row_of[label] = keys.index(name.casefold())
    return names, sizes, means.astype(np.float32), row_of


def choose_threshold(confidence: np.ndarray, correct: np.ndarray,
                     target: float = TARGET_PRECISION) -> tuple[float, float, float]:
    """(threshold, precision, coverage): the lowest confidence at which the names at or above
    it are right at least `target` of the time; 1.0 (nothing named) if no such point."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    precision = hits / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(precision >= target)
    if len(ok) == 0:
        return 1.0, 0.0, 0.0
    last = ok[-1]
    return float(confidence[order][last]), float(precision[last]), float((last + 1) / len(order))


@torch.no_grad()
def build_naming(objective: EsimObjective, model: MultiInterestEncoder,
                 texts: list[str]) -> NamingTables:
    semantic, labels = objective.semantic.numpy(), objective.labels.numpy()
    names, sizes, vectors, row_of = vocabulary(semantic, labels, texts)
    g = objective.heads.projection
    # Calibrate on every supervised (user, semantic interest) row: does the label nearest
    # g(matched behavioural interest) equal the label of the semantic interest?
    was_training = model.training
    model.eval()
    encoded = model.encode(objective.histories)
    model.train(was_training)
    match = objective.match(encoded.interests, encoded.weights)
    z = F.normalize(g(encoded.interests[objective.owner, match]), dim=-1).numpy()
    similarity = z @ vectors.T
    confidence = similarity.max(axis=1)
    rows = row_of[labels[objective.proto.numpy()]]  # the right vocabulary row of each
    correct = similarity.argmax(axis=1) == rows
    threshold, precision, coverage = choose_threshold(confidence, correct)
    # These rows were trained on: where they are right all the way down, the precision point
    # is their lowest cosine, far below what an unseen user's interest needs to be named
    # safely. So an interest must also be as clearly aligned as FLOOR_QUANTILE's share of the
    # correctly named training interests.
    floor = float(np.quantile(confidence[correct], FLOOR_QUANTILE)) if correct.any() else 1.0
    calibration = {"rows": len(correct), "accuracy": round(float(correct.mean()), 4),
                   "target_precision": TARGET_PRECISION, "precision_threshold": round(threshold, 4),
                   "precision": round(precision, 4), "coverage": round(coverage, 4),
                   "floor_quantile": FLOOR_QUANTILE, "floor": round(floor, 4),
                   "measured_on": "supervised training users"}
    threshold = max(threshold, floor)
    return NamingTables(names=names, sizes=sizes, vocabulary=vectors,
                        projection=g.weight.detach().numpy().astype(np.float32).copy(),
                        bias=g.bias.detach().numpy().astype(np.float32).copy(),
                        min_confidence=round(threshold, 4), calibration=calibration,
                        item_labels=item_labels(objective, row_of))
