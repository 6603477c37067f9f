"""Interest rows: the explicit interests a person sees, ranked by the behavioural model
(docs/architecture.md, "Interest rows").

An explicit interest is one value of an item field the bundle carries: a category, an ESIM
label, a declared field such as brand. For one user:

1. candidates: the values that at least `min_support` of the history's items hold; `because`
   lists those history items, most recent first;
2. each candidate's score: the model's predicted mass inside it, i.e. the share of
   softmax(score) over the list's candidates (the merged per-interest top-n) that falls on
   items holding the value, blended with the history's share of it;
3. the best candidates become rows, at most `rows`, leaving out any whose score is below
   `min_ratio` times the best one's: a user with one taste gets one row; the rows share
   `rows x size` items by score, at least `min_size` each (`row_sizes`);
4. each row holds the model's best items inside its value (the list's score: an item's best
   inner product over the K interests), among exactly those items as a filter is (the list's
   own candidates where they settle it, else a search restricted to the value's items);
   no item is in two rows, and a row left empty (a filter, exclusions) gives its place to
   the next candidate.

Pure numpy over a search callable, so that the service (`Recommender.finish`) and the
trainer's evaluation (`trainer/training/rows_eval.py`) run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.serving.filters import in_sorted
from service.serving.retrieval import merge_interest_results, share_quotas
from service.serving.row_policy import RowPolicy

# (allowed rows ascending, n) -> (scores, rows) [K, <= n]: the K interests' best among them.
SearchWithin = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# (allowed rows ascending, n) -> (rows, scores, heads): the n best of them by the list's score
# (an item's best inner product over the K interests), best first, and the interest of each.
BestWithin = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def best_by_search(search: SearchWithin) -> BestWithin:
    """Each interest's best among the rows (an index search), merged as the list is."""
    def within(pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores, rows = search(pool, n)
        return merge_interest_results(scores, rows, n)
    return within


def best_by_candidates(list_rows: np.ndarray, list_scores: np.ndarray, list_heads: np.ndarray,
                       bound: float, fallback: BestWithin) -> BestWithin:
    """The best inside an interest from the list's own candidates where they settle it, else
    `fallback`. `list_*`: the K per-interest top-n merged (distinct rows, best first);
    `bound`: the highest of the K interests' n-th scores. An item outside an interest's top n
    scores below that interest's n-th score, so a candidate whose merged score reaches `bound`
    has its true best score, and every item not among such candidates scores below `bound`:
    when the pool's n best candidates all reach it, they are the pool's n best."""
    def within(pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inside = np.flatnonzero(in_sorted(list_rows, pool))[:n]
        if len(inside) == min(n, len(pool)) and list_scores[inside[-1]] >= bound:
            return list_rows[inside], list_scores[inside], list_heads[inside]
        return fallback(pool, n)
    return within


def best_by_scores_lazily(scores: Callable[[], np.ndarray]) -> BestWithin:
    """`best_by_scores` over scores computed on the first call only: a request whose rows the
    list's candidates settle never pays for them."""
    made: list[BestWithin] = []

    def within(pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not made:
            made.append(best_by_scores(scores()))
        return made[0](pool, n)
    return within


def best_by_scores(scores: np.ndarray) -> BestWithin:
    """The same from every item's scores [K, N], computed once for all rows (exact over the
    whole item table: the offline evaluation, and the service's small catalogues)."""
    best, heads = scores.max(axis=0), scores.argmax(axis=0)

    def within(pool: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = best[pool]
        n = min(n, len(pool))
        top = np.argpartition(-values, n - 1)[:n] if n < len(pool) else np.arange(len(pool))
        top = top[np.argsort(-values[top], kind="stable")]
        return pool[top], values[top], heads[pool[top]]
    return within


@dataclass(frozen=True)
class FieldLabels:
    """One item field as rows use it: its values, the rows holding each (postings) and, per
    item row, the values it holds (CSR: values[offsets[r]:offsets[r + 1]])."""

    field: str
    names: tuple[str, ...]
    postings: tuple[np.ndarray, ...]
    offsets: np.ndarray  # [N + 1]
    values: np.ndarray  # value ids

    @classmethod
    def from_postings(cls, field: str, postings: Mapping[str, np.ndarray], item_count: int
                      ) -> FieldLabels:
        names = tuple(postings)
        lists = tuple(np.asarray(postings[name], dtype=np.int64) for name in names)
        rows = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
        ids = np.repeat(np.arange(len(lists), dtype=np.int64), [len(p) for p in lists])
        order = np.argsort(rows, kind="stable")
        offsets = np.zeros(item_count + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=item_count), out=offsets[1:])
        return cls(field, names, lists, offsets, ids[order])

    def holders(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in `rows`, value id) of every value the items `rows` hold."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        owner = np.repeat(np.arange(len(rows)), lengths)
        at = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, self.values[np.repeat(starts, lengths) + at]


@dataclass(frozen=True)
class Candidate:
    """An explicit interest a user's history holds, scored."""

    field: str
    value: int  # value id in its FieldLabels
    name: str
    score: float
    because: tuple[int, ...]  # history rows holding it, most recent first


@dataclass(frozen=True)
class Row:
    interest: Candidate
    rows: tuple[int, ...]  # its items (0-based rows), best first
    scores: tuple[float, ...]
    heads: tuple[int, ...]  # the behavioural interest that scored each item best


def softmax(scores: np.ndarray) -> np.ndarray:
    if len(scores) == 0:
        return scores.astype(np.float64)
    shifted = np.exp(scores.astype(np.float64) - float(scores.max()))
    return shifted / shifted.sum()


def candidates(history: np.ndarray, fields: Sequence[FieldLabels], list_rows: np.ndarray,
               list_scores: np.ndarray, policy: RowPolicy) -> list[Candidate]:
    """The user's explicit interests, best first, cut by `min_ratio` (not by `rows`: a row a
    filter empties gives its place to the next). `history`: rows, oldest first; `list_rows`,
    `list_scores`: the merged list's candidates (distinct rows) and their scores."""
    recent = history[::-1]
    _, first = np.unique(recent, return_index=True)
    recent = recent[np.sort(first)]  # distinct, most recent first
    if not len(recent):
        return []
    need = min(policy.min_support, len(recent))
    mass = softmax(list_scores)
    found: list[Candidate] = []
    for labels in fields:
        owner, values = labels.holders(recent)
        support = np.bincount(values, minlength=len(labels.names))
        eligible = np.flatnonzero(support >= need)
        if not len(eligible):
            continue
        history_share = support / len(recent)
        item_owner, item_values = labels.holders(list_rows)
        model_share = np.bincount(item_values, weights=mass[item_owner],
                                  minlength=len(labels.names))
        score = (policy.history_weight * history_share
                 + (1 - policy.history_weight) * model_share)
        # each value's history items, most recent first: owners grouped by value
        order = np.argsort(values, kind="stable")
        starts = np.searchsorted(values[order], eligible)
        held = recent[owner[order]].tolist()
        for value, start, score_of in zip(eligible.tolist(), starts.tolist(),
                                          score[eligible].tolist(), strict=True):
            found.append(Candidate(labels.field, value, labels.names[value],
                                   round(score_of, 4),
                                   tuple(held[start : start + int(support[value])])))
    found.sort(key=lambda c: (-c.score, -len(c.because), c.field, c.name))
    # One name, one row: where two fields hold the same name (ESIM's "Action" and the
    # category Action), the better-scored stands for both.
    named: dict[str, Candidate] = {}
    for candidate in found:
        named.setdefault(candidate.name.casefold(), candidate)
    found = list(named.values())
    if found:
        floor = policy.min_ratio * found[0].score
        found = [c for c in found if c.score >= floor]
    return found


def row_sizes(found: Sequence[Candidate], policy: RowPolicy) -> list[int]:
    """Items per row: `size` each, or (min_size set) the rows' len x size items shared by
    their scores, at least min_size each (largest remainder)."""
    if policy.min_size is None or not found:
        return [policy.size] * len(found)
    floor = min(policy.min_size, policy.size)
    spare = (policy.size - floor) * len(found)
    weights = np.asarray([max(c.score, 0.0) for c in found], dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(found),
                                                                        1 / len(found))
    return (share_quotas(weights, spare) + floor).tolist()


def fill_rows(found: Sequence[Candidate], fields: Mapping[str, FieldLabels],
              best: BestWithin, policy: RowPolicy, excluded: np.ndarray,
              allowed: np.ndarray | None = None) -> list[Row]:
    """Up to `policy.rows` rows (`row_sizes` items each), each the best inside its interest
    among the `allowed` rows (None: all) less `excluded` and the earlier rows' items. An
    interest with nothing left to show gives its place to the next."""
    usable = []  # the candidates with something to show under the request's restrictions
    for candidate in found:
        pool = fields[candidate.field].postings[candidate.value]
        if allowed is not None:
            pool = pool[in_sorted(pool, allowed)]
        if len(excluded):
            pool = pool[~in_sorted(pool, excluded)]
        if len(pool):
            usable.append((candidate, pool))
    sizes = row_sizes([c for c, _ in usable[: policy.rows]], policy)  # by place, best first
    out: list[Row] = []
    taken = np.zeros(0, dtype=np.int64)
    for candidate, pool in usable:
        if len(out) == policy.rows:
            break
        if len(taken):
            pool = pool[~in_sorted(pool, taken)]
        if not len(pool):  # the earlier rows took every item it holds: the next one's turn
            continue
        ids, scores, heads = best(pool, sizes[len(out)])
        if not len(ids):
            continue
        taken = np.union1d(taken, ids)
        out.append(Row(candidate, tuple(ids.tolist()), tuple(scores.astype(float).tolist()),
                       tuple(heads.tolist())))
    return out


def interest_rows(history: np.ndarray, fields: Sequence[FieldLabels], list_rows: np.ndarray,
                  list_scores: np.ndarray, best: BestWithin, policy: RowPolicy,
                  excluded: np.ndarray, allowed: np.ndarray | None = None) -> list[Row]:
    """`candidates` then `fill_rows`: one user's rows."""
    if policy.rows <= 0:
        return []
    found = candidates(history, fields, list_rows, list_scores, policy)
    return fill_rows(found, {f.field: f for f in fields}, best, policy, excluded, allowed)
