"""ComiRec preprocessing, id mapping, user split and batch construction.

Internal item ids are 1..N (0 = padding). A history row is right-aligned: most recent item in
the last column, zeros on the left; that is also the encoder's ONNX input layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trainer.data.loaders import DataError, RawData

MIN_TARGET_POSITION = 4  # ComiRec: a training target has at least 4 items before it
EVAL_HISTORY_SHARE = 0.8  # valid/test users: first 80% is history, the rest are targets


@dataclass
class EvalSplit:
    histories: np.ndarray  # int64 [users, maxlen], right-aligned
    targets: list[np.ndarray]  # unique internal ids per user, in order of first interaction
    users: np.ndarray  # user indices into SequenceDataset.user_ids


@dataclass
class TextOnlyItems:
    """Items of the items file without any interaction (new in the shop): ids and texts, so
    that export can place them by their text (trainer/semantics/text_only.py)."""

    item_ids: np.ndarray  # external ids (str)
    titles: np.ndarray
    categories: np.ndarray
    years: np.ndarray
    fields: dict[str, np.ndarray] = field(default_factory=dict)  # declared field -> values

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass
class SequenceDataset:
    name: str
    source: str
    fingerprint: str
    item_ids: np.ndarray  # external id (str) of internal id i at position i; [0] = padding
    titles: np.ndarray
    categories: np.ndarray
    years: np.ndarray
    user_ids: np.ndarray  # external user id of user index u
    flat: np.ndarray  # all sequences concatenated, internal ids
    offsets: np.ndarray  # sequence u is flat[offsets[u]:offsets[u + 1]]
    train_users: np.ndarray
    valid_users: np.ndarray
    test_users: np.ndarray
    split_seed: int
    # 0: the 80/10/10 split; else user-level cross-validation (docs/architecture.md,
    # "Evaluation protocol")
    folds: int = 0
    fold: int = 0
    text_only: TextOnlyItems | None = None
    # Declared item fields (RawData.item_fields): name -> '|'-joined values per internal id.
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def sequence(self, user: int) -> np.ndarray:
        return self.flat[self.offsets[user] : self.offsets[user + 1]]

    def popularity(self) -> np.ndarray:
        """Interaction counts per internal id over training users (index 0 = padding = 0)."""
        lengths = np.diff(self.offsets)
        is_train = np.zeros(self.n_users, dtype=bool)
        is_train[self.train_users] = True
        items = self.flat[np.repeat(is_train, lengths)]
        return np.bincount(items, minlength=self.n_items + 1).astype(np.int64)

    def train_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """All (user, target position) pairs of training users with position >= 4."""
        lengths = self.offsets[self.train_users + 1] - self.offsets[self.train_users]
        n_targets = np.maximum(lengths - MIN_TARGET_POSITION, 0)
        users = np.repeat(self.train_users, n_targets)
        first = np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
        positions = np.arange(int(n_targets.sum())) - first + MIN_TARGET_POSITION
        return users, positions

    def train_windows(self, maxlen: int, rng: np.random.Generator | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(user, end) pairs for backbones trained on every position: the history window
        [end - maxlen, end) predicts positions end - maxlen + 1 .. end, so windows ending at
        n - 1, n - 1 - r - maxlen, n - 1 - r - 2 maxlen, ... cover every position 1..n-1 of
        a training user once or twice per epoch. r (random per user with `rng`, else 0)
        moves the window borders from epoch to epoch; the latest window is always kept."""
        lengths = self.offsets[self.train_users + 1] - self.offsets[self.train_users]
        users, ends = [], []
        shifts = (rng.integers(0, maxlen, len(lengths)) if rng is not None
                  else np.zeros(len(lengths), dtype=np.int64))
        for user, n, shift in zip(self.train_users, lengths, shifts, strict=True):
            if n < 2:
                continue
            user_ends = np.arange(n - 1 - shift, 0, -maxlen)
            if shift:
                user_ends = np.concatenate([[n - 1], user_ends])
            users.append(np.full(len(user_ends), user))
            ends.append(user_ends)
        if not users:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(users).astype(np.int64), np.concatenate(ends).astype(np.int64)

    def histories(self, users: np.ndarray, ends: np.ndarray, maxlen: int) -> np.ndarray:
        """Right-aligned histories: items [end - maxlen, end) of each user's sequence."""
        starts = self.offsets[users]
        stop = starts + ends
        index = stop[:, None] - maxlen + np.arange(maxlen)[None, :]
        valid = index >= starts[:, None]
        out = np.where(valid, self.flat[np.clip(index, 0, None)], 0)
        return out.astype(np.int64)

    def future_targets(self, users: np.ndarray, ends: np.ndarray, maxlen: int, horizon: int,
                       rng: np.random.Generator) -> np.ndarray:
        """The training target of every position of the windows `histories` returns [B, L]:
        an item drawn uniformly from the next `horizon` of the sequence (cut at its end);
        0 under padding. horizon 1: the history shifted by one, then the item at `end`."""
        starts, lengths = self.offsets[users], self.offsets[users + 1] - self.offsets[users]
        position = ends[:, None] - maxlen + np.arange(maxlen)[None, :]  # in the sequence
        ahead = 1 + rng.integers(0, horizon, position.shape) if horizon > 1 else 1
        target = np.minimum(position + ahead, lengths[:, None] - 1)
        out = np.where(position >= 0, self.flat[starts[:, None] + np.clip(target, 0, None)], 0)
        return out.astype(np.int64)

    def eval_split(self, which: str, maxlen: int) -> EvalSplit:
        users = {"valid": self.valid_users, "test": self.test_users}[which]
        lengths = self.offsets[users + 1] - self.offsets[users]
        cut = (lengths * EVAL_HISTORY_SHARE).astype(np.int64)
        targets = []
        for u, c in zip(users, cut, strict=True):
            rest = self.sequence(u)[c:]
            targets.append(pd.unique(rest))
        return EvalSplit(self.histories(users, cut, maxlen), targets, users)

    def has_item_text(self) -> bool:
        """Whether any item has a title or a category (an items file): what `--item-text`
        reads."""
        return bool(any(str(t).strip() for t in self.titles[1:])
                    or any(str(c).strip() for c in self.categories[1:]))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(len(self.flat)),
            "train_users": int(len(self.train_users)),
            "valid_users": int(len(self.valid_users)),
            "test_users": int(len(self.test_users)),
            "split_seed": self.split_seed,
            **({"folds": self.folds, "fold": self.fold} if self.folds else {}),
        }


def split_users(n_users: int, seed: int, folds: int = 0, fold: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) user indices, each sorted.

    folds == 0: users shuffled with `seed`, split 80/10/10. folds >= 3: user-level
    cross-validation (docs/architecture.md, "Evaluation protocol"): users shuffled once
    with `seed` into `folds` near-equal folds; run `fold` tests on fold f, validates on
    fold f + 1 (mod folds), trains on the rest, so that over all runs every user is tested
    exactly once."""
    order = np.random.default_rng(seed).permutation(n_users)
    if not folds:
        n_train = int(round(0.8 * n_users))
        n_valid = int(round(0.1 * n_users))
        parts = order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :]
        return tuple(np.sort(p) for p in parts)  # type: ignore[return-value]
    if folds < 3 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 3 and 0 <= fold < folds")
    if n_users < folds:
        raise ValueError(f"{n_users} users cannot be split into {folds} folds")
    chunks = np.array_split(order, folds)
    valid = (fold + 1) % folds
    train = np.concatenate([c for i, c in enumerate(chunks) if i not in (fold, valid)])
    return np.sort(train), np.sort(chunks[valid]), np.sort(chunks[fold])


def build_dataset(
    raw: RawData, *, min_item_count: int = 1, min_user_count: int = 5, split_seed: int = 0,
    folds: int = 0, fold: int = 0, train_events: int = 0,
) -> SequenceDataset:
    """Filtering (items >= `min_item_count`, 1 keeps every item with an event; then users
    >= `min_user_count`), id mapping, and the user split:
    80/10/10, or fold `fold` of `folds`-fold cross-validation (`split_users`).
    `train_events` > 0 keeps only the first that many events of every training user (a
    sparse-behaviour regime; the filters count the whole data, so the catalogue and the
    evaluated users are those of the full run)."""
    df = raw.interactions
    item_counts = df["item_id"].value_counts()
    df = df[df["item_id"].isin(item_counts.index[item_counts >= min_item_count])]
    user_counts = df["user_id"].value_counts()
    df = df[df["user_id"].isin(user_counts.index[user_counts >= min_user_count])]
    if df["user_id"].nunique() < 10:
        raise DataError(
            f"{raw.source}: only {df['user_id'].nunique()} users left after keeping items with "
            f">= {min_item_count} and users with >= {min_user_count} interactions; need >= 10"
        )
    # Stable sort keeps file order between equal timestamps.
    df = df.sort_values(["user_id", "timestamp"], kind="stable")

    item_ext = np.array(sorted(df["item_id"].unique(), key=_natural_key), dtype=object)
    item_index = pd.Index(item_ext)
    internal = item_index.get_indexer(df["item_id"]) + 1

    user_codes, user_ext = pd.factorize(df["user_id"], sort=False)
    lengths = np.bincount(user_codes)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    titles = np.full(len(item_ext) + 1, "", dtype=object)
    categories = np.full(len(item_ext) + 1, "", dtype=object)
    years = np.full(len(item_ext) + 1, np.nan)
    fields = {name: np.full(len(item_ext) + 1, "", dtype=object) for name in raw.item_fields}
    if raw.items is not None:
        meta = raw.items.set_index("item_id").reindex(item_ext)
        titles[1:] = meta["title"].fillna("").to_numpy(dtype=object)
        categories[1:] = meta["categories"].fillna("").to_numpy(dtype=object)
        years[1:] = meta["year"].to_numpy(dtype=float)
        for name, values in fields.items():
            values[1:] = meta[name].fillna("").to_numpy(dtype=object)

    train_users, valid_users, test_users = split_users(len(user_ext), split_seed, folds, fold)
    flat = internal.astype(np.int64)
    if train_events:
        flat, offsets = cut_sequences(flat, offsets, train_users, train_events)
    return SequenceDataset(
        name=raw.name,
        source=raw.source,
        fingerprint=raw.fingerprint(),
        item_ids=np.concatenate([[""], item_ext]).astype(object),
        titles=titles,
        categories=categories,
        years=years,
        user_ids=np.asarray(user_ext, dtype=object),
        flat=flat,
        offsets=offsets,
        train_users=train_users,
        valid_users=valid_users,
        test_users=test_users,
        split_seed=split_seed,
        folds=folds,
        fold=fold,
        text_only=text_only_items(raw),
        fields=fields,
    )


def text_only_items(raw: RawData) -> TextOnlyItems | None:
    """The rows of the items file with a title and no interaction at all: new items. (Items
    under the filter are left out: their events exist, and --min-item-count keeps them.)"""
    if raw.items is None:
        return None
    rest = raw.items[~raw.items["item_id"].isin(raw.interactions["item_id"])
                     & (raw.items["title"].str.strip() != "")]
    return TextOnlyItems(rest["item_id"].to_numpy(dtype=object),
                         rest["title"].to_numpy(dtype=object),
                         rest["categories"].to_numpy(dtype=object),
                         rest["year"].to_numpy(dtype=float),
                         {name: rest[name].to_numpy(dtype=object) for name in raw.item_fields})


def cut_sequences(flat: np.ndarray, offsets: np.ndarray, users: np.ndarray, keep: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(flat, offsets) with the sequences of `users` cut to their first `keep` items."""
    if keep < 2:
        raise DataError(f"train_events {keep}: a training user needs at least 2 events")
    lengths = np.diff(offsets)
    new_lengths = lengths.copy()
    new_lengths[users] = np.minimum(lengths[users], keep)
    position = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    kept = position < np.repeat(new_lengths, lengths)
    return flat[kept], np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64)


def _natural_key(value: str) -> tuple[int, int | str]:
    # Numeric ids sort numerically, so internal ids follow the external order users expect.
    return (0, int(value)) if value.isdigit() else (1, value)
