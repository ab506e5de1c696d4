import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from polyclip.backbones import create_backbone
from polyclip.text.clip_zeroshot import (
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    fill_template,
    zero_shot_classifier,
    zero_shot_logits,
)

TINY = "polyclip-tiny-zeroshot-test"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY}.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return create_backbone(f"random:open_clip:{TINY}")


def test_shapes_and_unit_norms(tiny_clip):
    classes = ["cat", "dog", "airplane"]
    weights = zero_shot_classifier(tiny_clip, None, classes, SIMPLE_TEMPLATES)
    assert weights.shape == (16, 3) and weights.dtype == torch.float32
    assert torch.allclose(weights.norm(dim=0), torch.ones(3), atol=1e-5)
    assert not torch.allclose(weights[:, 0], weights[:, 1])


def test_template_averaging_equals_manual_mean(tiny_clip):
    templates = ["a photo of a {}.", "a drawing of a {}.", lambda c: f"itap of my {c}."]
    weights = zero_shot_classifier(tiny_clip, None, ["cat", "truck"], templates, batch_size=2)
    for column, name in enumerate(["cat", "truck"]):
        texts = [fill_template(t, name) for t in templates]
        manual = F.normalize(F.normalize(tiny_clip.encode_text(texts), dim=-1).mean(0), dim=0)
        assert torch.allclose(weights[:, column], manual, atol=1e-5)
    # A single template is just the normalised text embedding.
    single = zero_shot_classifier(tiny_clip, None, ["cat"], ["a photo of a {}."])
    assert torch.allclose(single[:, 0], F.normalize(tiny_clip.encode_text(["a photo of a cat."])[0], dim=0),
                          atol=1e-5)


def test_raw_open_clip_model_and_tokenizer(tiny_clip):
    model = tiny_clip.text_encoder._model[0]
    tokenizer = open_clip.get_tokenizer(TINY)
    from_model = zero_shot_classifier(model, tokenizer, ["cat", "dog"], SIMPLE_TEMPLATES[:3])
    from_backbone = zero_shot_classifier(tiny_clip, None, ["cat", "dog"], SIMPLE_TEMPLATES[:3])
    assert torch.allclose(from_model, from_backbone, atol=1e-6)


def test_logits_apply_normalisation_and_scale(tiny_clip):
    weights = zero_shot_classifier(tiny_clip, None, ["cat", "dog"], ["a photo of a {}."])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features = tiny_clip.encode(images)
    logits = zero_shot_logits(features, weights, tiny_clip.logit_scale)
    expected = tiny_clip.logit_scale * F.normalize(features, dim=-1) @ weights
    assert logits.shape == (4, 2) and torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(zero_shot_logits(features * 7.0, weights, 2.0), logits * 2.0 / tiny_clip.logit_scale,
                          atol=1e-5)
    assert (zero_shot_logits(features, weights, 1.0).abs() <= 1.0 + 1e-5).all()  # cosines


def test_errors():
    with pytest.raises(TypeError, match="no text encoder"):
        zero_shot_classifier(torch.nn.Linear(2, 2), lambda t: t, ["cat"], ["{}"])
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_classifier(torch.nn.Linear(2, 2), None, [], ["{}"])


def test_templates_are_the_clip_paper_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES + SIMPLE_TEMPLATES)
    assert "a stylized {}." in SIMPLE_TEMPLATES
