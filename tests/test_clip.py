"""The Flax CLIP (both towers, projections, logit_scale), its loader, the CLIP image processor loader and the
IP2P reference's CLIP input against transformers and PyTorch."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_relative_error, perturb_
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig as TorchCLIPConfig
from transformers import CLIPImageProcessorPil
from transformers import CLIPModel as TorchCLIPModel

from ip2p_jax.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ip2p_pixel_values, torch_bicubic_matrix
from ip2p_jax.evaluation.clip_metrics import image_embeddings, text_embeddings
from ip2p_jax.models.clip import CLIPConfig, pool_eos
from ip2p_jax.tokenizer import tokenize
from ip2p_jax.weights import CheckpointError, load_clip, load_clip_preprocessor, load_tokenizer

TOLERANCE = 1e-4
SHIPPED_CLIP = Path(__file__).resolve().parent.parent / "models" / "shapes-clip"
PROMPTS = ["a photo of a cat", "turn the dog blue", ""]

# OpenAI ViT-L/14-like (quick GELU) and OpenCLIP ViT-H/14-like, i.e. PickScore (exact GELU, other widths).
TINY_CLIPS = {
    "vit-l": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
    ),
    "vit-h": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
        vision=dict(
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            hidden_act="gelu",
        ),
    ),
}


def make_clip(name: str, vocab_size: int, seed: int = 0) -> TorchCLIPModel:
    torch.manual_seed(seed)
    text = dict(vocab_size=vocab_size, eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=0)
    config = TorchCLIPConfig(
        text_config={**text, **TINY_CLIPS[name]["text"]}, vision_config=TINY_CLIPS[name]["vision"], projection_dim=16
    )
    return perturb_(TorchCLIPModel(config), seed)


@pytest.fixture(scope="module")
def token_ids(tokenizer_dir):
    return tokenize(load_tokenizer(tokenizer_dir, subfolder=""), PROMPTS)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(TINY_CLIPS))
def reference(request, tmp_path_factory, vocab_size):
    """``(torch CLIPModel, its save_pretrained folder)`` for each tiny variant."""
    model = make_clip(request.param, vocab_size)
    folder = tmp_path_factory.mktemp(f"clip-{request.param}")
    model.save_pretrained(folder)
    return model, folder


def test_features_match_transformers(reference, token_ids, pixels):
    model, folder = reference
    module, params = load_clip(folder)
    assert module.config.vision.hidden_act == model.config.vision_config.hidden_act
    with torch.no_grad():
        expected_image = model.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
        expected_text = model.get_text_features(torch.tensor(token_ids, dtype=torch.long)).pooler_output.numpy()
    image_error = max_relative_error(image_embeddings(module, params, pixels), expected_image)
    text_error = max_relative_error(text_embeddings(module, params, token_ids), expected_text)
    print(
        f"{folder.name}: image features {image_error:.2e}, text features {text_error:.2e} (max abs diff / max abs ref)"
    )
    assert image_error <= TOLERANCE and text_error <= TOLERANCE
    np.testing.assert_array_equal(params["logit_scale"], model.logit_scale.detach().numpy())
    np.testing.assert_array_equal(
        params["vision_model"]["embeddings"]["class_embedding"],
        model.vision_model.embeddings.class_embedding.detach().numpy(),
    )


def test_missing_bare_parameter_is_named(reference, tmp_path):
    _, folder = reference
    tensors = load_file(folder / "model.safetensors")
    del tensors["logit_scale"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): \['logit_scale'\]"):
        load_clip(tmp_path)


def test_pooling_takes_the_end_token():
    hidden = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    ids = np.array([[7, 4, 9, 9, 9], [7, 9, 5, 9, 1]])
    # The first end token (padding repeats it)...
    np.testing.assert_array_equal(pool_eos(hidden, ids, eos_token_id=9), hidden[[0, 1], [2, 1]])
    # ...except for configs with the old eos_token_id 2, where transformers takes the largest id.
    ids_with_openai_end = np.array([[49406, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0]])
    np.testing.assert_array_equal(pool_eos(hidden, ids_with_openai_end, eos_token_id=2), hidden[[0, 1], [2, 1]])


# A config as transformers v4 wrote openai/clip-vit-large-patch14's (shortened): generic keys in the sub-configs,
# the old eos_token_id 2, and the legacy *_config_dict that transformers lets override the sub-configs.
V4_STYLE_CONFIG = {
    "architectures": ["CLIPModel"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {
        "_name_or_path": "",
        "add_cross_attention": False,
        "bad_words_ids": None,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_size": 768,
        "id2label": {"0": "LABEL_0"},
        "max_length": 20,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "pruned_heads": {},
        "top_k": 50,
        "torch_dtype": None,
        "use_bfloat16": False,
    },
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
    "torch_dtype": "float32",
    "transformers_version": None,
    "vision_config": {"eos_token_id": None, "hidden_size": 1024, "patch_size": 14, "typical_p": 1.0},
    "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "patch_size": 14},
}


def test_config_resolves_as_transformers():
    ours = CLIPConfig.from_transformers(V4_STYLE_CONFIG)
    theirs = TorchCLIPConfig(**V4_STYLE_CONFIG)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(ours.text, field) == getattr(theirs.text_config, field), field
    assert ours.text.eos_token_id == theirs.text_config.eos_token_id == 49407  # the legacy dict's default wins
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size", "image_size"):
        assert getattr(ours.vision, field) == getattr(theirs.vision_config, field), field
    assert ours.projection_dim == 768


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_cache": True}, r"CLIP config: unknown settings \['use_cache'\]"),
        ({"model_type": "siglip"}, "model_type 'siglip' is not a CLIPModel's"),
        ({"text_config": {"rope_theta": 1.0}}, r"text encoder config: unknown settings \['rope_theta'\]"),
        ({"vision_config": {"use_mask_token": True}}, r"vision config: unknown settings \['use_mask_token'\]"),
        ({"vision_config": {"hidden_act": "relu"}}, "hidden_act='relu' is not implemented"),
    ],
)
def test_config_errors_name_the_setting(change, message):
    with pytest.raises(ValueError, match=message):
        CLIPConfig.from_transformers({"model_type": "clip", **change})


def test_unsupported_config_in_a_folder_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"foo": 1}}))
    with pytest.raises(CheckpointError, match=r"CLIP in .*: vision config: unknown settings \['foo'\]"):
        load_clip(tmp_path)


def _noise(count: int, size: int) -> np.ndarray:
    """``(count, size, size, 3)`` uint8."""
    return np.random.default_rng(3).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _test_images():
    rng = np.random.default_rng(1)

    def noise(height, width, channels=3):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    rgba = noise(90, 60, 4)
    rgba[::2, :, 3] = 0  # fully transparent rows become white
    return [
        noise(300, 200),  # portrait array, downscaled
        Image.fromarray(noise(37, 50)),  # landscape, upscaled
        Image.fromarray(noise(224, 224)),  # no resize
        Image.fromarray(noise(101, 513)),  # odd crop offset
        Image.fromarray(noise(64, 48, 1)[..., 0], mode="L"),
        Image.fromarray(rgba, mode="RGBA"),
    ]


def _pixel_values(processor, images) -> np.ndarray:
    """transformers' NCHW pixel values as the NHWC ones CLIPModel takes."""
    return processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("folder", [None, SHIPPED_CLIP], ids=["clip-defaults", "shapes-clip"])
def test_ip2p_pixel_values_equal_the_processor_at_the_clip_size(folder, tmp_path):
    """Where no resize happens (images at the CLIP's size), the IP2P reference's input and CLIP's standard
    processing are the same: rescale and CLIP's mean and std."""
    processor = load_clip_preprocessor(folder or tmp_path)
    size = processor.crop_size["height"]
    images = _noise(3, size)
    ours = np.asarray(ip2p_pixel_values(images.astype(np.float32) / 255, size=size))
    expected = _pixel_values(processor, list(images))
    assert ours.shape == expected.shape == (3, size, size, 3) and ours.dtype == expected.dtype == np.float32
    assert np.max(np.abs(ours - expected)) <= 1e-5


def test_preprocessor_config_is_read(tmp_path):
    settings = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 24}, resample=2, image_mean=0.5)
    reference = CLIPImageProcessorPil(**settings)
    reference.save_pretrained(tmp_path)
    processor = load_clip_preprocessor(tmp_path)
    assert isinstance(processor, CLIPImageProcessorPil) and processor.to_dict() == reference.to_dict()
    images = _test_images()[:2]
    expected = np.stack([reference(images=i, return_tensors="np").pixel_values[0] for i in images])
    assert np.max(np.abs(_pixel_values(processor, images) - expected.transpose(0, 2, 3, 1))) <= 1e-5
    # The old feature-extractor form (OpenAI's checkpoints): ints for sizes, CLIP's standard settings.
    legacy = {"crop_size": 224, "size": 224, "resample": 3, "feature_extractor_type": "CLIPFeatureExtractor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    assert load_clip_preprocessor(tmp_path).to_dict() == CLIPImageProcessorPil().to_dict()
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="preprocessor_config.json is not valid JSON"):
        load_clip_preprocessor(tmp_path)


def test_missing_preprocessor_config_means_clip_defaults(tmp_path):
    """CLIP's standard processing with the PIL backend (as transformers v4 and OpenAI's clip package), whatever is
    installed; its mean and std are ours."""
    processor = load_clip_preprocessor(tmp_path)
    assert type(processor) is CLIPImageProcessorPil and processor.to_dict() == CLIPImageProcessorPil().to_dict()
    assert tuple(processor.image_mean) == OPENAI_CLIP_MEAN and tuple(processor.image_std) == OPENAI_CLIP_STD
    for image in _test_images():
        pixels = _pixel_values(processor, image)
        assert pixels.shape == (1, 224, 224, 3) and pixels.dtype == np.float32


@pytest.mark.parametrize("height, width", [(45, 61), (300, 260)])
def test_ip2p_pixel_values_equal_the_reference(height, width):
    images = np.random.default_rng(2).random((2, height, width, 3), dtype=np.float32)
    ours = np.asarray(ip2p_pixel_values(images))
    # The IP2P reference's ClipSimilarity.encode_image, NCHW.
    resized = torch.nn.functional.interpolate(
        torch.tensor(images).permute(0, 3, 1, 2), size=224, mode="bicubic", align_corners=False
    )
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    expected = ((resized - mean) / std).permute(0, 2, 3, 1).numpy()
    assert max_relative_error(ours, expected) <= 1e-5


def test_bicubic_matrix_rows_sum_to_one():
    np.testing.assert_allclose(torch_bicubic_matrix(37, 224).sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(torch_bicubic_matrix(224, 224), np.eye(224), atol=1e-6)


# The released architectures: OpenAI's ViT-L/14 and OpenCLIP's ViT-H/14 (PickScore_v1 is a fine-tuned ViT-H/14).
RELEASED_CLIPS = {
    "openai/clip-vit-large-patch14": dict(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
        ),
        projection_dim=768,
    ),
    "yuvalkirstain/PickScore_v1": dict(
        text_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            hidden_act="gelu",
        ),
        projection_dim=1024,
    ),
}


@pytest.mark.parametrize("name", sorted(RELEASED_CLIPS))
def test_released_architectures_map_every_tensor(name):
    """Every tensor of the full-size transformers model has its place here, with its shape (shapes only: no
    weights are allocated on either side)."""
    import jax

    from ip2p_jax.models.clip import BARE_PARAMETERS, CLIPModel
    from ip2p_jax.weights.convert import convert_state_dict

    with torch.device("meta"):
        reference = TorchCLIPModel(TorchCLIPConfig(**RELEASED_CLIPS[name]))
    state_dict = {key: np.broadcast_to(np.float32(0), tuple(t.shape)) for key, t in reference.state_dict().items()}
    config = CLIPConfig.from_transformers(reference.config.to_dict())
    inputs = (jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 1), jnp.int32))
    expected = jax.eval_shape(CLIPModel(config).init, jax.random.key(0), *inputs)["params"]
    params = convert_state_dict(state_dict, expected, what=name, bare_parameters=BARE_PARAMETERS)
    assert len(jax.tree.leaves(params)) == len([k for k in state_dict if not k.endswith("position_ids")])
