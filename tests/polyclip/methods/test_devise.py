import numpy as np
import pytest
import torch

from polyclip.backbones import create_backbone
from polyclip.methods.devise import DeViSETask, GeneralisedDeViSE


def _synthetic(num_classes=10, dim=8, in_features=24, per_class=30, seed=0):
    """Visual features = a fixed linear image of the label's word vector, plus noise."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(num_classes, dim, generator=g)
    mixing = torch.randn(dim, in_features, generator=g)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = vectors[y] @ mixing + 0.1 * torch.randn(len(y), in_features, generator=g)
    return vectors, x, y


def _fit(task, x, y, steps=150, lr=2.0):
    task.train()
    for _ in range(steps):  # plain gradient descent: no optimizer start-up cost
        out = task({"x": x, "y": y})
        task.zero_grad()
        out["loss"].backward()
        with torch.no_grad():
            for p in task.parameters():
                p -= lr * p.grad
    task.eval()
    return out


@pytest.mark.parametrize(("loss", "negatives", "unseen_acc"),
                         [("hinge", "all", 0.9), ("hinge", "sampled", 0.6), ("cosine", "all", 0.9)])
def test_learns_seen_classes_and_transfers_to_unseen(loss, negatives, unseen_acc):
    torch.manual_seed(0)
    vectors, x, y = _synthetic()
    seen = y < 7
    task = DeViSETask(None, 24, vectors[:7], loss=loss, negatives=negatives, l2_normalize=False)
    out = _fit(task, x[seen], y[seen])
    assert set(out) >= {"loss", "acc"} and out["acc"] > 0.95
    with torch.no_grad():
        assert (task.predict(x[seen]).argmax(1) == y[seen]).float().mean() > 0.95
        # Zero-shot: swap in the three unseen classes only.
        task.set_label_vectors(vectors[7:])
        scores = task.predict(x[~seen])
    assert scores.shape == (int((~seen).sum()), 3)
    # Chance is 1/3. One sampled negative per step satisfies the ranking on the seen
    # classes with a looser map, which transfers less well than all negatives.
    assert (scores.argmax(1) == y[~seen] - 7).float().mean() > unseen_acc


def test_predict_is_cosine_to_label_vectors():
    vectors, x, _ = _synthetic()
    task = DeViSETask(None, 24, vectors)
    with torch.no_grad():
        scores = task.predict(x[:5])
        emb = task.embed(x[:5])
    manual = torch.stack([torch.nn.functional.cosine_similarity(e[None], vectors, dim=1) for e in emb])
    assert torch.allclose(scores, manual, atol=1e-5)
    assert (scores.abs() <= 1 + 1e-6).all()


def test_label_vectors_are_a_buffer_and_validated():
    vectors, _, _ = _synthetic()
    task = DeViSETask(None, 24, vectors.numpy())
    assert "label_vectors" in dict(task.named_buffers())
    with pytest.raises(ValueError, match="dimension"):
        task.set_label_vectors(torch.randn(3, 5))
    with pytest.raises(ValueError, match="hinge"):
        DeViSETask(None, 24, vectors, loss="mse")


@pytest.mark.parametrize("freeze", [True, False])
def test_one_step_through_a_backbone(freeze):
    torch.manual_seed(0)
    backbone = create_backbone("random:small_cnn")
    task = DeViSETask(backbone, backbone.num_features, torch.randn(4, 6), freeze_backbone=freeze, negatives="sampled")
    task.train()
    assert backbone.training is not freeze
    batch = {"x": torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), "y": torch.arange(8) % 4}
    task(batch)["loss"].backward()
    assert task.map.weight.grad is not None and task.map.weight.grad.abs().sum() > 0
    backbone_grads = [p.grad for p in backbone.parameters() if p.grad is not None]
    assert (len(backbone_grads) == 0) is freeze
    assert task.predict(batch["x"]).shape == (8, 4)
    with pytest.raises(ValueError, match="in_features"):
        DeViSETask(backbone, backbone.num_features + 1, torch.randn(4, 6))


def test_generalised_devise_trains_on_seen_and_scores_every_class():
    vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    seen = [0, 2, 4]
    model = GeneralisedDeViSE(DeViSETask(None, 6, vectors[seen]), seen, vectors)
    out = model({"x": torch.randn(4, 6), "y": torch.tensor([0, 2, 4, 4])})
    out["loss"].backward()
    assert model.task.map.weight.grad is not None
    assert model.predict(torch.randn(3, 6)).shape == (3, 5)
    with pytest.raises(ValueError, match="unseen class"):
        model({"x": torch.randn(2, 6), "y": torch.tensor([0, 1])})
