"""How interest rows are chosen (service/serving/rows.py): the policy alone, without numpy, so
that the settings can take their defaults from it and stay light to import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowPolicy:
    """How rows are chosen (decided on validation folds: docs/results.md, "Interest rows")."""

    rows: int = 0  # at most this many rows; 0: none
    size: int = 10  # items per row
    min_support: int = 1  # history items a value needs to be a candidate
    history_weight: float = 0.25  # 0: the model's mass alone; 1: the history's share alone
    min_ratio: float = 0.02  # a row's score is at least this share of the best row's
    # None: every row `size` items; a number: the rows share rows x size items by their
    # scores, each at least this many
    min_size: int | None = 2


# The list's share of places for new items (no event yet, placed by their text): see
# Shaping.new_item_share; chosen on validation users (docs/results.md, "The whole catalogue
# (issue 34)").
NEW_ITEM_SHARE = 0.1
