"""ONNX + safetensors export of runs and ensembles, checked against torch on real images."""

import json

import numpy as np
import pytest
import torch
import yaml

from jobs import export
from jobs.config import parse_config
from jobs.recipes import RECIPES
from jobs.recipes.base import Payload
from jobs.recipes.distill import DistillExtras
from jobs.recipes.finetune import FinetuneExtras
from polyclip.backbones import create_backbone, save_backbone

pytest.importorskip("onnxruntime")

CLASSES = [f"c{i}" for i in range(10)]


def _write_run(folder, method: dict, spec="random:small_cnn@8", seed=0):
    """A run directory as jobs.train leaves it (config.yaml, checkpoint/{state.pt, backbone, class_names.json}).

    The task is built by the method's recipe and its weights are randomised, so every
    parameter reaches the exported graph with a non-trivial value.
    """
    cfg = parse_config({"name": folder.name, "data": {"dataset": "synthetic"}, "backbone": {"spec": spec},
                        "method": method, "run": {"output_dir": str(folder.parent)}})
    # A probe trains on features (784 pixel values, else a 32-wide encoder), the others on images.
    shape = ((784 if spec == "pixels" else 32),) if cfg.method.name == "probe" else (1, 28, 28)
    images = {"x": np.zeros((1, *shape), np.float32), "y": np.zeros(1, np.int64)}
    extras = {"distill": DistillExtras(teacher_dim=24), "finetune": FinetuneExtras()}.get(cfg.method.name)
    payload = Payload(train=images, val=images, test=images, class_names=CLASSES, extras=extras)
    RECIPES[cfg.method.name].check_payload(payload)
    torch.manual_seed(seed)
    task = RECIPES[cfg.method.name].build_task(cfg, cfg.method, payload)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    torch.save({"task": task.state_dict(), "epoch": 1}, folder / "checkpoint" / "state.pt")
    (folder / "checkpoint" / "class_names.json").write_text(json.dumps(CLASSES))
    if hasattr(task, "backbone"):
        save_backbone(task.backbone, folder / "checkpoint" / "backbone")
    return task.eval()


def _onnx_logits(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]


@pytest.mark.parametrize("method", [{"name": "finetune", "head_hidden": 16, "head_depth": 2},
                                    {"name": "distill", "mlp_hidden": 16, "mlp_depth": 2}])
def test_trained_run_exports_and_matches_the_task_on_real_images(tmp_path, fashion_mnist, method):
    task = _write_run(tmp_path / "run", method)
    result = export.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.safetensors", "export.json"}
    assert json.loads((out / "export.json").read_text()) == result
    assert result["method"] == method["name"] and result["class_names"] == CLASSES
    assert result["files"]["max_abs_diff"] < 1e-4
    # The documented contract: [0, 1] images at the encoder's size and channels give the run's logits.
    images = torch.from_numpy(np.array(fashion_mnist.test.images[:16]))
    with torch.no_grad():
        expected = task.predict(images).numpy()
    unit = task.backbone.to_unit(images).numpy()
    assert list(unit.shape[1:]) == result["input"]["shape"][1:]
    got = _onnx_logits(out / "model.onnx", unit)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The safetensors hold every weight of the task, equal to the checkpoint's.
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    for key, value in task.state_dict().items():
        assert torch.equal(tensors[f"parts.task.{key}"], value)


def test_probe_run_exports_backbone_spec_plus_head(tmp_path, fashion_mnist):
    task = _write_run(tmp_path / "run", {"name": "probe", "hidden": 8, "depth": 2}, spec="pixels")
    result = export.export_run(tmp_path / "run", tmp_path / "out")
    assert result["input"]["shape"] == ["batch", 1, 28, 28]
    images = torch.from_numpy(np.array(fashion_mnist.test.images[:16]))
    backbone = create_backbone("pixels")
    with torch.no_grad():
        expected = task.predict(backbone.encode(images)).numpy()
    got = _onnx_logits(tmp_path / "out" / "model.onnx", backbone.to_unit(images).numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_bad_runs_fail_with_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no config\.yaml"):
        export.main(["--run", str(tmp_path), "--out", str(tmp_path / "out")])
    _write_run(tmp_path / "simclr", {"name": "finetune"})
    simclr = parse_config({"name": "simclr", "data": {"dataset": "synthetic"}, "method": {"name": "simclr"}})
    (tmp_path / "simclr" / "config.yaml").write_text(yaml.safe_dump(simclr.dump()))
    with pytest.raises(SystemExit, match=r"cannot be exported; exportable: probe, finetune, distill"):
        export.main(["--run", str(tmp_path / "simclr"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_mismatch_beyond_tolerance_fails(tmp_path):
    class Flaky(torch.nn.Module):  # differs between calls: the ONNX graph cannot match torch
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(export.ExportError, match="differs from torch"):
        export.export_onnx(Flaky().eval(), [torch.zeros(2, 3)], tmp_path / "m.onnx", ["x"], ["y"])


def test_ensemble_exports_encoders_heads_and_combination(tmp_path):
    from polyclip.ensemble.artifact import save_ensemble
    from polyclip.ensemble.combiner import TemperatureCombiner
    from polyclip.ensemble.heads import LinearHead
    from polyclip.ensemble.model import BackboneInfo, Ensemble

    torch.manual_seed(0)
    members = [create_backbone("pixels:12"), create_backbone("random:small_cnn@8", image_size=20)]
    infos = [BackboneInfo.from_backbone(b, name=f"m{i}") for i, b in enumerate(members)]
    heads = [LinearHead(torch.randn(10, b.num_features), torch.randn(10), logit_scale=5.0) for b in members]
    combiners = [TemperatureCombiner([b.num_features for b in members[:k]], hidden=8) for k in (1, 2)]
    ensemble = Ensemble(infos, CLASSES, heads, combiners)
    save_ensemble(tmp_path / "ens", ensemble)

    result = export.main(["--ensemble", str(tmp_path / "ens"), "--out", str(tmp_path / "out"), "--benchmark"])
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "encoders").iterdir()) == [
        "0_m0.onnx", "0_m0.safetensors", "1_m1.onnx", "1_m1.safetensors"]
    assert len(list((out / "heads").glob("*.onnx"))) == 2
    assert result["encoders"][1]["input_shape"] == ["batch", 1, 20, 20]
    assert result["encoders"][0]["latency"]["onnxruntime_ms_per_image"] > 0
    assert all(e["max_abs_diff"] < 1e-4 for e in result["encoders"] + result["heads"])

    import onnxruntime

    features = [torch.randn(5, b.num_features) for b in members]
    session = onnxruntime.InferenceSession(str(out / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    logits, weights = session.run(["logits", "weights"], {f"features_{i}": f.numpy() for i, f in enumerate(features)})
    with torch.no_grad():
        expected_logits, expected_weights = ensemble(features)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(weights, expected_weights.numpy(), atol=1e-5)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)
