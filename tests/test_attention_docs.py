"""Runs the worked example of docs/attention.md on a tiny UNet, so the documentation stays true."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet import inputs, loaded_unet

from ip2p_jax.models.attention import Compose, RecordCrossAttention

DOC = Path(__file__).parents[1] / "docs" / "attention.md"


@pytest.fixture(scope="module")
def remove_token_class():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = next(block for block in blocks if "class RemoveToken" in block)
    namespace: dict = {}
    exec(compile(source, str(DOC), "exec"), namespace)
    return namespace["RemoveToken"]


def test_remove_token_example(remove_token_class):
    RemoveToken = remove_token_class
    name, _, _, params, apply = loaded_unet("sd1")
    sample, timesteps, context = inputs(name)
    variables = {"params": params}
    plain, _ = apply(variables, sample, timesteps, context)

    untouched, aux = apply(variables, sample, timesteps, context, control=RemoveToken(jnp.int32(2), blocks=()))
    assert aux == {}
    np.testing.assert_array_equal(untouched, plain)

    eps, removed = apply(variables, sample, timesteps, context, control=RemoveToken(jnp.int32(2)))
    _, recorded = apply(variables, sample, timesteps, context, control=RecordCrossAttention())
    expected_layers = sorted(k for k in recorded if k.startswith(("mid_block", "up_blocks")))
    assert sorted(removed) == expected_layers
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2"
    np.testing.assert_allclose(removed[mid], recorded[mid][..., 2], rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(eps - plain))) > 1e-3

    size = apply._cache_size()
    apply(variables, sample, timesteps, context, control=RemoveToken(jnp.int32(3)))
    assert apply._cache_size() == size  # the token is traced: no recompilation

    # Composed with a recorder after it: the recorder sees the token gone where it was removed, and only there.
    composed = Compose(RemoveToken(jnp.int32(2)), RecordCrossAttention())
    eps_composed, aux = apply(variables, sample, timesteps, context, control=composed)
    had, seen = composed.split(aux)
    np.testing.assert_allclose(eps_composed, eps, rtol=1e-6, atol=1e-7)
    assert sorted(had) == expected_layers and sorted(seen) == sorted(recorded)
    for name, maps in seen.items():
        gone = float(jnp.max(maps[..., 2])) == 0.0
        assert gone == (name in expected_layers), name


def test_removed_token_gets_no_attention(remove_token_class):
    """Probabilities of a layer under the control: zero on the token, the others renormalised."""
    from ip2p_jax.models.attention import LayerInfo

    control = remove_token_class(jnp.int32(1))
    layer = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 0, 2, (2, 2), 2)
    scores = jax.random.normal(jax.random.key(0), (1, 2, 4, 3))
    probs, had = control.probabilities(scores, jax.nn.softmax(scores, -1), layer)
    plain = jax.nn.softmax(scores, -1)
    np.testing.assert_allclose(probs[..., 1], 0.0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[..., 0] / probs[..., 2], plain[..., 0] / plain[..., 2], rtol=1e-5)
    np.testing.assert_allclose(had, plain[..., 1].mean(1).reshape(1, 2, 2), rtol=1e-6)


def test_recipe_runs_on_the_shipped_model(tmp_path, monkeypatch):
    """docs/attention.md's recipe, as written, on the shipped model: the picture is written, and the object word's
    map is hottest on the object (the red circle of examples/shapes.png)."""
    from PIL import Image

    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    source = next(block for block in blocks if "class TokenMaps" in block)
    out = tmp_path / "recipe.png"
    monkeypatch.chdir(DOC.parents[1])  # the recipe's paths are the repository's
    namespace: dict = {}
    exec(compile(source.replace('"attention_recipe.png"', repr(str(out))), str(DOC), "exec"), namespace)
    assert Image.open(out).size == (3 * 256, 256)
    circle = np.asarray(namespace["tiles"][1], np.float32)
    redness = circle[..., 0] - circle[..., 2]  # jet's red end is where the map is highest
    row, column = np.unravel_index(np.argmax(redness), redness.shape)
    red, green, blue = np.asarray(namespace["image"], np.float32)[row, column]
    assert red > 180 and green < 80 and blue < 80, "the hottest place is not on the red circle"
