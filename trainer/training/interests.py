"""Are a user's K interests several, or copies of one? Measures of the interests themselves and
of the list they serve (docs/architecture.md, "Evaluation protocol").

Every measure takes the encoder's output [U, K, d] (and, for the list measures, the item
vectors), so it applies alike to a torch model, an ONNX bundle or hand-made interests:

* mean pairwise cosine of a user's K interests (1: copies);
* effective interests: the participation ratio (sum l)^2 / sum l^2 of the eigenvalues l of the
  K x K cosine matrix, 1 for K copies and K for K orthogonal interests;
* distinct items: how many of the K per-interest top-n lists' K * n items differ (ratio);
* head overlap: sum_l min(a_i[l], a_j[l]) of two heads' attention weights over the history
  (1: the same attention, 0: disjoint positions), mean over pairs;
* served effective interests: exp(entropy) of which interest each item of the merged top-n
  came from. With near-copy interests the source of an item is a near-tie, so this one alone
  overstates distinctness: read it beside the cosine.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from service.serving.retrieval import merge_interest_results
from trainer.training.evaluate import Search

# The per-interest list length of "distinct items" and the served-list length (at most it).
DISTINCT_AT = 50
SERVED_AT = 20


def _unit(interests: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(interests, axis=-1, keepdims=True)
    return interests / np.maximum(norms, 1e-12)


def pairwise_cosine(interests: np.ndarray) -> np.ndarray:
    """Each user's mean cosine over the K (K-1)/2 pairs of interests [U, K, d] -> [U]."""
    unit = _unit(interests)
    k = interests.shape[1]
    if k < 2:  # no pair: undefined for a single-interest model
        return np.full(len(interests), np.nan)
    gram = np.einsum("ukd,ujd->ukj", unit, unit)
    upper = np.triu_indices(k, 1)
    return gram[:, upper[0], upper[1]].mean(axis=1)


def effective_interests(interests: np.ndarray) -> np.ndarray:
    """Participation ratio of the eigenvalues of each user's K x K cosine matrix [U]."""
    unit = _unit(interests)
    gram = np.einsum("ukd,ujd->ukj", unit, unit)
    eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    return eig.sum(axis=1) ** 2 / np.maximum((eig**2).sum(axis=1), 1e-12)


def distinct_items(rows: np.ndarray) -> np.ndarray:
    """rows [U, K, n] per-interest top-n item rows -> share of the K * n that are distinct."""
    users, k, n = rows.shape
    if k < 2:  # one list is trivially all distinct
        return np.full(users, np.nan)
    return np.array([len(np.unique(rows[u])) / (k * n) for u in range(users)])


def head_overlap(weights: np.ndarray) -> np.ndarray:
    """weights [U, K, L] attention of each head over the history -> mean pairwise overlap [U]."""
    k = weights.shape[1]
    if k < 2:
        return np.full(len(weights), np.nan)
    pairs = [np.minimum(weights[:, i], weights[:, j]).sum(axis=1)
             for i, j in combinations(range(k), 2)]
    return np.mean(pairs, axis=0)


def source_diversity(sources: np.ndarray, k: int) -> float:
    """exp(entropy) of which of the k interests a list's items came from (1 to k)."""
    share = np.bincount(sources, minlength=k) / max(len(sources), 1)
    share = share[share > 0]
    return float(np.exp(-(share * np.log(share)).sum()))


def served_effective_interests(scores: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """`source_diversity` of each user's merged top-n [U]."""
    return np.array([source_diversity(merge_interest_results(scores[u], rows[u], n)[2],
                                      scores.shape[1]) for u in range(len(scores))])


def search_interests(interests: np.ndarray, search: Search, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each interest's top n: (scores, rows) [U, K, n], one search for all U * K."""
    users, k, d = interests.shape
    scores, rows = search(interests.reshape(-1, d), n)
    return scores.reshape(users, k, n), rows.reshape(users, k, n)


def per_user_distinctness(interests: np.ndarray, scores: np.ndarray, rows: np.ndarray,
                          weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every measure above for every user, keyed by name; `scores`, `rows` [U, K, n >=
    DISTINCT_AT] are the interests' search results (`search_interests`)."""
    out = {
        "interest_cosine": pairwise_cosine(interests),
        "effective_interests": effective_interests(interests),
        f"distinct_items@{DISTINCT_AT}": distinct_items(rows[:, :, :DISTINCT_AT]),
        f"served_interests@{SERVED_AT}": served_effective_interests(scores, rows, SERVED_AT),
    }
    if weights is not None:
        out["head_overlap"] = head_overlap(weights)
    return out


def distinctness(interests: np.ndarray, search: Search,
                 weights: np.ndarray | None = None) -> dict[str, float]:
    """Means over users of `per_user_distinctness`."""
    scores, rows = search_interests(interests, search, DISTINCT_AT)
    return {name: round(float(values.mean()), 4) for name, values
            in per_user_distinctness(interests, scores, rows, weights).items()}


# Minority-interest recall: "interest" without any trained encoder. Items are clustered once per
# dataset (and fold) from the training users' interactions, with a fixed seed; a user's dominant
# interest is the cluster most of their (encoder-visible) history falls in, and a minority
# target is a test item outside it. Decided before comparing any model (docs/architecture.md,
# "Evaluation protocol").
ITEM_CLUSTERS = 8
CLUSTER_DIM = 16
CLUSTER_SEED = 0
# The user x item matrix the clusters come from is dense: above this size they are skipped.
MAX_CLUSTER_CELLS = 50_000_000


def item_clusters(flat: np.ndarray, offsets: np.ndarray, users: np.ndarray, n_items: int,
                  clusters: int = ITEM_CLUSTERS, seed: int = CLUSTER_SEED) -> np.ndarray | None:
    """Cluster of every internal id [N + 1] (-1: padding or an item no training user has): k-means
    on the items' truncated-SVD factors of the training users' (row-normalised) interactions.
    None when the matrix would be too large."""
    if len(users) * (n_items + 1) > MAX_CLUSTER_CELLS:
        return None
    import faiss

    matrix = np.zeros((len(users), n_items + 1), dtype=np.float32)
    for row, u in enumerate(users):
        matrix[row, flat[offsets[u] : offsets[u + 1]]] = 1.0
    matrix[:, 0] = 0.0
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    _, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    dim = min(CLUSTER_DIM, len(singular))
    factors = np.ascontiguousarray((vt[:dim].T * singular[:dim]).astype(np.float32))
    seen = matrix.any(axis=0)
    factors /= np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-12)
    kmeans = faiss.Kmeans(dim, clusters, niter=25, seed=seed, verbose=False)
    kmeans.train(factors[seen])
    labels = np.full(n_items + 1, -1, dtype=np.int64)
    labels[seen] = kmeans.index.search(factors[seen], 1)[1][:, 0]
    return labels


def dominant_cluster(history: np.ndarray, labels: np.ndarray) -> tuple[int, float]:
    """(the most frequent cluster of a history's items, its share); (-1, 0) for none."""
    known = labels[history[history > 0]]
    known = known[known >= 0]
    if len(known) == 0:
        return -1, 0.0
    counts = np.bincount(known)
    return int(counts.argmax()), float(counts.max() / len(known))


def minority_recall(ranked: list[np.ndarray], histories: np.ndarray,
                    targets: list[np.ndarray], labels: np.ndarray,
                    n: int = DISTINCT_AT) -> dict[str, np.ndarray]:
    """Per user: Recall@n on targets outside / inside the dominant cluster (NaN where the user
    has none), and the history's dispersion (1 - the dominant cluster's share)."""
    minority, dominant, dispersion = [], [], []
    for top, history, wanted in zip(ranked, histories, targets, strict=True):
        main, share = dominant_cluster(history, labels)
        hit = np.isin(wanted, np.asarray(top)[:n])
        outside = labels[wanted] != main
        minority.append(hit[outside].mean() if outside.any() else np.nan)
        dominant.append(hit[~outside].mean() if (~outside).any() else np.nan)
        dispersion.append(1.0 - share)
    return {f"minority_recall@{n}": np.asarray(minority, dtype=float),
            f"dominant_recall@{n}": np.asarray(dominant, dtype=float),
            "history_dispersion": np.asarray(dispersion)}


# What users feel, by the items' categories (MovieLens genres "A|B", synthetic "topic-3").
CATEGORY_SEPARATOR = "|"


def category_sets(categories: np.ndarray) -> list[frozenset[str]]:
    """Each internal id's set of categories (padding and unlabelled items: empty)."""
    return [frozenset(c for c in str(value).split(CATEGORY_SEPARATOR) if c)
            for value in categories]


def category_measures(ranked: list[np.ndarray], rows: np.ndarray, histories: np.ndarray,
                      categories: np.ndarray, n: int = DISTINCT_AT) -> dict[str, np.ndarray]:
    """Per user, from the items' categories:

    * category coverage: distinct categories in the merged top-n;
    * intra-list diversity: mean over pairs of the top-n of 1 - Jaccard(categories);
    * with one category per item (planted topics): interest purity, the share of each
      interest's own top-n in its most common category (mean over interests), and topics
      covered, how many of the categories in the user's history are some interest's majority.

    `ranked`: merged top lists (internal ids); `rows` [U, K, m]: per-interest top rows (id - 1).
    """
    sets = category_sets(categories)
    names = sorted(set().union(*sets))
    single = all(len(s) <= 1 for s in sets)
    column = {name: i for i, name in enumerate(names)}
    onehot = np.zeros((len(sets), max(len(names), 1)), dtype=np.float32)
    for item, found in enumerate(sets):
        onehot[item, [column[c] for c in found]] = 1.0
    coverage, diversity, purity, covered = [], [], [], []
    for u, top in enumerate(ranked):
        top = np.asarray(top)[:n]
        hot = onehot[top]
        coverage.append(float(hot.any(axis=0).sum()))
        inter = hot @ hot.T
        sizes = hot.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        jaccard = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        pairs = np.triu_indices(len(top), 1)
        diversity.append(float((1 - jaccard[pairs]).mean()) if len(pairs[0]) else 0.0)
        if single:
            labels = onehot[rows[u, :, :n] + 1].argmax(axis=-1)  # [K, n]
            labelled = onehot[rows[u, :, :n] + 1].any(axis=-1)
            shares, majorities = [], set()
            for k in range(rows.shape[1]):
                mine = labels[k][labelled[k]]
                if len(mine):
                    counts = np.bincount(mine)
                    shares.append(counts.max() / len(mine))
                    majorities.add(int(counts.argmax()))
            history = histories[u][histories[u] > 0]
            own = {int(c) for c in onehot[history].argmax(axis=-1)[onehot[history].any(-1)]}
            purity.append(float(np.mean(shares)) if shares else np.nan)
            covered.append(float(len(majorities & own)))
    out = {f"category_coverage@{n}": np.asarray(coverage),
           f"intra_list_diversity@{n}": np.asarray(diversity)}
    if single:
        out[f"interest_purity@{n}"] = np.asarray(purity)
        out["topics_covered"] = np.asarray(covered)
    return out
