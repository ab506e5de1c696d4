import hashlib
import json
import os

import numpy as np
import pytest
import torch

from polyclip.ensemble import BackboneInfo, EnsembleArtifactError, fit_ensemble, load_ensemble, save_ensemble


@pytest.fixture(scope="module")
def ensemble():
    from tests.polyclip.ensemble.conftest import make_domain_features

    data = make_domain_features(labels_per_class=4, n_test=20, seed=3)
    infos = {name: BackboneInfo(name, f"random:{name}", x.shape[1], 32,
                                {"image_size": 32, "mean": [0.5], "std": [0.5], "in_chans": 1})
             for name, x in data.train.items()}
    fitted, _ = fit_ensemble(data.train, data.y_train, class_names=data.class_names, backbones=infos, steps=30,
                             combine="multiply", positivity="exp", seed=3)
    return fitted, [torch.from_numpy(data.test[name]) for name in data.train]


def test_round_trip_gives_identical_outputs(ensemble, tmp_path):
    fitted, feats = ensemble
    path = save_ensemble(tmp_path / "ens", fitted)
    loaded = load_ensemble(path)
    assert sorted(p.name for p in path.iterdir()) == ["combiner.safetensors", "ensemble.json", "heads.safetensors"]
    for k in (1, 2, 3):
        with torch.no_grad():
            a, b = fitted(feats[:k]), loaded(feats[:k])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert loaded.backbone_specs == fitted.backbone_specs == ["random:bb0", "random:bb1", "random:bb2"]
    assert loaded.class_names == fitted.class_names
    assert loaded.backbones[0].image_size == 32 and loaded.backbones[0].preprocessing["in_chans"] == 1
    assert loaded.metadata["protocol"] == "split"
    meta = json.loads((path / "ensemble.json").read_text())
    assert meta["combiners"][-1]["combine"] == "multiply" and meta["combiners"][-1]["positivity"] == "exp"
    assert meta["metadata"]["options"]["lr"] == 2e-4


def test_saving_again_replaces_the_directory(ensemble, tmp_path):
    fitted, _ = ensemble
    save_ensemble(tmp_path / "ens", fitted)
    (tmp_path / "ens" / "stale.txt").write_text("old")
    save_ensemble(tmp_path / "ens", fitted)
    assert not (tmp_path / "ens" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ens"]  # no temporary siblings left behind


def test_missing_directory_and_files_give_clear_errors(ensemble, tmp_path):
    fitted, _ = ensemble
    with pytest.raises(EnsembleArtifactError, match="does not exist"):
        load_ensemble(tmp_path / "nowhere")
    path = save_ensemble(tmp_path / "ens", fitted)
    (path / "heads.safetensors").unlink()
    with pytest.raises(EnsembleArtifactError, match=r"heads\.safetensors is missing"):
        load_ensemble(path)
    (path / "ensemble.json").unlink()
    with pytest.raises(EnsembleArtifactError, match=r"ensemble\.json is missing"):
        load_ensemble(path)


def test_corrupt_files_give_clear_errors(ensemble, tmp_path):
    fitted, _ = ensemble
    path = save_ensemble(tmp_path / "ens", fitted)
    data = (path / "combiner.safetensors").read_bytes()
    (path / "combiner.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EnsembleArtifactError, match=r"combiner\.safetensors is corrupt"):
        load_ensemble(path)

    path = save_ensemble(tmp_path / "ens", fitted)
    meta = json.loads((path / "ensemble.json").read_text())
    meta["sha256"] = {}  # checksums are always checked: a description without them is refused
    (path / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleArtifactError, match=r"no SHA-256 for heads\.safetensors"):
        load_ensemble(path)

    path = save_ensemble(tmp_path / "ens", fitted)  # a damaged file whose checksum was updated to match
    (path / "heads.safetensors").write_bytes(b"not a safetensors file")
    meta = json.loads((path / "ensemble.json").read_text())
    meta["sha256"]["heads.safetensors"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (path / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleArtifactError, match=r"heads\.safetensors cannot be loaded"):
        load_ensemble(path)

    (path / "ensemble.json").write_text("{ truncated")
    with pytest.raises(EnsembleArtifactError, match="not valid JSON"):
        load_ensemble(path)


def test_inconsistent_description_is_reported(ensemble, tmp_path):
    fitted, _ = ensemble
    path = save_ensemble(tmp_path / "ens", fitted)
    meta = json.loads((path / "ensemble.json").read_text())
    meta["class_names"] = meta["class_names"][:-1]
    (path / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleArtifactError, match="do not fit together"):
        load_ensemble(path)


def test_forward_rejects_wrong_feature_sizes(ensemble):
    fitted, feats = ensemble
    with pytest.raises(ValueError, match="expects features"):
        fitted([feats[1], feats[0], feats[2]])
    assert np.isfinite(fitted.predict([f.numpy() for f in feats])[0]).all()


def _write_format_1(path, fitted, heads_payload=None):
    """An artifact as polyclip wrote it before safetensors (format 1: ``heads.pt``, ``combiner.pt``)."""
    path.mkdir()
    heads = heads_payload if heads_payload is not None else [
        {"weight": h.weight.detach().clone(), "bias": h.bias.detach().clone(),
         "logit_scale": h.logit_scale.detach().clone()} for h in fitted.head_list]
    torch.save(heads, path / "heads.pt")
    torch.save({str(c.num_backbones): c.state_dict() for c in fitted.combiner_list}, path / "combiner.pt")
    meta = {"format_version": 1, "backbones": [b.to_dict() for b in fitted.backbones],
            "class_names": fitted.class_names, "head_kinds": [h.kind for h in fitted.head_list],
            "combiners": [c.config() for c in fitted.combiner_list], "cascade_prefixes": fitted.cascade_prefixes,
            "metadata": {"protocol": "split"},
            "sha256": {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
                       for name in ("heads.pt", "combiner.pt")}}
    (path / "ensemble.json").write_text(json.dumps(meta))
    return path


def test_format_1_artifacts_are_still_read(ensemble, tmp_path):
    fitted, feats = ensemble
    loaded = load_ensemble(_write_format_1(tmp_path / "old", fitted))
    with torch.no_grad():
        a, b = fitted(feats), loaded(feats)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class _RunsOnLoad:
    """A pickle payload that would create a file if unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_format_1_pickle_with_code_is_refused_and_never_run(ensemble, tmp_path):
    fitted, _ = ensemble
    marker = tmp_path / "code-ran"
    path = _write_format_1(tmp_path / "evil", fitted, heads_payload=[_RunsOnLoad(marker)])
    with pytest.raises(EnsembleArtifactError, match=r"heads\.pt cannot be loaded"):
        load_ensemble(path)
    assert not marker.exists() and not os.path.exists(str(marker))


def test_unknown_format_version_names_the_ones_read(ensemble, tmp_path):
    fitted, _ = ensemble
    path = save_ensemble(tmp_path / "ens", fitted)
    meta = json.loads((path / "ensemble.json").read_text())
    meta["format_version"] = 99
    (path / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(EnsembleArtifactError, match=r"format_version 99 is not supported .*\[1, 2\]"):
        load_ensemble(path)
