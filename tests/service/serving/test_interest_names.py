"""Named and adaptive interests at serving: the naming files in the bundle format, the namer,
and the adaptive merge (drop unsupported interests, merge near-duplicates, share the list)."""

import numpy as np
import pytest

from service.bundle.format import (
    NAMING,
    NAMING_PROJECTION,
    SEMANTIC_DIM,
    BundleError,
    publish,
    read_manifest,
)
from service.bundle.load import load_bundle
from service.bundle.naming_files import NamingTables, read_naming, write_naming
from service.serving.interest_names import InterestNamer
from service.serving.recommender import Recommender, Shaping
from service.serving.retrieval import (
    adapt_interests,
    interest_support,
    merge_by_share,
    share_quotas,
)


def tables(dim: int, names=("space opera", "film noir", "cartoons"), min_confidence=0.5):
    """A vocabulary of unit axes 0..L-1 and a projection that copies v into them: interest v
    is named by its largest coordinate among the first L, with cosine = that share."""
    vocabulary = np.eye(len(names), SEMANTIC_DIM, dtype=np.float32)
    projection = np.eye(SEMANTIC_DIM, dim, dtype=np.float32)
    return NamingTables(names=list(names), sizes=[3, 2, 1], vocabulary=vocabulary,
                        projection=projection, bias=np.zeros(SEMANTIC_DIM, np.float32),
                        min_confidence=min_confidence, calibration={"rows": 6})


def test_namer_names_confident_interests_only():
    namer = InterestNamer(tables(dim=4))
    interests = np.array([[0, 5, 0, 0],  # film noir, cosine 1
                          [3, 0, 0, 4],  # nearest "space opera" at cosine 0.6
                          [1, 0, 0, 3]], np.float32)  # space opera at 0.32: not confident
    named = namer.name(interests)
    assert [n for n, _ in named] == ["film noir", "space opera", None]
    assert [c for _, c in named] == pytest.approx([1.0, 0.6, 0.3162], abs=1e-4)
    assert namer.name(interests, min_confidence=0.3)[2][0] == "space opera"  # the override
    assert namer.name(interests, min_confidence=0.99)[1][0] is None


def test_naming_files_round_trip_and_are_checked(tmp_path):
    write_naming(tmp_path, tables(dim=4))
    back = read_naming(tmp_path, dim=4)
    assert back.names == ["space opera", "film noir", "cartoons"] and back.sizes == [3, 2, 1]
    assert np.array_equal(back.projection, np.eye(SEMANTIC_DIM, 4)) and not back.bias.any()
    with pytest.raises(BundleError, match=NAMING_PROJECTION):
        read_naming(tmp_path, dim=8)  # a projection for another encoder width
    (tmp_path / NAMING).write_text('{"names": ["a"]}')
    with pytest.raises(BundleError, match=f"{NAMING}: unreadable"):
        read_naming(tmp_path, dim=4)


def test_a_bundle_with_naming_names_interests_and_one_without_does_not(tiny_bundle, tmp_path):
    plain = Recommender(load_bundle(tiny_bundle))
    dim = plain.bundle.manifest.dim
    manifest = read_manifest(tiny_bundle)
    body = {k: v for k, v in manifest.model_dump().items()
            if k not in ("files", "version", "name", "created", "format_version")}

    def write(staging):  # the same bundle plus naming files, through the real publisher
        for file in manifest.files:
            (staging / file).write_bytes((tiny_bundle / file).read_bytes())
        write_naming(staging, tables(dim, min_confidence=0.0))

    named = Recommender(load_bundle(publish(tmp_path, "named", write, body)))
    assert NAMING in named.bundle.manifest.files  # listed with its checksum
    history = plain.bundle.item_ids[:8].tolist()
    a, b = plain.recommend(history, 10), named.recommend(history, 10)
    assert a.item_ids == b.item_ids and a.scores == b.scores  # naming never changes the list
    assert all(d.name is None and d.confidence is None for d in a.interest_details)
    assert all(d.name in ("space opera", "film noir", "cartoons") for d in b.interest_details)
    assert all(-1 <= d.confidence <= 1 for d in b.interest_details)
    assert sum(d.weight for d in b.interest_details) == pytest.approx(1.0, abs=1e-3)


def test_support_counts_each_history_item_for_its_best_interest():
    interests = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    history = np.array([[2, 0.1], [3, -1], [0.2, 1], [0, 5]], np.float32)
    assert interest_support(interests, history).tolist() == [2, 2, 0]
    assert interest_support(interests, np.zeros((0, 2), np.float32)).tolist() == [0, 0, 0]


def test_adaptive_drops_unsupported_and_merges_near_duplicates():
    interests = np.array([[1, 0], [0.99, 0.05], [0, 1], [-1, 0]], np.float32)
    weights, merged_into = adapt_interests(interests, np.array([4, 2, 2, 0]), merge_cosine=0.95)
    assert merged_into.tolist() == [0, 0, 2, -1]  # 1 is a near-duplicate of 0; 3 unsupported
    assert weights.tolist() == pytest.approx([0.75, 0, 0.25, 0])
    weights, merged_into = adapt_interests(interests, np.array([4, 2, 2, 0]), merge_cosine=1.0)
    assert merged_into.tolist() == [0, 1, 2, -1]  # nothing is that close
    weights, _ = adapt_interests(interests, np.zeros(4, np.int64), merge_cosine=0.9)
    assert weights.tolist() == [0.25] * 4  # no history: nothing to go by


def test_share_quotas_follow_weights_and_fill_the_list():
    assert share_quotas(np.array([0.5, 0.25, 0.25, 0.0]), 10).tolist() == [5, 3, 2, 0]
    assert share_quotas(np.array([1 / 3] * 3), 20).sum() == 20


def test_merge_by_share_gives_each_interest_its_places():
    # Interest 0 scores everything higher; with a 50/50 share interest 1 still gets 2 of 4.
    scores = np.array([[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]], np.float32)
    ids = np.array([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    items, best, which = merge_by_share(scores, ids, 4, np.array([0.5, 0.5]))
    assert items.tolist() == [10, 11, 20, 21] and which.tolist() == [0, 0, 1, 1]
    assert np.all(np.diff(best) <= 0)  # still ordered by score
    # Exclusions are honoured and an interest that runs out leaves its places to the other.
    ids[1] = [10, 11, 12, 13, -1]
    items, _, which = merge_by_share(scores, ids, 4, np.array([0.5, 0.5]), np.array([10]))
    assert 10 not in items.tolist() and len(items) == 4 == len(set(items.tolist()))
    # A dropped interest (weight 0) contributes nothing.
    ids[1] = [20, 21, 22, 23, 24]
    items, _, which = merge_by_share(scores, ids, 3, np.array([0.0, 1.0]))
    assert items.tolist() == [20, 21, 22] and set(which.tolist()) == {1}


def test_adaptive_setting_changes_the_answer_only_when_on(tiny_bundle):
    model = Recommender(load_bundle(tiny_bundle))
    history = model.bundle.item_ids[:12].tolist()
    # off: adaptive interests off and no near-copy report (copy_cosine None), as before both
    off = model.recommend(history, 20, shaping=Shaping(copy_cosine=None))
    on = model.recommend(history, 20, shaping=Shaping(merge_cosine=0.5))
    assert len(on.item_ids) == 20 == len(set(on.item_ids))
    details = on.interest_details
    assert sum(d.weight for d in details) == pytest.approx(1.0, abs=1e-3)
    for i, d in enumerate(details):  # a dropped or merged interest retrieved nothing
        if d.dropped or d.merged_into is not None:
            assert d.weight == 0 and on.interest_counts[i] == 0
    assert not any(d.dropped or d.merged_into is not None for d in off.interest_details)
    # the near-copy report (the default) changes what the summary says, never the list
    assert model.recommend(history, 20).item_ids == off.item_ids
