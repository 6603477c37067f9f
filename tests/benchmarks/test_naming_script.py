"""benchmarks/naming.py: how many different names a user's served interests carry."""

from __future__ import annotations

from service.serving.recommender import InterestDetail
from tests.helpers import benchmark_script


def named(name: str | None) -> InterestDetail:
    return InterestDetail(0.25, None, False, name, None if name is None else 0.9)


def test_served_name_count_counts_names_of_serving_interests_only():
    with benchmark_script("naming") as naming:
        details = [named("Drama"), named("Drama"), named("Sci-Fi"), named(None)]
        # interests 0 and 1 serve: one name, twice
        assert naming.served_name_count([0, 1, 1, 0], details) == 1
        # interest 2 serves too: two names
        assert naming.served_name_count([0, 2, 1], details) == 2
        # an unnamed interest and the popularity fallback (None) add no name
        assert naming.served_name_count([3, None, 0], details) == 1
        # Sci-Fi's interest does not serve: its name does not count
        assert naming.served_name_count([3, 3], details) == 0
