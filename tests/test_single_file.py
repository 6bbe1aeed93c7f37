"""Single-file checkpoints in the original LDM layout (``weights/single_file.py``): diffusers' own conversion
(``diffusers.loaders.single_file_utils``) is the reference for the layout, and diffusers' ``from_single_file``
pipeline for the pictures."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import TINY_UNETS, TINY_VAE_8X, make_text_encoder, make_unet, make_vae
from diffusers.loaders import single_file_utils as reference
from PIL import Image

from ip2p_jax.models.unet import UNetConfig
from ip2p_jax.models.vae import VAEConfig
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.weights import CheckpointError, single_file_config_source
from ip2p_jax.weights.export import export_single_file
from ip2p_jax.weights.single_file import (
    ldm_text_key,
    ldm_unet_key,
    ldm_vae_key,
    open_clip_to_transformers,
    read_single_file,
    to_ldm,
    write_single_file,
)

PROMPTS = ["make the sky blue", "turn the cat into a dog"]
SIZE = 32


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def text_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A CLIP text model's tensors under ``text_model.`` as single files hold them (transformers v4 wrote the
    tower so; v5 leaves the prefix out), without the position-id buffer."""
    state = {key.removeprefix("text_model."): value for key, value in numpy_state(model).items()}
    return {f"text_model.{key}": value for key, value in state.items() if not key.endswith("position_ids")}


def assert_same_state(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)


@pytest.fixture(scope="module")
def single_file(pipeline_dir, tmp_path_factory):
    """``pipeline_dir`` (the tiny IP2P model) written as one LDM-layout file."""
    return export_single_file(pipeline_dir, tmp_path_factory.mktemp("single") / "tiny-ip2p.safetensors")


@pytest.fixture(scope="module")
def from_folder(pipeline_dir):
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir)


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
def test_unet_layout_is_the_one_diffusers_reads(name):
    """Our diffusers -> LDM keys, read back by diffusers' own converter, give every tensor back in its place: for
    SD 1.x-like, SD 2.x-like (two layers a block, linear projections, two transformer layers) and a 4-channel UNet
    with cross-attention only at the bottom (where the upsampler's place in an LDM layer differs)."""
    model = make_unet(name)
    state = numpy_state(model)
    config = UNetConfig.from_diffusers(dict(model.config))
    ldm = to_ldm(state, lambda key: ldm_unet_key(key, config))
    assert all(key.startswith("model.diffusion_model.") for key in ldm)
    assert_same_state(reference.convert_ldm_unet_checkpoint(ldm, dict(model.config)), state)


@pytest.mark.parametrize("config", [None, TINY_VAE_8X], ids=["2-blocks", "4-blocks"])
def test_vae_layout_is_the_one_diffusers_reads(config):
    model = make_vae() if config is None else make_vae(config=config)
    state = numpy_state(model)
    vae_config = VAEConfig.from_diffusers(dict(model.config))
    ldm = to_ldm(state, lambda key: ldm_vae_key(key, vae_config), vae=True)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 convolutions
    assert_same_state(reference.convert_ldm_vae_checkpoint(ldm, dict(model.config)), state)


def test_text_encoder_layouts(vocab_size):
    """SD 1.x's transformers CLIP under ``cond_stage_model.transformer.``; SD 2.x's OpenCLIP (fused attention
    projections, one more block than SD 2.x reads, the text projection) as diffusers converts it."""
    sd1 = text_state(make_text_encoder("sd1", vocab_size))
    ldm = to_ldm(sd1, ldm_text_key)
    assert_same_state(reference.convert_ldm_clip_checkpoint(ldm), sd1)

    model = make_text_encoder("sd2", vocab_size)
    sd2 = text_state(model)
    layers, width = model.config.num_hidden_layers, model.config.hidden_size
    prefix = "cond_stage_model.model."
    open_clip = {
        prefix + "token_embedding.weight": sd2["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd2["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd2["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd2["text_model.final_layer_norm.bias"],
        prefix + "text_projection": np.eye(width, dtype="f4"),
        prefix + "logit_scale": np.ones((), "f4"),
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for layer in range(layers + 1):  # the last block exists in the file and SD 2.x does not read it
        source = f"text_model.encoder.layers.{min(layer, layers - 1)}."
        block = f"{prefix}transformer.resblocks.{layer}."
        for leaf in ("weight", "bias"):
            fused = [sd2[f"{source}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            open_clip[f"{block}attn.in_proj_{leaf}"] = np.concatenate(fused)
            open_clip[f"{block}attn.out_proj.{leaf}"] = sd2[f"{source}self_attn.out_proj.{leaf}"]
            for ldm_name, name in names.items():
                open_clip[f"{block}{ldm_name}.{leaf}"] = sd2[f"{source}{name}.{leaf}"]
    got, used = open_clip_to_transformers(open_clip, layers)
    assert_same_state(got, sd2)
    assert used == set(open_clip)
    expected = reference.convert_open_clip_checkpoint(
        model, {k: torch.from_numpy(v) for k, v in open_clip.items() if f"resblocks.{layers}." not in k}
    )
    assert_same_state(got, {k: v.numpy() for k, v in expected.items()})


def test_loads_as_the_folder_it_came_from(single_file, pipeline_dir, from_folder):
    """Export to one file and back is lossless: every parameter equals the folder's."""
    loaded = InstructPix2PixPipeline.from_single_file(single_file, config=pipeline_dir)
    for part in ("unet", "vae", "text_encoder"):
        got, want = jax.tree.leaves(loaded.params[part]), jax.tree.leaves(from_folder.params[part])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded.unet.config == from_folder.unet.config


def test_edits_as_diffusers_from_single_file(single_file, pipeline_dir, tmp_path):
    """diffusers' ``from_single_file`` reads our file, and its edit equals ours from the same file."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from ip2p_jax.weights.export import write_model_index

    config = tmp_path / "config"  # diffusers takes the pipeline's components from a full model_index.json
    shutil.copytree(pipeline_dir, config)
    write_model_index(config)
    pipe = StableDiffusionInstructPix2PixPipeline.from_single_file(
        str(single_file), config=str(config), local_files_only=True, safety_checker=None
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # deterministic, as ours below
    pipe.set_progress_bar_config(disable=True)
    ours = InstructPix2PixPipeline.from_single_file(single_file, config=pipeline_dir)
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in PROMPTS]
    latents = torch.from_numpy(rng.randn(len(PROMPTS), 4, SIZE // 2, SIZE // 2).astype("f4"))
    settings = dict(num_inference_steps=3, guidance_scale=7.5, image_guidance_scale=1.5, output_type="np")
    expected = pipe(PROMPTS, image=images, latents=latents, **settings).images
    got = ours(images, PROMPTS, scheduler="euler", latents=latents.permute(0, 2, 3, 1).numpy(), **settings)
    difference = np.abs(got.images - expected).max()
    print(f"single file, diffusers' from_single_file against ours, 3 steps: max abs pixel difference {difference:.2e}")
    assert difference <= 2e-3


def test_pickles_need_the_opt_in(single_file, pipeline_dir, from_folder, tmp_path):
    tensors = read_single_file(single_file)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}, "global_step": 3}, ckpt)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        InstructPix2PixPipeline.from_single_file(ckpt, config=pipeline_dir)
    loaded = InstructPix2PixPipeline.from_single_file(ckpt, config=pipeline_dir, allow_pickle=True)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(from_folder.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_keys_are_named(single_file, pipeline_dir, tmp_path):
    tensors = read_single_file(single_file)
    extra = {"model.diffusion_model.input_blocks.99.0.weight": np.zeros(2, "f4"), "cond_stage_model.foo": np.ones(1)}
    # LDM's schedule buffers are known and unused.
    path = write_single_file(tmp_path / "extra.safetensors", {**tensors, **extra, "betas": np.ones(4, "f4")})
    with pytest.raises(CheckpointError, match="model.diffusion_model.input_blocks.99.0.weight") as error:
        InstructPix2PixPipeline.from_single_file(path, config=pipeline_dir)
    assert "cond_stage_model.foo" in str(error.value) and "betas" not in str(error.value)


def test_missing_tensor_is_named(single_file, pipeline_dir, tmp_path):
    tensors = read_single_file(single_file)
    del tensors["first_stage_model.decoder.up.0.block.0.conv1.weight"]
    path = write_single_file(tmp_path / "missing.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"VAE of .*first_stage_model\.decoder\.up\.0\.block\.0\.conv1\.weight"):
        InstructPix2PixPipeline.from_single_file(path, config=pipeline_dir)


def test_ema_weights_and_components_from_the_config(single_file, pipeline_dir, from_folder, tmp_path):
    """``ema=True`` takes the UNet from ``model_ema.`` (LDM's dot-less names); a file of the UNet alone takes the
    autoencoder and text encoder from ``config``."""
    from ip2p_jax.weights.single_file import ema_key

    tensors = read_single_file(single_file)
    unet_only = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    ema = {ema_key(k): v + 1 for k, v in unet_only.items()}
    path = write_single_file(tmp_path / "ema.safetensors", {**unet_only, **ema, "model_ema.num_updates": np.ones(1)})
    plain = InstructPix2PixPipeline.from_single_file(path, config=pipeline_dir)
    averaged = InstructPix2PixPipeline.from_single_file(path, config=pipeline_dir, ema=True)
    for raw, avg, want in zip(
        *(jax.tree.leaves(p.params["unet"]) for p in (plain, averaged, from_folder)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(raw), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(avg), np.asarray(want) + 1)
    for a, b in zip(jax.tree.leaves(plain.params["vae"]), jax.tree.leaves(from_folder.params["vae"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="no EMA"):
        InstructPix2PixPipeline.from_single_file(single_file, config=pipeline_dir, ema=True)


def test_bad_files(tmp_path, single_file):
    with pytest.raises(CheckpointError, match="no such file"):
        read_single_file(tmp_path / "absent.safetensors")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(CheckpointError, match="ends in one of"):
        read_single_file(tmp_path / "model.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_single_file(tmp_path / "broken.safetensors")
    with pytest.raises(FileExistsError):
        export_single_file(tmp_path, single_file)


def test_default_config_by_architecture(single_file):
    """With no config named, the hub repo whose configs fit the file (as diffusers infers); a tiny file fits none."""
    ip2p = {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 8, 3, 3)),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((320, 768)),
    }
    assert single_file_config_source(ip2p, "x") == "timbrooks/instruct-pix2pix"
    with pytest.raises(CheckpointError, match="cannot tell which model"):
        single_file_config_source(read_single_file(single_file), single_file)


def test_sample_cli_reads_a_single_file(single_file, pipeline_dir, tmp_path, capsys):
    """``sample.py --model FILE --model-config DIR`` edits as ``--model DIR``; a .ckpt without ``--allow-pickle``
    is refused with the reason."""
    import sample

    image = tmp_path / "in.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    common = ["--image", str(image), "--instruction", "make the sky blue"]
    common += ["--config.sample.steps=2", "--config.sample.scheduler=euler"]
    argv = ["--model", str(single_file), "--model-config", str(pipeline_dir), "--out", str(tmp_path / "file.png")]
    assert sample.main(argv + common) == 0
    assert sample.main(["--model", str(pipeline_dir), "--out", str(tmp_path / "folder.png")] + common) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "file.png")), np.asarray(Image.open(tmp_path / "folder.png"))
    )
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    argv = ["--model", str(ckpt), "--model-config", str(pipeline_dir), "--out", str(tmp_path / "o.png")]
    assert sample.main(argv + common) == 1
    assert "--allow-pickle" in capsys.readouterr().err


def test_converted_to_a_folder_that_diffusers_and_training_read(single_file, pipeline_dir, from_folder, tmp_path):
    """``tools/convert_single_file.py``: the file becomes a diffusers folder (the form train.py starts from) with
    the same tensors; diffusers' pipeline loads it."""
    import importlib.util
    from pathlib import Path

    from diffusers import StableDiffusionInstructPix2PixPipeline

    tool_path = Path(__file__).resolve().parents[1] / "tools" / "convert_single_file.py"
    spec = importlib.util.spec_from_file_location("convert_single_file", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    main = tool.main
    out = tmp_path / "converted"
    assert main([str(single_file), "--out", str(out), "--config", str(pipeline_dir)]) == 0
    converted = InstructPix2PixPipeline.from_pretrained(out)
    for a, b in zip(jax.tree.leaves(converted.params), jax.tree.leaves(from_folder.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None)
    assert main([str(single_file), "--out", str(out), "--config", str(pipeline_dir)]) == 1  # not empty
