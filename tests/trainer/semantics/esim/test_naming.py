"""The naming vocabulary and the calibrated threshold (trainer/semantics/esim/naming.py)."""

import numpy as np
import pytest

from trainer.semantics.esim.naming import choose_threshold, interest_name, vocabulary


def unit(*rows):
    a = np.array(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_vocabulary_names_a_label_by_its_central_member_and_skips_empty_labels():
    semantic = unit([1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1])
    labels = np.array([0, 0, 0, 3])  # labels 1 and 2 left empty by k-means
    texts = ["Westerns: a", "Space westerns: b", "Space: c", "Noir: d"]
    names, sizes, vectors, row_of = vocabulary(semantic, labels, texts)
    assert names == ["Space westerns", "Noir"] and sizes == [3, 1]  # [1,1,0] is central
    assert row_of.tolist() == [0, -1, -1, 1]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_equal_names_share_one_row():
    semantic = unit([1, 0], [0, 1], [1, 1])
    names, sizes, vectors, row_of = vocabulary(semantic, np.array([0, 1, 2]),
                                               ["Drama: a", "drama: b", "Comedy: c"])
    assert names == ["Drama", "Comedy"] and sizes == [2, 1]
    assert row_of.tolist() == [0, 0, 1]
    assert np.allclose(vectors[0], unit([1, 1])[0])  # the mean of both "Drama" members


def test_threshold_is_the_lowest_confidence_meeting_the_precision():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = np.array([True, True, True, True, False, False])
    threshold, precision, coverage = choose_threshold(confidence, correct, target=0.8)
    assert threshold == pytest.approx(0.5) and precision == pytest.approx(0.8)
    assert coverage == pytest.approx(5 / 6)
    assert choose_threshold(confidence, np.zeros(6, bool))[0] == 1.0  # never right: no names


def test_interest_name_is_the_part_before_the_description():
    assert interest_name("Space opera: epic films: in space") == "Space opera"
    assert interest_name("no description") == "no description"
