"""FoI's input (paper 4, 5.1): sub-instructions, the composite prompt, and each token's owner and keyword weight.

An edit is ``k >= 1`` sub-instructions, each ``(text, keyword, alpha)``, joined by ``", "`` into one prompt; the
tokenizer's character offsets say which sub-instruction owns each token and which tokens are its keyword.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np
from flax import struct

from ip2p_jax.tokenizer import word_span

SEPARATOR = ", "  # between sub-instructions in the composite prompt


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


@struct.dataclass
class BranchTokens:
    """The token-level view of one edit whose sub-instructions each have a text branch of their own
    (``FoIConfig.text_branches = "per_instruction"``): each sub-instruction tokenised alone, as the single
    instruction of an edit (``K`` slots, ``T`` = 77 tokens).

    Attributes:
      ids: ``(K, T)`` int32, each sub-instruction's prompt, padded; padded slots hold the empty prompt.
      keyword_weights: ``(K, T)`` float32; row ``i`` averages sub-instruction ``i``'s keyword tokens in its own
        prompt.
      owner: ``(K, T)`` float32, 1 at the tokens of sub-instruction ``i``'s text in its own prompt.
      token_alpha: ``(K, T)`` float32, sub-instruction ``i``'s alpha at those tokens, 0 elsewhere.
      valid: ``(K,)`` bool, which slots hold a sub-instruction.
    """

    ids: np.ndarray
    keyword_weights: np.ndarray
    owner: np.ndarray
    token_alpha: np.ndarray
    valid: np.ndarray


def branch_tokens(tokenizer, instructions: Sequence[SubInstruction], slots: int | None = None) -> BranchTokens:
    """Each sub-instruction tokenised alone (``instruction_tokens`` of a one-instruction edit): its prompt has no
    composite limit beyond each sub-instruction's own 77 tokens.

    Raises:
      InstructionError: as ``instruction_tokens`` for any sub-instruction, or more sub-instructions than slots.
    """
    if not instructions:
        raise InstructionError("an FoI edit needs at least one sub-instruction")
    slots = len(instructions) if slots is None else slots
    if slots < len(instructions):
        raise InstructionError(f"{len(instructions)} sub-instructions do not fit in {slots} slots")
    length = tokenizer.model_max_length
    empty = np.asarray(tokenizer("", padding="max_length", max_length=length).input_ids, np.int32)
    ids = np.tile(empty, (slots, 1))
    keyword_weights, owner, token_alpha = (np.zeros((slots, length), np.float32) for _ in range(3))
    for index, instruction in enumerate(instructions):
        try:
            alone = instruction_tokens(tokenizer, [instruction])
        except InstructionError as error:  # (its message names slot 0 of a one-instruction edit)
            message = str(error).replace("sub-instruction 0", f"sub-instruction {index}", 1)
            raise InstructionError(
                message.replace("the composite prompt", f"sub-instruction {index}'s prompt")
            ) from None
        ids[index], keyword_weights[index] = alone.ids, alone.keyword_weights[0]
        owner[index], token_alpha[index] = alone.owner[:, 0], alone.token_alpha
    return BranchTokens(ids, keyword_weights, owner, token_alpha, np.arange(slots) < len(instructions))
