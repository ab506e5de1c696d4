import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from polyclip.ensemble import LinearHead, fit_linear_probe, zero_shot_head


def test_probe_matches_sklearn_logistic_regression(rng):
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.arange(60) % 4
    l2 = 0.05
    head = fit_linear_probe(x, y, 4, l2=l2)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Same objective: sklearn minimises 0.5 ||W||^2 + C * sum CE, i.e. ours times 1 / (l2 N).
    ref = LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=5000).fit(xn, y)
    ours = torch.softmax(head(torch.from_numpy(x)), dim=1).numpy()
    assert np.abs(ours - ref.predict_proba(xn)).max() < 2e-3


def test_probe_with_one_label_per_class_fits_its_examples(rng):
    x = rng.normal(size=(5, 16)).astype(np.float32)
    head = fit_linear_probe(x, np.arange(5), 5)
    assert head.kind == "probe" and head.weight.shape == (5, 16)
    logits = head(torch.from_numpy(x))
    assert torch.isfinite(logits).all()
    assert logits.argmax(1).tolist() == [0, 1, 2, 3, 4]


def test_probe_refuses_a_class_without_labels(rng):
    with pytest.raises(ValueError, match=r"classes \[2\] have no labeled image"):
        fit_linear_probe(rng.normal(size=(4, 3)), np.array([0, 1, 0, 1]), 3)


def test_zero_shot_head_is_scaled_cosine_similarity(rng):
    text = torch.from_numpy(rng.normal(size=(3, 6))).float()
    images = torch.from_numpy(rng.normal(size=(4, 6))).float()
    head = zero_shot_head(text, logit_scale=50.0)
    naive = torch.stack([torch.stack([50.0 * F.cosine_similarity(i, t, dim=0) for t in text]) for i in images])
    assert head.kind == "zero_shot"
    assert torch.allclose(head(images), naive, atol=1e-4)


def test_head_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bias"):
        LinearHead(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        LinearHead(torch.zeros(3, 4))(torch.zeros(2, 5))
