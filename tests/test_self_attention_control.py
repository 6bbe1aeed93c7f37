"""The attention-control protocol on self-attention layers, on a tiny UNet: only the layers a control takes reach
its probability hook, their aux comes back under the attn1 names, and the explicit computation there equals the
fused path."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct
from test_unet import inputs, loaded_unet

from ip2p_jax.models.attention import RecordCrossAttention


class RecordSelfAttention(RecordCrossAttention):
    """Takes the self-attention layers of one size too; the UNet computes them step by step through the same
    probability hook, which returns their head-averaged probabilities ``(B, Q, Q)`` (and, as its parent does, the
    cross-attention maps of that size)."""

    size: tuple[int, int] = struct.field(pytree_node=False, default=(8, 8))

    def controls(self, layer):
        return super().controls(layer) or (layer.kind == "self" and layer.size == self.size)

    def probabilities(self, scores_bnqk, probs_bnqk, layer):
        if layer.kind == "self":
            return probs_bnqk, probs_bnqk.mean(axis=1)
        return super().probabilities(scores_bnqk, probs_bnqk, layer)


def test_self_attention_opt_in():
    name, _, _, params, apply = loaded_unet("sd1")
    sample, timesteps, context = inputs(name)
    variables = {"params": params}
    plain, _ = apply(variables, sample, timesteps, context)
    eps, aux = apply(variables, sample, timesteps, context, control=RecordSelfAttention(sizes=((8, 8),)))
    self_maps = {k: v for k, v in aux.items() if k.endswith(".attn1")}
    cross = [k for k in aux if k.endswith(".attn2")]
    # Exactly the self-attention layers beside the 8 x 8 cross-attention layers report, under their attn1 names.
    assert sorted(self_maps) == sorted(key.replace(".attn2", ".attn1") for key in cross)
    assert len(self_maps) >= 2 and len(aux) == 2 * len(cross)
    for maps in self_maps.values():
        assert maps.shape == (sample.shape[0], 64, 64)
        np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    # The step-by-step attention equals the fused (on CPU: tiled) path it replaced.
    error = float(jnp.max(jnp.abs(eps - plain)) / jnp.max(jnp.abs(plain)))
    print(f"self-attention computed by a control vs the fused path: {error:.1e} (max abs diff / max abs)")
    assert error <= 1e-5
