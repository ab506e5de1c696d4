import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from polyclip.ensemble import (
    BackboneInfo,
    CascadeOptions,
    CascadePoint,
    ProtocolOptions,
    cascade_curve,
    choose_threshold,
    evaluate_ensemble,
    fit_ensemble,
    single_key,
    write_ensemble_report,
    zero_shot_head,
)


@pytest.fixture(scope="module")
def fitted():
    from tests.polyclip.ensemble.conftest import make_domain_features

    data = make_domain_features(labels_per_class=20, seed=0)
    val, y_val, data = split_off_validation(data, 300)
    ensemble, results = fit_ensemble(data.train, data.y_train, data.test, data.y_test, class_names=data.class_names,
                                     features_val=val, y_val=y_val, protocol=ProtocolOptions("split"), steps=600,
                                     seed=0)
    return data, ensemble, results


def split_off_validation(data, n_val):
    """The first ``n_val`` test images become the validation split."""
    val = {name: x[:n_val] for name, x in data.test.items()}
    y_val = data.y_test[:n_val]
    rest = dataclasses.replace(data, test={name: x[n_val:] for name, x in data.test.items()},
                               y_test=data.y_test[n_val:], domain_test=data.domain_test[n_val:])
    return val, y_val, rest


def test_adaptive_combination_beats_every_single_backbone_and_the_averages(fitted):
    data, _, results = fitted
    acc = results["evaluation"]["accuracy"]
    singles = [acc[single_key(name)] for name in data.train]
    assert results["protocol"] == "split" and results["evaluation"]["protocol"] == "split"
    # Orderings that hold by construction:
    assert all(acc["oracle"] >= s for s in singles)
    # ...and the ones this data is built to show (each head is confidently wrong on 2/3 of images):
    assert acc["adaptive"] > max(singles) + 0.2
    assert acc["adaptive"] > acc["logit_average"] + 0.15
    assert acc["adaptive"] > acc["probability_average"] + 0.1
    assert results["evaluation"]["gain_over_best_single"] == pytest.approx(acc["adaptive"] - max(singles))


def test_weights_follow_the_reliable_backbone(fitted):
    data, ensemble, _ = fitted
    _, weights = ensemble.predict([data.test[name] for name in data.train])
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    # Backbone b sees the true class only on domain b: it should get the largest weight there.
    assert (weights.argmax(axis=1) == data.domain_test).mean() > 0.9


def test_evaluate_ensemble_agrees_with_a_naive_count(fitted):
    data, ensemble, results = fitted
    feats = [data.test[name] for name in data.train]
    with torch.no_grad():
        heads = [h(torch.from_numpy(f)).numpy() for h, f in zip(ensemble.head_list, feats)]
    correct = [(z.argmax(1) == data.y_test) for z in heads]
    oracle = np.mean([any(c[i] for c in correct) for i in range(len(data.y_test))])
    again = evaluate_ensemble(ensemble, feats, data.y_test)
    assert again["accuracy"]["oracle"] == pytest.approx(oracle)
    assert again["accuracy"]["logit_average"] == pytest.approx((sum(heads).argmax(1) == data.y_test).mean())
    assert again["accuracy"] == results["evaluation"]["accuracy"]


def test_cascade_extremes_and_threshold_choice(fitted):
    data, ensemble, results = fitted
    feats = [data.test[name] for name in data.train]
    first, last = cascade_curve(ensemble, feats, data.y_test, [0.0, 1.01])
    assert first.mean_calls == 1.0 and last.mean_calls == 3.0
    assert last.accuracy == pytest.approx(results["evaluation"]["accuracy"]["adaptive"])
    # Threshold 0 answers with the cheapest backbone alone (a per-image temperature cannot change its argmax).
    assert first.accuracy == pytest.approx(results["evaluation"]["accuracy"][single_key("bb0")])
    chosen = results["cascade"]["chosen"]
    assert results["cascade"]["selected_on"] == "validation"
    assert results["cascade"]["reference_accuracy"] == results["val_evaluation"]["accuracy"]["adaptive"]
    assert chosen["accuracy"] >= results["cascade"]["reference_accuracy"] - 0.005
    assert 1.0 <= chosen["mean_calls"] <= 3.0
    val_curve = [CascadePoint(**p) for p in results["cascade"]["val_curve"]]
    assert chosen == choose_threshold(val_curve, 0.005, results["cascade"]["reference_accuracy"]).to_dict()
    on_test = results["cascade"]["chosen_test"]
    assert on_test["threshold"] == chosen["threshold"] and on_test in results["cascade"]["curve"]


def test_cascade_threshold_ignores_test_labels(domain_features):
    """Permuting (or replacing) the test labels changes the test curve but never the chosen threshold."""
    data = domain_features(labels_per_class=10, n_test=700, seed=3)
    val, y_val, data = split_off_validation(data, 200)
    rng = np.random.default_rng(0)
    kwargs = dict(class_names=data.class_names, features_val=val, y_val=y_val, steps=150, seed=0,
                  cascade=CascadeOptions(thresholds=(0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01),
                                         max_accuracy_drop=0.01))
    _, first = fit_ensemble(data.train, data.y_train, data.test, data.y_test, **kwargs)
    _, permuted = fit_ensemble(data.train, data.y_train, data.test, rng.permutation(data.y_test), **kwargs)
    few = {name: x[:60] for name, x in data.test.items()}
    _, small = fit_ensemble(data.train, data.y_train, few, data.y_test[:60], **kwargs)
    assert permuted["cascade"]["curve"] != first["cascade"]["curve"]
    assert first["cascade"]["chosen"] == permuted["cascade"]["chosen"] == small["cascade"]["chosen"]
    assert first["cascade"]["chosen"] is not None
    # Without validation data nothing is chosen, however many test images there are.
    _, blind = fit_ensemble(data.train, data.y_train, data.test, data.y_test, class_names=data.class_names, steps=5)
    assert blind["cascade"]["chosen"] is None and blind["cascade"]["chosen_test"] is None
    assert blind["cascade"]["curve"] and "val_evaluation" not in blind


def test_validation_arguments_are_checked(domain_features):
    data = domain_features(labels_per_class=2, n_test=20)
    with pytest.raises(ValueError, match="y_val given without features_val"):
        fit_ensemble(data.train, data.y_train, class_names=data.class_names, y_val=data.y_test, steps=1)
    with pytest.raises(ValueError, match="features_val lacks backbones \\['bb2'\\]"):
        fit_ensemble(data.train, data.y_train, class_names=data.class_names, steps=1, y_val=data.y_test,
                     features_val={k: v for k, v in data.test.items() if k != "bb2"})
    with pytest.raises(ValueError, match=r"features_val\['bb0'\] must be \(N=19, D\)"):
        fit_ensemble(data.train, data.y_train, class_names=data.class_names, steps=1, y_val=data.y_test[:19],
                     features_val=data.test)


def test_choose_threshold_takes_the_cheapest_point_within_budget():
    curve = [CascadePoint(0.0, 0.70, 1.0), CascadePoint(0.8, 0.894, 1.6), CascadePoint(0.9, 0.899, 2.1),
             CascadePoint(1.01, 0.90, 3.0)]
    assert choose_threshold(curve, 0.005).threshold == 0.9
    assert choose_threshold(curve, 0.005, reference_accuracy=0.9).threshold == 0.9
    assert choose_threshold(curve, 0.01).threshold == 0.8
    assert choose_threshold(curve, 0.5).threshold == 0.0
    with pytest.raises(ValueError, match="within"):
        choose_threshold(curve, 0.0, reference_accuracy=0.95)


def test_one_label_per_class_works_and_records_the_shared_protocol(domain_features):
    data = domain_features(labels_per_class=1, n_test=60, seed=1)
    ensemble, results = fit_ensemble(data.train, data.y_train, data.test, data.y_test, class_names=data.class_names,
                                     steps=20, cascade=CascadeOptions(enabled=False))
    assert results["protocol"] == "shared" and results["protocol_requested"] == "auto"
    assert ensemble.metadata["protocol"] == "shared"
    assert results["n_head_labels"] == results["n_combiner_labels"] == 6
    assert ensemble.cascade_prefixes == [3] and "cascade" not in results
    with pytest.raises(ValueError, match="accepts the first"):
        ensemble([torch.from_numpy(data.test["bb0"])])


def test_zero_shot_heads_use_every_label_for_the_combiner(domain_features):
    data = domain_features(labels_per_class=2, n_test=30, seed=2)
    given = {name: zero_shot_head(torch.randn(6, x.shape[1]), logit_scale=100.0) for name, x in data.train.items()}
    ensemble, results = fit_ensemble(data.train, data.y_train, class_names=data.class_names, zero_shot_heads=given,
                                     steps=5)
    assert results["protocol"] == "given_heads" and results["n_combiner_labels"] == 12
    assert [h.kind for h in ensemble.head_list] == ["zero_shot"] * 3
    assert torch.equal(ensemble.head_list[1].weight, given["bb1"].weight)


def test_backbone_info_is_checked_and_kept(domain_features):
    data = domain_features(labels_per_class=2, n_test=10)
    infos = {"bb0": BackboneInfo("bb0", "efficientnet_lite:0", 24, 64, {"image_size": 64})}
    ensemble, _ = fit_ensemble(data.train, data.y_train, class_names=data.class_names, backbones=infos, steps=2)
    assert ensemble.backbone_specs == ["efficientnet_lite:0", "bb1", "bb2"]
    bad = {"bb0": BackboneInfo("bb0", "efficientnet_lite:0", 1280, 64)}
    with pytest.raises(ValueError, match="does not match"):
        fit_ensemble(data.train, data.y_train, class_names=data.class_names, backbones=bad, steps=2)


def test_report_writes_markdown_and_plots(fitted, tmp_path):
    _, _, results = fitted
    paths = write_ensemble_report(results, tmp_path / "run")
    text = paths["markdown"].read_text()
    assert "| adaptive |" in text and "oracle" in text and "split" in text and "mean_calls" in text
    for key in ("accuracy_plot", "cascade_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_imports_without_ray():
    code = "import sys, polyclip.ensemble; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
