"""Focus on Your Instruction (Guo et al., 2024): every formula of the method, in the paper's order.

The paper never released code; this is the project's reading of it, stated in ``docs/foi.md`` next to the
paper's words. Sections:

  * instruction spec: sub-instructions, composite prompt, token ownership and keywords (paper 4, 5.1);
  * 4.1  masks from IP2P's own cross-attention: Gaussian filter, ``gamma`` rounds of square + min-max, ``tau``;
  * 4.2  cross-condition attention modulation: ``softmax(X + dX) * M + softmax(Y) * (1 - M)``;
  * 4.3  decoupled guidance: the text term of IP2P's guidance restricted to the union of the masks.

The sampler that puts them together is ``make_foi_sampler`` in ``ip2p_jax.sampling``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ip2p_jax.models.attention import AttentionControl, LayerInfo, combine_values
from ip2p_jax.tokenizer import word_span

SEPARATOR = ", "  # between sub-instructions in the composite prompt


# ---------------------------------------------------------------------------------------------- instruction spec


@dataclasses.dataclass(frozen=True)
class SubInstruction:
    """One sub-instruction of an edit.

    Attributes:
      text: the instruction, e.g. ``"make the circle blue"``.
      keyword: the word (or words) naming the region to edit, e.g. ``"circle"``; it must occur in ``text`` as
        whole words (case-insensitive; the first occurrence counts). ``None`` uses all of the text's tokens.
      alpha: strength of the attention boost for this sub-instruction's tokens (paper 4.2), finite and >= 0
        (checked by ``instruction_tokens``; 0 is no boost).
    """

    text: str
    keyword: str | None = None
    alpha: float = 1.0


class InstructionError(ValueError):
    """A sub-instruction list that cannot be turned into an FoI edit."""


@struct.dataclass
class InstructionTokens:
    """The token-level view of one edit's sub-instructions (``K`` sub-instruction slots, ``T`` = 77 tokens).

    Attributes:
      ids: ``(T,)`` int32 ids of the composite prompt, padded.
      keyword_weights: ``(K, T)`` float32; row ``i`` averages sub-instruction ``i``'s keyword tokens.
      owner: ``(T, K)`` float32 one-hot owner of each token; all-zero rows for tokens owned by no
        sub-instruction (start, end, padding, separators).
      token_alpha: ``(T,)`` float32 alpha of each token's owner, 0 for unowned tokens.
      valid: ``(K,)`` bool, which slots hold a sub-instruction (the rest pad a batch to a common ``K``).
    """

    ids: np.ndarray
    keyword_weights: np.ndarray
    owner: np.ndarray
    token_alpha: np.ndarray
    valid: np.ndarray


def composite_prompt(instructions: Sequence[SubInstruction]) -> tuple[str, list[tuple[int, int]]]:
    """The sub-instructions joined by ``", "`` and each one's character span ``[start, end)`` in it."""
    spans, pieces, position = [], [], 0
    for instruction in instructions:
        spans.append((position, position + len(instruction.text)))
        pieces.append(instruction.text)
        position += len(instruction.text) + len(SEPARATOR)
    return SEPARATOR.join(pieces), spans


def _keyword_span(instruction: SubInstruction, index: int) -> tuple[int, int]:
    """Character span of the keyword's first whole-word, case-insensitive occurrence in the instruction."""
    if not instruction.keyword.split():
        raise InstructionError(f"sub-instruction {index} ({instruction.text!r}) has an empty keyword")
    span = word_span(instruction.text, instruction.keyword)
    if span is None:
        raise InstructionError(
            f"keyword {instruction.keyword!r} does not occur in sub-instruction {index} ({instruction.text!r})"
        )
    return span


def instruction_tokens(
    tokenizer, instructions: Sequence[SubInstruction], slots: int | None = None
) -> InstructionTokens:
    """Tokenises an edit's composite prompt and finds each sub-instruction's tokens and keyword tokens.

    Token spans come from the tokenizer's character offsets: a token belongs to the sub-instruction whose text
    its characters fall in, and is a keyword token when it overlaps the keyword's characters.

    Args:
      tokenizer: a (fast) CLIP tokenizer.
      instructions: ``k >= 1`` sub-instructions.
      slots: pad to this many sub-instruction slots (default ``k``).

    Raises:
      InstructionError: no sub-instruction, an empty one, an alpha that is not a finite number >= 0, a keyword not
        in its sub-instruction, or a composite prompt over CLIP's 77 tokens.
    """
    if not instructions:
        raise InstructionError("an FoI edit needs at least one sub-instruction")
    slots = len(instructions) if slots is None else slots
    if slots < len(instructions):
        raise InstructionError(f"{len(instructions)} sub-instructions do not fit in {slots} slots")
    for index, instruction in enumerate(instructions):
        if not instruction.text.strip():
            raise InstructionError(f"sub-instruction {index} is empty")
        alpha = instruction.alpha
        if not (
            isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha >= 0
        ):
            raise InstructionError(
                f"sub-instruction {index} ({instruction.text!r}): alpha must be a finite number >= 0, got {alpha!r}"
            )
    prompt, spans = composite_prompt(instructions)
    length = tokenizer.model_max_length
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    if len(encoded.input_ids) > length:
        raise InstructionError(
            f"the composite prompt {prompt!r} has {len(encoded.input_ids)} tokens; CLIP reads {length}"
        )
    ids = np.asarray(tokenizer(prompt, padding="max_length", max_length=length).input_ids, np.int32)
    keyword_weights = np.zeros((slots, length), np.float32)
    owner = np.zeros((length, slots), np.float32)
    token_alpha = np.zeros((length,), np.float32)
    for index, (instruction, (start, end)) in enumerate(zip(instructions, spans, strict=True)):
        if instruction.keyword is not None:
            kw_start, kw_end = _keyword_span(instruction, index)
            kw_start, kw_end = kw_start + start, kw_end + start
        for position, (tok_start, tok_end) in enumerate(encoded.offset_mapping):
            if tok_end <= tok_start or not (start <= tok_start and tok_end <= end):
                continue  # a special token, or another sub-instruction's / a separator
            owner[position, index] = 1.0
            token_alpha[position] = instruction.alpha
            if instruction.keyword is None or (tok_start < kw_end and kw_start < tok_end):
                keyword_weights[index, position] = 1.0
        if keyword_weights[index].sum() == 0:
            raise InstructionError(f"sub-instruction {index} ({instruction.text!r}) has no tokens")
        keyword_weights[index] /= keyword_weights[index].sum()
    valid = np.arange(slots) < len(instructions)
    return InstructionTokens(ids, keyword_weights, owner, token_alpha, valid)


# ---------------------------------------------------------------------------------------------- 4.1 masks


def gaussian_filter(maps_bhw: jax.Array, size: int = 3, sigma: float = 0.5) -> jax.Array:
    """Normalised ``size x size`` Gaussian blur of each ``(H, W)`` map, reflect-padded (paper 4.1: "each patch a
    linear combination of its neighbours", as Attend-and-Excite's smoothing, which the paper cites)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel_1d = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(kernel_1d, kernel_1d)
    kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)
    pad = size // 2
    padded = jnp.pad(maps_bhw, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = maps_bhw.shape[1:]
    out = jnp.zeros_like(maps_bhw)
    for i in range(size):
        for j in range(size):
            out = out + kernel[i, j] * padded[:, i : i + height, j : j + width]
    return out


def min_max(maps_bhw: jax.Array) -> jax.Array:
    """Scales each map to [0, 1]; a constant map becomes all zeros (it has no region to prefer)."""
    low = maps_bhw.min(axis=(1, 2), keepdims=True)
    high = maps_bhw.max(axis=(1, 2), keepdims=True)
    return (maps_bhw - low) / jnp.maximum(high - low, 1e-12) * (high > low)


def sharpen(maps_bhw: jax.Array, gamma: int) -> jax.Array:
    """Paper 4.1: ``gamma`` times ``A = minmax(A ** 2)``, raising the contrast of the target region."""
    for _ in range(gamma):
        maps_bhw = min_max(maps_bhw**2)
    return maps_bhw


def keyword_maps(maps_bhwt: jax.Array, keyword_weights_bkt: jax.Array) -> jax.Array:
    """Each sub-instruction's keyword map ``A[e_i]``: ``(B, h, w, T)``, ``(B, K, T)`` -> ``(B, K, h, w)``
    (multi-token keywords averaged)."""
    return jnp.einsum("bhwt,bkt->bkhw", maps_bhwt, keyword_weights_bkt)


def extract_masks(
    maps_bhwt: jax.Array,
    keyword_weights_bkt: jax.Array,
    valid_bk: jax.Array,
    tau_b: jax.Array,
    gamma: int = 3,
    filter_size: int = 3,
    filter_sigma: float = 0.5,
) -> jax.Array:
    """Paper 4.1, end to end: ``M_i = 1(sharpen(gauss(A[e_i]), gamma) >= tau)``.

    Args:
      maps_bhwt: head- and layer-averaged cross-attention probabilities of the text+image branch at the mask
        resolution, ``(B, h, w, T)``.
      keyword_weights_bkt: ``(B, K, T)`` from ``instruction_tokens``.
      valid_bk: ``(B, K)`` bool; padded slots get empty masks.
      tau_b: ``(B,)`` thresholds.

    Returns:
      ``(B, K, h, w)`` float32 masks of 0 and 1.
    """
    batch, slots = keyword_weights_bkt.shape[:2]
    maps = keyword_maps(maps_bhwt.astype(jnp.float32), keyword_weights_bkt)
    flat = maps.reshape(batch * slots, *maps.shape[2:])
    flat = sharpen(gaussian_filter(flat, filter_size, filter_sigma), gamma)
    sharpened = flat.reshape(maps.shape)
    masks = sharpened >= tau_b[:, None, None, None]
    return (masks & valid_bk[:, :, None, None]).astype(jnp.float32)


def draw_tau(key: jax.Array, tau: float | tuple[float, float]) -> jax.Array:
    """The threshold of one image: ``tau`` itself, or uniform in the range ``(low, high)`` (paper 5.1: [0.4, 0.7])."""
    if isinstance(tau, int | float):
        return jnp.float32(tau)
    low, high = tau
    return jax.random.uniform(key, (), jnp.float32, low, high)


def _overlap_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` 0 / 1: output cell ``j`` covers ``[j, j + 1) * size_in / size_out`` of the input, and
    is 1 where that interval overlaps input cell ``i``'s ``[i, i + 1)`` by a positive length (exact integers)."""
    i, j = np.arange(size_in)[None, :], np.arange(size_out)[:, None]
    return ((i * size_out < (j + 1) * size_in) & ((i + 1) * size_out > j * size_in)).astype(np.float32)


def resize_masks(masks_bkhw: jax.Array, size: tuple[int, int]) -> jax.Array:
    """0 / 1 masks ``(B, K, h, w)`` to another resolution ``(B, K, *size)``, keeping them 0 / 1; per axis:

    * shrinking: an output cell is inside when any input cell it overlaps is (max-pooling over the overlap, which
      also serves ratios that are not whole, 19 -> 10): a 2 x 2 blob at 16 x 16 survives in an 8 x 8 layer, where
      bilinear sampling and ``>= 0.5`` would leave 0.25 and erase it;
    * enlarging: bilinear (half-pixel centres, no antialiasing), then ``>= 0.5``.

    Both grids span the same image. Shrinking axes are pooled first; the order does not matter (bilinear's two
    taps have weights summing to 1, so one of them carries at least 0.5).
    """
    height, width = masks_bkhw.shape[2:]
    if (height, width) == tuple(size):
        return masks_bkhw
    if size[0] < height:
        masks_bkhw = jnp.einsum("yi,bkix->bkyx", _overlap_matrix(height, size[0]), masks_bkhw)
    if size[1] < width:
        masks_bkhw = jnp.einsum("xj,bkyj->bkyx", _overlap_matrix(width, size[1]), masks_bkhw)
    if size[0] < height or size[1] < width:
        masks_bkhw = (masks_bkhw > 0).astype(jnp.float32)
    if tuple(masks_bkhw.shape[2:]) == tuple(size):
        return masks_bkhw
    resized = jax.image.resize(masks_bkhw, (*masks_bkhw.shape[:2], *size), method="bilinear", antialias=False)
    return (resized >= 0.5).astype(jnp.float32)


def union_mask(masks_bkhw: jax.Array) -> jax.Array:
    """``M_union = clip(sum_i M_i, 0, 1)`` (paper 4.3): ``(B, K, h, w)`` -> ``(B, h, w)``."""
    return jnp.clip(masks_bkhw.sum(axis=1), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- 4.2 modulation


def xi(timestep: jax.Array, num_train_timesteps: int) -> jax.Array:
    """Paper eq. 7: ``xi(t) = 0.05 * t ** 4`` with the timestep normalised to [0, 1]."""
    return 0.05 * (timestep / num_train_timesteps) ** 4


def token_masks(masks_bkq: jax.Array, owner_btk: jax.Array) -> jax.Array:
    """Paper 4.2's ``M``: each token's owner's mask, the union mask for tokens owned by no sub-instruction.

    ``(B, K, Q)`` masks and ``(B, T, K)`` one-hot owners -> ``(B, Q, T)``.
    """
    owned = jnp.einsum("bkq,btk->bqt", masks_bkq, owner_btk)
    unowned = 1.0 - owner_btk.sum(axis=-1)  # (B, T)
    union = jnp.clip(masks_bkq.sum(axis=1), 0.0, 1.0)  # (B, Q)
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

    The UNet batch is the guidance batch ``[text+image, image only, none]`` of ``B`` images each. Only the
    text+image branch changes: its output is ``inside @ V_own + outside @ V_outside``, where ``V_outside`` is its
    own values (``outside_values="own"``, the default reading) or the image-only branch's (``"image_only"``).

    Attributes:
      masks: ``(B, K, h, w)`` sub-instruction masks at the mask resolution.
      owner: ``(B, T, K)`` one-hot token owners.
      token_alpha: ``(B, T)`` per-token alpha.
      xi_t: scalar ``xi(t)`` of this step.
      active: scalar bool; ``False`` leaves every branch plain (after ``modulation_stop``).
      outside_values: ``"own"`` or ``"image_only"`` (static).
    """

    masks: jax.Array
    owner: jax.Array
    token_alpha: jax.Array
    xi_t: jax.Array
    active: jax.Array
    outside_values: str = struct.field(pytree_node=False, default="own")

    def attend(self, scores_bnqk, v_bknd, layer: LayerInfo):
        batch = self.masks.shape[0]
        x, y = scores_bnqk[:batch], scores_bnqk[batch : 2 * batch]
        plain = combine_values(jax.nn.softmax(scores_bnqk, axis=-1), v_bknd)
        masks = resize_masks(self.masks, layer.size).reshape(batch, self.masks.shape[1], -1)
        inside, outside = modulated_probs(
            x, y, token_masks(masks, self.owner), self.token_alpha, self.xi_t
        )  # fmt: skip
        v_own = v_bknd[:batch]
        v_outside = v_own if self.outside_values == "own" else v_bknd[batch : 2 * batch]
        modulated = combine_values(inside, v_own) + combine_values(outside, v_outside)
        text_branch = jnp.where(self.active, modulated, plain[:batch])
        return jnp.concatenate([text_branch, plain[batch:]]), None
