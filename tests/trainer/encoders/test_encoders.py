import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import BACKBONES, SINGLE_INTEREST_BACKBONES, TrainConfig
from trainer.encoders.base import (
    EMBEDDING_INIT_ROWS,
    BestInterestScore,
    Negatives,
    init_item_embeddings,
)
from trainer.encoders.registry import build_encoder
from trainer.training.loop import LogUniformSampler


def make(backbone, n_items=30, k=3, d=8, maxlen=6, interest_loss="max", **settings):
    # float32 products unless a test asks: the losses are checked against formulas to 1e-5
    # (bfloat16 has its own test).
    settings.setdefault("score_dtype", "float32")
    torch.manual_seed(0)
    return build_encoder(n_items, TrainConfig(backbone=backbone, interests=k, dim=d, maxlen=maxlen,
                                              interest_loss=interest_loss, **settings))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_padding_and_gradients(backbone):
    model = make(backbone)
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    enc = model.encode(ids)
    k = 1 if backbone in SINGLE_INTEREST_BACKBONES else 3  # SASRec: one whatever K says
    assert enc.interests.shape == (3, k, 8) and enc.weights.shape == (3, k, 6)
    assert torch.isfinite(enc.interests).all()
    # Padded positions feed no interest.
    assert torch.all(enc.weights[0, :, :2] == 0)
    loss = model.loss(ids[[0, 2]], torch.tensor([7, 8]))
    loss.backward()
    assert torch.isfinite(loss) and model.item_embedding.weight.grad[7].abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_padding_values_do_not_leak(backbone):
    """The same items with a different amount of left padding give the same interests
    when positions are aligned on the right (most recent last)."""
    model = make(backbone).eval()
    a = model(torch.tensor([[0, 0, 0, 3, 4, 5]]))
    model.item_embedding.weight.data[0] = 5.0  # would leak if padding were not masked
    b = model(torch.tensor([[0, 0, 0, 3, 4, 5]]))
    assert torch.allclose(a, b, atol=1e-6)


def test_argmax_loss_is_comirecs_hard_readout():
    model = make("comirec-sa", interest_loss="argmax").eval()
    ids, targets = torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([9])
    interests = model(ids)[0]
    target_vec = model.item_embedding.weight[9]
    best = int((interests @ target_vec).argmax())
    logits = interests[best] @ model.item_embedding.weight[1:].T
    expected = F.cross_entropy(logits[None], targets - 1)
    assert torch.allclose(model.loss(ids, targets), expected)


def test_max_loss_scores_every_item_by_its_best_interest():
    # the training rule is the serving merge: an item's score is its best interest's
    model = make("comirec-sa").eval()
    ids, targets = torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([9])
    interests = model(ids)[0]
    logits = (interests @ model.item_embedding.weight[1:].T).amax(0)
    expected = F.cross_entropy(logits[None], targets - 1)
    assert torch.allclose(model.loss(ids, targets), expected, atol=1e-6)
    # unlike argmax, a negative scored highly by another interest is punished
    argmax = make("comirec-sa", interest_loss="argmax").eval()
    assert model.loss(ids, targets) > argmax.loss(ids, targets)


@pytest.mark.parametrize("sampled", [False, True])
def test_argmax_weight_adds_the_argmax_loss_to_the_max_loss(sampled):
    ids, targets = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]), torch.tensor([9, 7])
    negatives = (LogUniformSampler(np.arange(31, 0, -1.0)).sample(12, torch.Generator()
                                                                  .manual_seed(0))
                 if sampled else None)
    losses = {}
    for name, kwargs in {"max": {}, "argmax": {"interest_loss": "argmax"},
                         "zero": {"argmax_weight": 0.0}, "mixed": {"argmax_weight": 0.5}}.items():
        losses[name] = make("transformer-sa", **kwargs).eval().loss(ids, targets, negatives)
    assert torch.equal(losses["zero"], losses["max"])
    assert torch.allclose(losses["mixed"], losses["max"] + 0.5 * losses["argmax"])


def test_best_interest_score_matches_amax_values_and_gradients():
    torch.manual_seed(1)
    interests = torch.randn(7, 4, 5, requires_grad=True)
    items = torch.randn(11, 5, requires_grad=True)
    weights = torch.randn(7, 11)
    reference = torch.einsum("pkd,nd->pkn", interests, items).amax(1)
    (reference * weights).sum().backward()
    expected = interests.grad.clone(), items.grad.clone()
    interests.grad = items.grad = None
    fast = BestInterestScore.apply(interests, items)
    (fast * weights).sum().backward()
    assert torch.allclose(fast, reference, atol=1e-6)
    assert torch.allclose(interests.grad, expected[0], atol=1e-5)
    assert torch.allclose(items.grad, expected[1], atol=1e-5)


def test_best_interest_score_gives_a_tie_to_the_first_interest_only():
    # amax would split a tied score's gradient; the max loss trains one winner per score.
    interests = torch.randn(3, 1, 4).repeat(1, 3, 1).requires_grad_()
    items = torch.randn(5, 4)
    BestInterestScore.apply(interests, items).sum().backward()
    assert torch.allclose(interests.grad[:, 0], torch.ones(3, 5) @ items)
    assert torch.count_nonzero(interests.grad[:, 1:]) == 0


def test_best_interest_score_in_bfloat16_is_close_to_float32():
    torch.manual_seed(2)
    interests = torch.randn(64, 4, 16, requires_grad=True)
    items = torch.randn(50, 16, requires_grad=True)
    weights = torch.randn(64, 50)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        interests.grad = items.grad = None
        scores = BestInterestScore.apply(interests, items, dtype)
        (scores * weights).sum().backward()
        assert scores.dtype == interests.grad.dtype == items.grad.dtype == torch.float32
        grads[dtype] = scores.detach(), interests.grad.clone(), items.grad.clone()
    for exact, low in zip(grads[torch.float32], grads[torch.bfloat16], strict=True):
        assert torch.linalg.norm(low - exact) < 0.05 * torch.linalg.norm(exact)
        assert not torch.equal(low, exact)  # the products did run in bfloat16


@pytest.mark.parametrize("backbone", ["transformer-sa", "sasrec"])
def test_bfloat16_scoring_trains_the_same_loss_within_rounding(backbone):
    ids, targets = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]), torch.tensor([9, 3])
    negatives = Negatives(ids=torch.tensor([12, 13, 14, 15]), log_q=torch.zeros(4),
                          log_q_table=torch.zeros(31))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = make(backbone, score_dtype=dtype).eval()
        losses[dtype] = model.loss(ids, targets, negatives)
        losses[dtype].backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert torch.isclose(losses["bfloat16"], losses["float32"], rtol=0.02)


@pytest.mark.parametrize("interest_loss", ["argmax", "max"])
def test_sampled_softmax_applies_logq_and_masks_accidental_hits(interest_loss):
    model = make("comirec-sa", interest_loss=interest_loss).eval()
    ids, targets = torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([9])
    table = torch.zeros(31)
    table[[9, 11, 12]] = torch.tensor([-1.0, -2.0, -3.0])
    negatives = Negatives(ids=torch.tensor([9, 11, 12]), log_q=table[[9, 11, 12]],
                          log_q_table=table)
    interests = model(ids)[0]
    emb = model.item_embedding.weight
    if interest_loss == "argmax":
        user = interests[int((interests @ emb[9]).argmax())]
        score = {i: user @ emb[i] for i in (9, 11, 12)}
    else:
        score = {i: (interests @ emb[i]).max() for i in (9, 11, 12)}
    pos = score[9] + 1.0
    neg = torch.stack([score[11] + 2.0, score[12] + 3.0])  # 9 is masked out
    expected = -pos + torch.logsumexp(torch.cat([pos[None], neg]), 0)
    assert torch.allclose(model.loss(ids, targets, negatives), expected, atol=1e-6)


def test_log_uniform_sampler_follows_popularity_ranks():
    popularity = np.array([0, 5, 100, 1, 50])  # ranks: item 2, 4, 1, 3
    sampler = LogUniformSampler(popularity)
    q = sampler.log_q[1:].exp()
    assert q.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert q[1] > q[3] > q[0] > q[2]  # items 2 > 4 > 1 > 3
    assert q[1].item() == pytest.approx(math.log(2) / math.log(5), rel=1e-6)
    sample = sampler.sample(20000, torch.Generator().manual_seed(0))
    freq = torch.bincount(sample.ids, minlength=5)[1:].double() / 20000
    assert torch.allclose(freq, q.double(), atol=0.02)
    assert sample.log_q_of(torch.tensor([2])).item() == pytest.approx(sampler.log_q[2].item())


def test_sasrec_is_causal_and_trains_on_every_position():
    model = make("sasrec").eval()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    changed = torch.tensor([[0, 0, 3, 4, 9, 6]])
    with torch.no_grad():
        a, _ = model.sequence(ids)
        b, _ = model.sequence(changed)
    # positions before the change see only earlier items: unchanged; later ones change
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)
    assert not torch.allclose(a[0, 4:], b[0, 4:])
    assert torch.equal(model(ids)[:, 0], a[:, -1])  # the user vector: the latest state

    # the full-softmax loss is the mean over every non-padding position of predicting the
    # item that follows it (the last one predicts the target); eval mode: no dropout
    full = model.loss(ids, torch.tensor([7]))
    hidden, _ = model.sequence(ids)
    following = torch.tensor([4, 5, 6, 7])  # positions 2..5 predict the next item
    expected = F.cross_entropy(hidden[0, 2:] @ model.item_vectors().T, following - 1)
    assert torch.allclose(full, expected, atol=1e-6)


def test_sasrec_sampled_loss_uses_logq_of_every_positive():
    model = make("sasrec").eval()
    sampler = LogUniformSampler(np.arange(31, dtype=np.int64))
    negatives = sampler.sample(20, torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    loss = model.loss(ids, torch.tensor([7]), negatives)
    hidden, _ = model.sequence(ids)
    users, wanted = hidden[0, 2:], torch.tensor([4, 5, 6, 7])
    pos = (users * model.item_embedding(wanted)).sum(-1) - sampler.log_q[wanted]
    neg = users @ model.item_embedding(negatives.ids).T - negatives.log_q
    neg = neg.masked_fill(negatives.ids[None, :] == wanted[:, None], float("-inf"))
    expected = F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(4, dtype=int))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_mind_draws_routing_logits_per_batch_in_training_and_serves_a_fixed_draw():
    model = make("mind")
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]] * 2)
    model.train()
    first, second = model.initial_logits(ids), model.initial_logits(ids)
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])
    model.eval()
    assert torch.equal(model.initial_logits(ids), model.initial_logits(ids))
    assert torch.equal(model(ids), model(ids))  # serving is deterministic


def test_transformer_sa_has_causal_interests_at_every_position_and_serves_the_last():
    model = make("transformer-sa").eval()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    changed = torch.tensor([[0, 0, 3, 4, 9, 6]])
    with torch.no_grad():
        a, _ = model.interests_at_every_position(ids)  # [1, L, K, d]
        b, _ = model.interests_at_every_position(changed)
        served = model(ids)
    assert a.shape == (1, 6, 3, 8)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6)  # earlier positions: unchanged
    assert not torch.allclose(a[0, 4:], b[0, 4:])
    assert torch.allclose(served, a[:, -1], atol=1e-6)  # serving = the last position
    # every real position predicts the item after it, scored by its best interest
    loss = model.loss(ids, torch.tensor([7]))
    following = torch.tensor([4, 5, 6, 7])
    logits = torch.einsum("pkd,nd->pkn", a[0, 2:], model.item_vectors()).amax(1)
    assert torch.allclose(loss, F.cross_entropy(logits, following - 1), atol=1e-5)


def test_next_items_scores_only_the_last_positions_when_asked():
    from trainer.encoders.transformer import next_items

    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    targets = torch.tensor([6, 7])
    following, every = next_items(ids, targets)
    assert following.tolist() == [[0, 3, 4, 5, 6], [2, 3, 4, 5, 7]]
    assert every.tolist() == [[False, False, True, True, True], [True] * 5]
    _, last_two = next_items(ids, targets, last=2)
    assert last_two.tolist() == [[False, False, False, True, True],
                                 [False, False, False, True, True]]
    assert next_items(ids, targets, last=5)[1].tolist() == every.tolist()  # the whole window


def test_score_positions_changes_the_loss_only_when_set():
    ids = torch.randint(1, 50, (8, 20))
    targets = torch.randint(1, 50, (8,))
    losses = {}
    for last in (0, 20, 5):
        torch.manual_seed(0)
        model = build_encoder(50, TrainConfig(dim=8, score_positions=last, loss="full"))
        model.eval()
        losses[last] = model.loss(ids, targets).item()
    assert losses[0] == losses[20]  # every position either way
    assert losses[5] != losses[0]
    with pytest.raises(ValueError, match="score_positions"):
        TrainConfig(score_positions=-1)


def test_item_embedding_init_is_xavier_up_to_the_cap_and_stops_shrinking_beyond():
    torch.manual_seed(0)
    small = torch.empty(EMBEDDING_INIT_ROWS, 16)
    init_item_embeddings(small)
    torch.manual_seed(0)
    assert torch.equal(small, torch.nn.init.xavier_uniform_(torch.empty_like(small)))
    large = torch.empty(40 * EMBEDDING_INIT_ROWS, 16)
    init_item_embeddings(large)
    xavier_large = torch.nn.init.xavier_uniform_(torch.empty_like(large))
    # the capped table keeps the cap's scale; plain xavier would be about 6x smaller here
    assert abs(large.std() / small.std() - 1) < 0.05
    assert large.std() > 5 * xavier_large.std()


def test_score_dtype_auto_follows_the_cpu(monkeypatch):
    from trainer.encoders import base

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(base, "cpu_has_bf16", lambda native=native: native)
        assert make("transformer-sa", score_dtype="auto").score_dtype == expected
    assert make("transformer-sa", score_dtype="bfloat16").score_dtype == torch.bfloat16
