"""DistillTask: the loss against a naive reference, where gradients go, export of the student."""

import pytest
import torch
import torch.nn.functional as F

from polyclip.backbones import create_backbone, save_backbone
from polyclip.methods.distill import DistillTask


def _task(w_cos=0.7, w_ce=0.3, teacher_dim=12):
    torch.manual_seed(0)
    return DistillTask(create_backbone("random:small_cnn@4"), teacher_dim, 5, w_cos=w_cos, w_ce=w_ce,
                       mlp_hidden=16, mlp_depth=4)


def _batch(n=6, teacher_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            "y": torch.randint(0, 5, (n,), generator=g), "teacher": torch.randn(n, teacher_dim, generator=g)}


def test_loss_matches_naive_reference():
    task, batch = _task(), _batch()
    task.eval()  # deterministic BatchNorm so both passes see the same embeddings
    out = task(batch)
    student = task.project(task.backbone.encode(batch["x"]))
    cos = [F.cosine_similarity(student[i:i + 1], batch["teacher"][i:i + 1]).item() for i in range(6)]
    naive_cos = sum(1 - c for c in cos) / 6
    logits = task.classifier(student)
    naive_ce = sum(-torch.log_softmax(logits[i], 0)[batch["y"][i]].item() for i in range(6)) / 6
    assert out["loss"].item() == pytest.approx(0.7 * naive_cos + 0.3 * naive_ce, rel=1e-5)
    assert out["loss_cos"].item() == pytest.approx(naive_cos, rel=1e-5)
    assert out["loss_ce"].item() == pytest.approx(naive_ce, rel=1e-5)
    assert task.predict(batch["x"]).shape == (6, 5)


def test_classifier_is_a_four_layer_mlp_on_the_teacher_sized_embedding():
    task = _task()
    linears = [m for m in task.classifier.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 16), (16, 5)]
    assert task.project.out_features == 12


def test_gradient_reaches_the_student_and_not_the_teacher():
    task, batch = _task(), _batch()
    batch["teacher"].requires_grad_(True)
    task(batch)["loss"].backward()
    assert batch["teacher"].grad is None
    for name, p in task.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cosine_term_alone_trains_the_encoder_but_not_the_classifier():
    task, batch = _task(w_cos=1.0, w_ce=0.0), _batch()
    task(batch)["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in task.backbone.parameters() if p.grad is not None)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in task.classifier.parameters())


def test_unlabeled_stream_adds_cosine_only():
    task, batch = _task(), _batch()
    task.eval()
    unl = _batch(n=4, seed=1)
    out = task({**batch, "u_x": unl["x"], "u_teacher": unl["teacher"]})
    s = task.embed(torch.cat([batch["x"], unl["x"]]))
    expected_cos = (1 - F.cosine_similarity(s, torch.cat([batch["teacher"], unl["teacher"]]))).mean()
    assert out["loss_cos"].item() == pytest.approx(expected_cos.item(), rel=1e-5)
    assert out["loss_ce"].item() == pytest.approx(F.cross_entropy(task.classifier(s[:6]), batch["y"]).item(),
                                                  rel=1e-5)


def test_training_lowers_the_loss():
    task, batch = _task(), _batch(n=8)
    opt = torch.optim.Adam(task.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = task(batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.9 * first


def test_student_exports_and_reloads(tmp_path):
    task, batch = _task(), _batch()
    task.eval()
    save_backbone(task.backbone, tmp_path / "backbone")
    reloaded = create_backbone(f"checkpoint:{tmp_path}").eval()
    torch.testing.assert_close(reloaded.encode(batch["x"]), task.backbone.encode(batch["x"]))


@pytest.mark.parametrize("kwargs", [{"w_cos": 0.0, "w_ce": 0.0}, {"w_cos": -1.0, "w_ce": 1.0}])
def test_bad_weights_fail(kwargs):
    with pytest.raises(ValueError, match="weights"):
        DistillTask(create_backbone("random:small_cnn@4"), 8, 3, **kwargs)
