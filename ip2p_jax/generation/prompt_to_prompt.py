"""Prompt-to-Prompt (Hertz et al., 2022) as an attention control, and its token alignment.

InstructPix2Pix makes its training pairs (paper 3.1.2) by generating an input caption and its edited caption
together from the same noise, the edited prompt borrowing the input prompt's attention for the first fraction
``p`` of the denoising steps (``p ~ U(0.1, 0.9)`` per sample). Here that is one attention control,
``PromptToPrompt``, on a UNet batch laid out ``[branch, role, pair]``: guidance branches ``(text, none)`` (or
``text`` alone without guidance), roles ``(input, edited)``, ``B`` pairs. Everything is an array per pair, so one
compiled sampler serves any mix of prompts, alignments and ``p``.

* **Cross-attention replacement** (P2P section 3.2), in the text branch: the edited prompt's maps become
  ``A_edit = (A_input @ M) * a + A_own * (1 - a)`` with an alignment ``(M, a)`` of the two token sequences:

  - *word swap* (P2P's "replacement", prompts with the same number of words): token ``i`` of the input maps to
    token ``j`` of the edit when both are the same word or the word swapped at that place (``M[i, j] = 1``, or
    ``1 / n`` per token when a swapped word has ``n`` tokens in the edit and a different count in the input:
    the source maps' mass is kept); ``a = 1``;
  - *refinement* (words added or removed): a global alignment (Needleman-Wunsch: match 1, mismatch -1, gap 0,
    ties going to a gap in the input, as P2P's ``seq_aligner``) of the two id sequences; an edited token aligned
    with an input token takes its map (``M`` one-hot, ``a = 1``), a new token keeps its own (``a = 0``).

  End and padding tokens are aligned in order after each prompt's last word (P2P's code maps padding positions
  by index, which pairs the input's last words with the edit's padding when the input is longer).
  The null-text branch is left alone: both of its prompts are ``""``, there is nothing to align (P2P also edits
  the conditional half only).
* **Self-attention injection** (optional): the edited image's self-attention uses the input image's queries and
  keys (so its probabilities) with its own values, in both guidance branches. This is what the InstructPix2Pix
  reference's ``generate_img_dataset.py`` does (it copies the self-attention scores, and leaves cross-attention
  alone); P2P also injects self-attention, at layers of at most 16 x 16 positions (``self_attention_max_size``).

A step shares attention when ``i / (n - 1) < p`` (step ``i`` of ``n``): the IP2P reference's rule, so ``p = 1``
shares every step but the last, and ``p = 0`` none.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ip2p_jax.models.attention import AttentionControl, LayerInfo, dot_product_attention

ALIGNMENTS = ("auto", "word_swap", "refine")


class AlignmentError(ValueError):
    """Two prompts that cannot be aligned as asked (different word counts for a word swap, too many tokens)."""


@dataclasses.dataclass(frozen=True)
class TokenAlignment:
    """How the edited prompt's tokens take the input prompt's cross-attention maps (``T`` = 77 positions).

    Attributes:
      mapper: ``(T, T)`` float32; ``mapper[i, j]`` is the weight of input token ``i``'s map in edited token ``j``'s.
      alphas: ``(T,)`` float32; 1 where edited token ``j`` takes the mapped maps, 0 where it keeps its own.
      kind: ``"word_swap"`` or ``"refine"``.
    """

    mapper: np.ndarray
    alphas: np.ndarray
    kind: str


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids (start and end tokens included, unpadded) and character offsets of a prompt; over 77 is an error."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    if len(encoded.input_ids) > tokenizer.model_max_length:
        raise AlignmentError(
            f"prompt {text!r} has {len(encoded.input_ids)} tokens; CLIP reads {tokenizer.model_max_length}"
        )
    return list(encoded.input_ids), [tuple(o) for o in encoded.offset_mapping]


def _word_tokens(text: str, offsets: list[tuple[int, int]]) -> tuple[list[str], list[list[int]]]:
    """The prompt's whitespace-separated words and the token positions of each (from the tokenizer's offsets)."""
    spans = [(m.group(), m.span()) for m in re.finditer(r"\S+", text)]
    groups: list[list[int]] = [[] for _ in spans]
    for position, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # the start and end tokens
        for index, (_, (word_start, word_end)) in enumerate(spans):
            if word_start <= start and end <= word_end:
                groups[index].append(position)
                break
    return [word for word, _ in spans], groups


def _align_tails(mapper: np.ndarray, alphas: np.ndarray, source_end: int, target_end: int) -> None:
    """Pairs the end token and the padding after it in order: source ``source_end + k`` -> target
    ``target_end + k``; target positions left without a source keep their own maps."""
    length = mapper.shape[0]
    for target in range(target_end, length):
        source = source_end + target - target_end
        if source < length:
            mapper[source, target] = 1.0
        else:
            alphas[target] = 0.0


def word_swap_alignment(tokenizer, source: str, target: str) -> TokenAlignment:
    """P2P's replacement alignment of two prompts with the same number of (whitespace-separated) words."""
    length = tokenizer.model_max_length
    source_ids, source_offsets = _encode(tokenizer, source)
    target_ids, target_offsets = _encode(tokenizer, target)
    source_words, source_tokens = _word_tokens(source, source_offsets)
    target_words, target_tokens = _word_tokens(target, target_offsets)
    if len(source_words) != len(target_words):
        raise AlignmentError(
            f"a word swap needs prompts of as many words: {source!r} has {len(source_words)}, "
            f"{target!r} has {len(target_words)}"
        )
    mapper = np.zeros((length, length), np.float32)
    alphas = np.ones((length,), np.float32)
    mapper[0, 0] = 1.0  # the start token
    covered = {0}
    for from_tokens, to_tokens in zip(source_tokens, target_tokens, strict=True):
        if not from_tokens:
            continue  # nothing to take the maps from: the word keeps its own
        if len(from_tokens) == len(to_tokens):
            mapper[from_tokens, to_tokens] = 1.0
        else:  # a swapped word of another token count: every source token feeds every target token, mass kept
            for to in to_tokens:
                mapper[from_tokens, to] = 1.0 / len(to_tokens)
        covered.update(to_tokens)
    _align_tails(mapper, alphas, len(source_ids) - 1, len(target_ids) - 1)
    covered.update(range(len(target_ids) - 1, length))
    for position in set(range(length)) - covered:  # tokens outside every word (none for CLIP): keep their maps
        alphas[position] = 0.0
    return TokenAlignment(mapper, alphas, "word_swap")


def global_alignment(source_ids: list[int], target_ids: list[int]) -> list[int]:
    """Needleman-Wunsch of two id sequences (match 1, mismatch -1, gap 0); for each target position the source
    position it is aligned with, or -1 for an inserted token. Ties prefer a gap in the source, then a gap in the
    target, then the diagonal, as P2P's ``seq_aligner.global_align``."""
    n, m = len(source_ids), len(target_ids)
    score = np.zeros((n + 1, m + 1), np.int64)
    score[0, :] = 0
    score[:, 0] = 0  # gap 0: leading gaps are free
    move = np.zeros((n + 1, m + 1), np.int8)  # 1: from the left (insertion), 2: from above (deletion), 3: diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diagonal = score[i - 1, j - 1] + (1 if source_ids[i - 1] == target_ids[j - 1] else -1)
            best = max(left, up, diagonal)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i, j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_alignment(tokenizer, source: str, target: str) -> TokenAlignment:
    """P2P's refinement alignment: edited tokens aligned with an input token take its map, new ones their own."""
    length = tokenizer.model_max_length
    source_ids, _ = _encode(tokenizer, source)
    target_ids, _ = _encode(tokenizer, target)
    mapper = np.zeros((length, length), np.float32)
    alphas = np.zeros((length,), np.float32)
    # The end tokens match each other, so the sequences align through them; padding follows in order.
    for to, source_position in enumerate(global_alignment(source_ids, target_ids)):
        if source_position >= 0:
            mapper[source_position, to] = 1.0
            alphas[to] = 1.0
    alphas[len(target_ids) :] = 1.0
    _align_tails(mapper, alphas, len(source_ids), len(target_ids))
    return TokenAlignment(mapper, alphas, "refine")


def align_prompts(tokenizer, source: str, target: str, mode: str = "auto") -> TokenAlignment:
    """The alignment of ``target``'s tokens to ``source``'s: ``"word_swap"``, ``"refine"``, or ``"auto"`` (a word
    swap when the prompts have as many words, else a refinement). Raises ``AlignmentError``."""
    if mode not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {mode!r}")
    if mode == "auto":
        mode = "word_swap" if len(source.split()) == len(target.split()) else "refine"
    if mode == "word_swap":
        return word_swap_alignment(tokenizer, source, target)
    return refinement_alignment(tokenizer, source, target)


def shares_attention(step: jax.Array, num_steps: int, p: jax.Array) -> jax.Array:
    """Whether step ``step`` of ``num_steps`` shares attention, per pair: ``step / (n - 1) < p`` (the IP2P
    reference's rule). ``p``: ``(B,)`` -> ``(B,)`` bool."""
    return jnp.asarray(step, jnp.float32) / max(num_steps - 1, 1) < p


class PromptToPrompt(AttentionControl):
    """Prompt-to-Prompt on a UNet batch ``[branch, role, pair]`` (see the module docstring).

    It takes the cross-attention layers when ``cross_attention_sharing`` (their probabilities replaced) and the
    self-attention layers it injects (their output replaced: queries and keys moved, the fused kernel kept).
    Compose it with ``RecordCrossAttention`` (placed after it) to record the maps as used.

    Attributes:
      mapper: ``(B, T, T)`` float32 alignments (``TokenAlignment.mapper``), one per pair.
      alphas: ``(B, T)`` float32 (``TokenAlignment.alphas``).
      share: ``(B,)`` bool, whether this step shares attention for each pair (``shares_attention``).
      branches: 2 for the ``(text, none)`` guidance batch, 1 for the text branch alone (static).
      cross_attention_sharing: replace the edited prompt's cross-attention maps (static).
      self_attention_sharing: inject the input image's self-attention (static).
      self_attention_max_size: inject only at layers of at most this many positions (P2P: 256 at 512 px);
        ``None``: every layer, as the IP2P reference (static).
    """

    mapper: jax.Array
    alphas: jax.Array
    share: jax.Array
    branches: int = struct.field(pytree_node=False, default=2)
    cross_attention_sharing: bool = struct.field(pytree_node=False, default=True)
    self_attention_sharing: bool = struct.field(pytree_node=False, default=False)
    self_attention_max_size: int | None = struct.field(pytree_node=False, default=None)

    def _by_role(self, x: jax.Array) -> jax.Array:
        """``(branches * 2 * B, ...)`` -> ``(branches, 2, B, ...)``."""
        return x.reshape(self.branches, 2, self.mapper.shape[0], *x.shape[1:])

    def controls(self, layer: LayerInfo) -> bool:
        if layer.kind == "cross":
            return self.cross_attention_sharing
        if not self.self_attention_sharing:
            return False
        return self.self_attention_max_size is None or layer.size[0] * layer.size[1] <= self.self_attention_max_size

    def probabilities(self, scores_bnqk: jax.Array, probs_bnqk: jax.Array, layer: LayerInfo) -> tuple[jax.Array, Any]:
        del layer
        probs = self._by_role(probs_bnqk)
        base, own = probs[0, 0], probs[0, 1]  # the text branch: (B, heads, Q, T) each
        # P2P's precision matters little, but TPUs would otherwise multiply float32 in bfloat16 passes.
        mapped = jnp.einsum("bnqs,bst->bnqt", base, self.mapper, precision=jax.lax.Precision.HIGHEST)
        alphas = self.alphas[:, None, None, :]
        replaced = mapped * alphas + own * (1.0 - alphas)
        probs = probs.at[0, 1].set(jnp.where(self.share[:, None, None, None], replaced, own))
        return probs.reshape(scores_bnqk.shape), None

    def replaces_output(self, layer: LayerInfo) -> bool:
        return layer.kind == "self"

    def output(self, q_bqnd, k_bknd, v_bknd, layer):
        del layer
        share = self.share[None, :, None, None, None]

        def from_input(x):  # the edited image's rows take the input image's, in every branch, where sharing
            x = self._by_role(x)
            return x.at[:, 1].set(jnp.where(share, x[:, 0], x[:, 1])).reshape(-1, *x.shape[3:])

        out = dot_product_attention(from_input(q_bqnd), from_input(k_bknd), v_bknd)
        return out.reshape(out.shape[0], out.shape[1], -1), None
