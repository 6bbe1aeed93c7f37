"""Paper 4.2: cross-condition attention modulation, ``softmax(X + dX) * M + softmax(Y) * (1 - M)``, as an
attention control of every cross-attention layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ip2p_jax.foi.masks import resize_masks, union_mask
from ip2p_jax.models.attention import AttentionControl, LayerInfo, attention_scores, combine_values


def xi(timestep: jax.Array, num_train_timesteps: int) -> jax.Array:
    """Paper eq. 7: ``xi(t) = 0.05 * t ** 4`` with the timestep normalised to [0, 1]."""
    return 0.05 * (timestep / num_train_timesteps) ** 4


def token_masks(masks_bkq: jax.Array, owner_btk: jax.Array) -> jax.Array:
    """Paper 4.2's ``M``: each token's owner's mask, the union mask for tokens owned by no sub-instruction.

    ``(B, K, Q)`` masks and ``(B, T, K)`` one-hot owners -> ``(B, Q, T)``.
    """
    owned = jnp.einsum("bkq,btk->bqt", masks_bkq, owner_btk)
    unowned = 1.0 - owner_btk.sum(axis=-1)  # (B, T)
    union = union_mask(masks_bkq)  # (B, Q)
    return owned + union[:, :, None] * unowned[:, None, :]


def modulated_probs(
    x_bnqk: jax.Array, y_bnqk: jax.Array, mask_bqk: jax.Array, alpha_bk: jax.Array, xi_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Paper eq. 6 as this project reads it: the text+image branch's probabilities, split by the mask.

    ``dX = alpha * xi(t) * (max_k X - X)``; inside the mask ``softmax(X + dX) * M``, outside
    ``softmax(Y) * (1 - M)``. Rows are not renormalised.

    Args:
      x_bnqk: the text+image branch's scaled scores ``X``.
      y_bnqk: the image-only branch's scaled scores ``Y`` (same layer, same step).
      mask_bqk: ``M`` from ``token_masks`` at this layer's resolution.
      alpha_bk: per-token alpha (``(B, T)`` broadcast over queries).
      xi_t: scalar ``xi(t)``.

    Returns:
      ``(inside, outside)``, each ``(B, heads, Q, K)``; their sum is ``A'``.
    """
    delta = alpha_bk[:, None, None, :] * xi_t * (x_bnqk.max(axis=-1, keepdims=True) - x_bnqk)
    mask = mask_bqk[:, None]
    inside = jax.nn.softmax(x_bnqk + delta, axis=-1) * mask
    outside = jax.nn.softmax(y_bnqk, axis=-1) * (1.0 - mask)
    return inside, outside


class FoIModulation(AttentionControl):
    """Cross-condition attention modulation (paper 4.2) in every cross-attention layer, as an attention control.

    The UNet batch is the guidance batch of ``B`` images each: ``[text+image, image only, none]``, or in the
    per-instruction mode ``[text+image of sub-instruction 1, ..., of sub-instruction n, image only, none]``
    (``text_branches = n``). Only the text+image branches change: each one's output is
    ``inside @ V_own + outside @ V_outside``, with ``Y`` the image-only branch's scores and ``V_outside`` the
    branch's own values (``outside_values="own"``, the default reading) or the image-only branch's
    (``"image_only"``). Every array below is per text branch, branch-major (``n B`` rows).

    Attributes:
      masks: ``(n B, K, h, w)`` sub-instruction masks at the mask resolution (per-instruction mode: ``K = 1``,
        the branch's own mask).
      owner: ``(n B, T, K)`` one-hot token owners.
      token_alpha: ``(n B, T)`` per-token alpha.
      xi_t: scalar ``xi(t)`` of this step.
      active: scalar bool; ``False`` leaves every branch plain (after ``modulation_stop``).
      outside_values: ``"own"`` or ``"image_only"`` (static).
      text_branches: ``n`` (static).
    """

    masks: jax.Array
    owner: jax.Array
    token_alpha: jax.Array
    xi_t: jax.Array
    active: jax.Array
    outside_values: str = struct.field(pytree_node=False, default="own")
    text_branches: int = struct.field(pytree_node=False, default=1)

    def replaces_output(self, layer: LayerInfo) -> bool:
        return True

    def output(self, q_bqnd, k_bknd, v_bknd, layer: LayerInfo):
        scores_bnqk = attention_scores(q_bqnd, k_bknd)
        rows = self.masks.shape[0]  # n B text+image rows, then the image-only branch's B
        images = rows // self.text_branches

        def image_only(x):  # the image-only branch's rows, once per text branch
            x = x[rows : rows + images]
            return x if self.text_branches == 1 else jnp.tile(x, (self.text_branches,) + (1,) * (x.ndim - 1))

        x, y = scores_bnqk[:rows], image_only(scores_bnqk)
        plain = combine_values(jax.nn.softmax(scores_bnqk, axis=-1), v_bknd)
        masks = resize_masks(self.masks, layer.size).reshape(rows, self.masks.shape[1], -1)
        mask = token_masks(masks, self.owner)
        inside, outside = modulated_probs(x, y, mask, self.token_alpha, self.xi_t)
        v_own = v_bknd[:rows]
        v_outside = v_own if self.outside_values == "own" else image_only(v_bknd)
        modulated = combine_values(inside, v_own) + combine_values(outside, v_outside)
        text_branches = jnp.where(self.active, modulated, plain[:rows])
        return jnp.concatenate([text_branches, plain[rows:]]), None
