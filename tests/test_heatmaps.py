"""Word heatmaps: the sampler's recording of cross-attention over layers and steps, the words picked out of it, and
the picture (``AttentionRecording``, ``pipe.word_maps``, ``visualisation.attention_grid``, ``sample.py
--attention``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ip2p_jax.models.attention import LayerInfo
from ip2p_jax.parallel import data_mesh
from ip2p_jax.pipeline import InstructPix2PixPipeline
from ip2p_jax.sampling import AttentionRecording, SamplerInputs, SamplerSettings, make_ip2p_sampler
from ip2p_jax.visualisation import attention_grid, heat_overlay

PROMPT = "turn the cat into a dog"
LATENT = (8, 12)
STEPS = 4
# Where each word's attention is planted: (row, column) in the early steps (high timesteps) and in the late ones.
PLANTED = {"cat": ((1, 2), (6, 9)), "dog": ((5, 10), (2, 3))}


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return InstructPix2PixPipeline.from_pretrained(pipeline_dir)


def planted_apply(token_of: dict[str, int], middle_timestep: float):
    """A stand-in UNet: predicts zero and runs the control on planted cross-attention scores, each word's token
    peaking at its early place while the timestep is above ``middle_timestep`` and at its late place below."""

    def apply(params, x, timestep, context, control):
        batch, height, width = x.shape[:3]
        scores = jnp.zeros((batch, 2, height * width, context.shape[1]))
        early = timestep > middle_timestep
        for word, (first, then) in PLANTED.items():
            place = jnp.where(early, first[0] * width + first[1], then[0] * width + then[1])
            scores = scores.at[:, :, place, token_of[word]].set(12.0)
        layer = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 0, 0, (height, width), 2)
        _, maps = control.probabilities(scores, jax.nn.softmax(scores, -1), layer)
        return jnp.zeros((batch, height, width, 4)), {layer.name: maps}

    return apply


@pytest.mark.parametrize("steps,when", [((0.0, 0.5), 0), ((0.5, 1.0), 1)], ids=["early", "late"])
def test_planted_maps_peak_where_planted(pipe, steps, when, tmp_path):
    """Recorded over the first or the second half of the steps, each word's map peaks where its attention was
    planted in those steps, and the picture shows it there."""
    from ip2p_jax.tokenizer import word_token_weights

    weights = word_token_weights(pipe.tokenizer, PROMPT, list(PLANTED))
    token_of = {word: int(np.argmax(row)) for word, row in zip(PLANTED, weights, strict=True)}
    settings = SamplerSettings(pipe.scheduler.replace("euler"), num_inference_steps=STEPS)
    timesteps = np.asarray(settings.scheduler.schedule(STEPS).timesteps)
    middle = float(timesteps[STEPS // 2 - 1] + timesteps[STEPS // 2]) / 2
    recording = AttentionRecording(level=0, steps=steps)
    sampler = make_ip2p_sampler(
        planted_apply(token_of, middle), settings, data_mesh(jax.devices()[:1]), attention=recording
    )
    context = jnp.zeros((2, 77, 8))
    inputs = SamplerInputs(
        image_latents=jnp.zeros((2, *LATENT, 4)),
        context=context,
        null_context=context,
        keys=jax.random.split(jax.random.key(0), 2),
        guidance_scale=jnp.full((2,), 7.5),
        image_guidance_scale=jnp.full((2,), 1.5),
    )
    _, maps = sampler({}, inputs)
    assert maps.shape == (2, *LATENT, 77)
    np.testing.assert_allclose(np.asarray(maps).sum(-1), 1.0, atol=1e-5)  # attention over tokens, averaged
    word_maps = pipe.word_maps(PROMPT, maps[0], list(PLANTED))
    for word, heat in zip(PLANTED, word_maps, strict=True):
        assert np.unravel_index(np.argmax(heat), heat.shape) == PLANTED[word][when], word

    picture = Image.fromarray(np.full((32, 48, 3), 128, np.uint8))
    grid = attention_grid(picture, picture, list(PLANTED), word_maps)
    grid.save(tmp_path / "attention.png")
    assert Image.open(tmp_path / "attention.png").size == grid.size
    # The overlay is reddest (jet's top) at the planted place, 4 px per latent position here.
    overlay = np.asarray(heat_overlay(picture, word_maps[0]), np.float32)
    row, column = PLANTED["cat"][when]
    redness = overlay[..., 0] - overlay[..., 2]
    assert redness[4 * row + 2, 4 * column + 2] == redness.max()


def test_recording_attention_changes_nothing_else(pipe):
    """On the tiny model: an edit that records attention gives the plain edit's pictures bit for bit, and maps of
    the layers at the level asked for; the words come out of them; bad requests are errors before compiling."""
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8))]
    settings = dict(num_inference_steps=2, scheduler="euler", output_type="np", progress=False)
    plain = pipe(images, PROMPT, **settings)
    recorded = pipe(images, PROMPT, attention=AttentionRecording(level=1), **settings)
    np.testing.assert_array_equal(recorded.images, plain.images)
    assert plain.attention is None
    assert recorded.attention[0].shape == (8, 8, 77)  # 16 x 16 latent, one level down
    np.testing.assert_allclose(recorded.attention[0].sum(-1), 1.0, atol=1e-5)
    assert pipe.word_maps(PROMPT, recorded.attention[0], ["cat", "dog"]).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="'horse' is not a word of"):
        pipe.word_maps(PROMPT, recorded.attention[0], ["horse"])
    with pytest.raises(ValueError, match=r"attention level 5: the UNet has cross-attention at levels"):
        pipe(images, PROMPT, attention=AttentionRecording(level=5), **settings)
    with pytest.raises(ValueError, match="FoI returns each keyword's map"):
        pipe(images, instructions=[("make the cat blue", "cat")], attention=AttentionRecording(), **settings)
    with pytest.raises(ValueError, match="start < stop"):
        AttentionRecording(steps=(0.5, 0.5))
