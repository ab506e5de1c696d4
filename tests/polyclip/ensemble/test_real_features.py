"""The ensemble on real EfficientNet-Lite features of real Fashion-MNIST images.

Marked slow: the parts timed separately on a quieter machine add up to about 10 s
(timm import and weight loading dominate), but the whole test took 40-55 s while the
shared 2-core machine ran at load 25-45.
"""

import time

import pytest

from polyclip.backbones import create_backbone
from polyclip.data.splits import make_split
from polyclip.ensemble import BackboneInfo, fit_ensemble, single_key
from polyclip.features.cache import encode_images


@pytest.mark.slow
def test_fashion_mnist_lite0_lite1_ensemble_is_well_above_chance(fashion_mnist):
    started = time.perf_counter()
    split = make_split(fashion_mnist.train.labels, fashion_mnist.class_names, labels_per_class=4, seed=0,
                       val_per_class=0, unlabeled=0, test_labels=fashion_mnist.test.labels, test_limit=160)
    train_images, y_train = fashion_mnist.train.images[split.labeled], fashion_mnist.train.labels[split.labeled]
    test_images, y_test = fashion_mnist.test.images[split.test], fashion_mnist.test.labels[split.test]
    train, test, infos = {}, {}, {}
    for spec in ("efficientnet_lite:0", "efficientnet_lite:1"):
        backbone = create_backbone(spec, image_size=64)
        train[spec] = encode_images(backbone, train_images, batch_size=128)
        test[spec] = encode_images(backbone, test_images, batch_size=128)
        infos[spec] = BackboneInfo.from_backbone(backbone)
    ensemble, results = fit_ensemble(train, y_train, test, y_test, class_names=fashion_mnist.class_names,
                                     backbones=infos, steps=100, seed=0)
    elapsed = time.perf_counter() - started

    acc = results["evaluation"]["accuracy"]
    assert results["protocol"] == "split"  # 4 labels per class: 3 for the probes, 1 for the combiner
    assert results["n_head_labels"] == 30 and results["n_combiner_labels"] == 10
    for key in ("adaptive", "logit_average", single_key("efficientnet_lite:0"), single_key("efficientnet_lite:1")):
        assert acc[key] > 0.35, (key, acc)  # chance is 0.10
    assert acc["oracle"] >= max(acc[single_key(s)] for s in train)
    assert ensemble.backbones[1].image_size == 64 and ensemble.backbone_specs[0] == "efficientnet_lite:0"
    print(f"real-feature ensemble test took {elapsed:.1f}s: {({k: round(v, 3) for k, v in acc.items()})}")
