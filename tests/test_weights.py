"""Loading checkpoints: diffusers folders, sharded files, hub repo ids through the cache, and every error path."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_text_encoder

from ip2p_jax.weights import CheckpointError, load_text_encoder, load_tokenizer, load_unet, load_vae
from ip2p_jax.weights.convert import flax_path


def test_flax_path():
    assert flax_path("down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight") == (
        "down_blocks_0",
        "attentions_1",
        "transformer_blocks_0",
        "ff",
        "net_0",
        "proj",
        "weight",
    )
    assert flax_path("time_embedding.linear_1.bias") == ("time_embedding", "linear_1", "bias")


def test_missing_folder():
    with pytest.raises(CheckpointError, match="no such folder: /nonexistent/model"):
        load_unet("/nonexistent/model")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file, not a diffusers-layout folder"):
        load_unet(tmp_path / "model.safetensors")


def test_missing_component(tmp_path):
    with pytest.raises(CheckpointError, match="has no 'unet' folder"):
        load_unet(tmp_path)


def test_missing_config(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match="missing file: .*vae/config.json"):
        load_vae(tmp_path)


def test_missing_weights_names_what_is_there(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "vae", tmp_path / "vae", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"missing weights.*diffusion_pytorch_model.bin.*safe_serialization"):
        load_vae(tmp_path)


def test_missing_variant(pipeline_dir):
    with pytest.raises(CheckpointError, match="neither diffusion_pytorch_model.fp16.safetensors"):
        load_unet(pipeline_dir, variant="fp16")


def _rewrite(folder: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "unet", tmp_path / "unet")

    def edit(tensors):
        del tensors["conv_in.bias"]
        tensors["down_blocks.0.extra.weight"] = np.zeros(3, np.float32)

    _rewrite(tmp_path / "unet", edit)
    with pytest.raises(CheckpointError) as error:
        load_unet(tmp_path)
    message = str(error.value)
    assert "missing tensors (1): ['conv_in.bias']" in message
    assert "unexpected tensors (1): ['down_blocks.0.extra.weight']" in message


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "unet", tmp_path / "unet")

    def edit(tensors):
        tensors["conv_out.weight"] = np.zeros((4, 16, 5, 5), np.float32)

    _rewrite(tmp_path / "unet", edit)
    with pytest.raises(CheckpointError, match=r"conv_out.weight: checkpoint \(4, 16, 5, 5\), model \(4, 16, 3, 3\)"):
        load_unet(tmp_path)


def test_unsupported_config_names_the_setting(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "unet", tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="class_embed_type='timestep' is not implemented"):
        load_unet(tmp_path)


def test_corrupt_weights_file(tmp_path, pipeline_dir):
    shutil.copytree(pipeline_dir / "vae", tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vae(tmp_path)


def test_sharded_checkpoint(tmp_path, vocab_size):
    reference = make_text_encoder("sd1", vocab_size)
    reference.save_pretrained(tmp_path / "text_encoder", max_shard_size="20KB")
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    _, sharded = load_text_encoder(tmp_path)
    reference.save_pretrained(tmp_path / "single" / "text_encoder")
    _, single = load_text_encoder(tmp_path / "single")
    import jax

    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_tokenizer_errors(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor vocab.json and merges.txt"):
        load_tokenizer(tmp_path)


HUB_SCRIPT = textwrap.dedent(
    """
    import sys
    from ip2p_jax.weights import CheckpointError, load_text_encoder, load_tokenizer
    module, params = load_text_encoder("tiny-org/tiny-ip2p")
    tokenizer = load_tokenizer("tiny-org/tiny-ip2p")
    print("cached:", type(module).__name__, len(tokenizer))
    try:
        load_text_encoder("tiny-org/not-cached")
    except CheckpointError as error:
        print("uncached:", error)
    # The whole pipeline by repo id edits as the same folder given by path.
    import numpy as np
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    picture = np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    settings = dict(num_inference_steps=2, output_type="np", progress=False)
    by_id = InstructPix2PixPipeline.from_pretrained("tiny-org/tiny-ip2p")(picture, "make it red", **settings)
    by_path = InstructPix2PixPipeline.from_pretrained(sys.argv[1])(picture, "make it red", **settings)
    print("pipeline:", by_id.images.shape, float(np.abs(by_id.images - by_path.images).max()))
    """
)


def test_hub_repo_id_through_the_offline_cache(tmp_path, pipeline_dir):
    """A repo id resolves through huggingface_hub's cache under HF_HOME with HF_HUB_OFFLINE=1 (no network): each
    part, and the whole pipeline, which edits as the folder it was copied from."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-ip2p"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(pipeline_dir, repo / "snapshots" / revision)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-c", HUB_SCRIPT, str(pipeline_dir)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cached: CLIPTextModel" in result.stdout
    assert "uncached: tiny-org/not-cached (revision main) is not in the Hugging Face cache and HF_HUB_OFFLINE" in (
        result.stdout
    )
    assert "pipeline: (1, 32, 32, 3) 0.0" in result.stdout, result.stdout
