"""The top-level API: fast to import, no gradients needed, real Fashion-MNIST."""

import doctest
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import polyclip

ROOT = Path(__file__).resolve().parents[2]


def test_import_polyclip_loads_neither_torch_nor_ray():
    code = ("import sys, time; t = time.perf_counter(); import polyclip; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'ray' in sys.modules)")
    seconds, torch_loaded, ray_loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert (torch_loaded, ray_loaded) == ("False", "False")
    assert float(seconds) < 1.0
    assert {"few_shot_probe", "probe", "encode", "create_backbone", "zero_shot", "load_ensemble"} <= set(dir(polyclip))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        polyclip.nope  # noqa: B018


def test_few_shot_probe_on_fashion_mnist_beats_chance_by_far(fashion_mnist):
    train, test = fashion_mnist.train, fashion_mnist.test
    rng = np.random.default_rng(0)
    picked = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), 10, replace=False) for c in range(10)])
    probe = polyclip.few_shot_probe(train.images[picked], train.labels[picked], backbone="pixels",
                                    class_names=fashion_mnist.class_names)
    assert torch.is_grad_enabled()  # nothing leaked out of the inference mode
    predicted = probe.predict(test.images[:1000])
    accuracy = float((predicted == test.labels[:1000]).mean())
    assert accuracy > 0.55, accuracy  # chance is 0.10; raw-pixel probes with 10 labels/class reach ~0.65
    proba = probe.predict_proba(test.images[:5])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    assert probe.class_names[int(predicted[0])] in fashion_mnist.class_names


def test_probe_works_even_when_the_caller_disabled_gradients(fashion_mnist):
    images, labels = fashion_mnist.train.images[:40], fashion_mnist.train.labels[:40]
    classes = int(labels.max()) + 1
    with torch.no_grad():
        inside = polyclip.probe(images, labels, backbone="pixels:14")
    outside = polyclip.probe(images, labels, backbone="pixels:14")
    assert len(inside.class_names) == classes
    torch.testing.assert_close(inside.head.weight, outside.head.weight)


def test_encode_accepts_numpy_torch_grayscale_and_a_built_backbone(fashion_mnist):
    torch.manual_seed(0)
    backbone = polyclip.create_backbone("random:small_cnn@8")
    images = fashion_mnist.test.images[:5]  # read-only memory: copied, never written
    a = polyclip.encode(images, backbone)
    b = polyclip.encode(torch.from_numpy(np.array(images))[:, 0], backbone)  # (N, H, W)
    c = polyclip.encode(np.array(images) / 255.0, backbone)  # floats in [0, 1]
    assert a.shape == (5, backbone.num_features) and a.dtype == np.float32
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: polyclip.encode(np.zeros((2, 8, 8)) + 3.0, "pixels"), ValueError, r"\[0, 1\].*got \[3, 3\]"),
        (lambda: polyclip.encode(np.zeros((8, 8), np.uint8), "pixels"), ValueError, r"got shape \(8, 8\)"),
        (lambda: polyclip.encode(np.zeros((1, 8, 8), np.uint8), 42), TypeError, "got int"),
        (lambda: polyclip.probe(np.zeros((3, 8, 8), np.uint8), [0, 1], "pixels"), ValueError, "3 images but 2 labels"),
        (lambda: polyclip.probe(np.zeros((2, 8, 8), np.uint8), [0.5, 1], "pixels"), ValueError, "integer array"),
        (lambda: polyclip.probe(np.zeros((2, 8, 8), np.uint8), [0, 2], "pixels"), ValueError, r"classes \[1\]"),
        (lambda: polyclip.zero_shot(np.zeros((1, 8, 8), np.uint8), ["a"], "pixels"), TypeError, "text encoder"),
        (lambda: polyclip.create_backbone("nonsense"), polyclip.BackboneError, "unknown backbone spec"),
    ],
)
def test_bad_input_fails_naming_the_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_zero_shot_with_a_clip_backbone():
    torch.manual_seed(0)
    clip = polyclip.create_backbone("random:open_clip:RN50", image_size=64)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 3, 64, 64), dtype=np.uint8)
    logits = polyclip.zero_shot(images, ["shirt", "shoe"], backbone=clip, templates=["a photo of a {}."])
    assert logits.shape == (3, 2) and np.isfinite(logits).all()


def test_load_ensemble_reports_a_missing_folder(tmp_path):
    from polyclip.ensemble.artifact import EnsembleArtifactError

    with pytest.raises(EnsembleArtifactError, match="does not exist"):
        polyclip.load_ensemble(str(tmp_path / "none"))


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


@pytest.mark.slow  # encodes Fashion-MNIST with EfficientNet-Lite0: minutes on 2 cores
def test_readme_python_api_snippet_runs_as_a_doctest():
    section = _readme_section("Python API")
    test = doctest.DocTestParser().get_doctest(section, {}, "README.md: Python API", "README.md", 0)
    assert len(test.examples) >= 4
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} README example(s) failed (see the output above)"


def test_api_docstring_examples_run():
    import polyclip.api
    import polyclip.tracking

    for module in (polyclip.api, polyclip.tracking):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failures == 0, module.__name__
