import numpy as np

from polyclip.metrics.classification import classification_metrics, topk_accuracy
from polyclip.reports.run_report import write_run_report


def test_metrics_on_a_known_case():
    logits = np.array([[3, 1, 0], [0, 3, 1], [0, 1, 3], [3, 2, 0]], dtype=float)
    labels = np.array([0, 1, 2, 1])
    m = classification_metrics(logits, labels, ["a", "b", "c"], train_labels=np.array([0, 0, 1]))
    assert m["top1"] == 0.75 and topk_accuracy(logits, labels, 2) == 1.0
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["train_label_counts"] == {"a": 2, "b": 1, "c": 0}
    assert abs(m["macro_f1"] - np.mean([2 / 3, 2 / 3, 1.0])) < 1e-9


def test_run_report_writes_every_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    logits = np.eye(3)[labels] + rng.normal(0, 0.8, (50, 3))
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_acc": 0.5},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.9, "val_acc": 0.7}]
    metrics = write_run_report(tmp_path, name="t", class_names=["a", "b", "c"], test_logits=logits,
                               test_labels=labels, train_labels=labels, history=history)
    for name in ("metrics.json", "confusion.png", "curves.png", "report.md", "classification_report.txt"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["test"]["top1"] == float((logits.argmax(1) == labels).mean())
