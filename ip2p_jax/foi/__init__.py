"""Focus on Your Instruction (Guo et al., 2024), in the paper's order, one module a section:

  * ``instructions``: sub-instructions, the composite prompt, token owners and keywords (paper 4, 5.1);
  * ``masks``: 4.1, masks from IP2P's own cross-attention: Gaussian filter, ``gamma`` rounds of square +
    min-max, ``tau``; resizing masks to each layer; the union mask; DiffEdit's noise-difference maps as another
    source;
  * ``modulation``: 4.2, cross-condition attention modulation ``softmax(X + dX) * M + softmax(Y) * (1 - M)``, an
    attention control;
  * ``guidance``: 4.3, decoupled guidance, the text term of IP2P's guidance restricted to the union of the masks;
    and ours, one text branch per sub-instruction, each text term guided inside its own mask;
  * ``config``: every setting (``FoIConfig``; paper 5.1's defaults), a model folder's recommended ones, and the
    settings as a script config's ``foi`` group;
  * ``sampler``: the jitted sampler that strings them together.
  * ``call``: an edit call's FoI parts checked before anything compiles (sub-instructions per image, the settings
    against the model, given masks) and each image's output masks.

The paper never released code; this is the project's reading of it, stated in ``docs/foi.md`` next to the
paper's words. The names below are the package's public ones.
"""

from ip2p_jax.foi.config import FOI_CONFIG, MASK_SOURCES, TEXT_BRANCHES, FoIConfig, foi_config, foi_settings
from ip2p_jax.foi.guidance import (
    branch_text_masks,
    decoupled_text_mask,
    in_decoupled_window,
    per_instruction_guidance,
)
from ip2p_jax.foi.instructions import (
    SEPARATOR,
    BranchTokens,
    InstructionError,
    InstructionTokens,
    SubInstruction,
    branch_tokens,
    composite_prompt,
    instruction_tokens,
)
from ip2p_jax.foi.masks import (
    branch_keyword_maps,
    draw_tau,
    extract_masks,
    gaussian_filter,
    keyword_maps,
    mask_size,
    masks_from_keyword_maps,
    min_max,
    noise_difference_maps,
    resize_masks,
    sharpen,
    union_mask,
)
from ip2p_jax.foi.modulation import FoIModulation, modulated_probs, token_masks, xi
from ip2p_jax.foi.sampler import FoIInputs, make_foi_sampler

__all__ = [
    "FOI_CONFIG",
    "MASK_SOURCES",
    "SEPARATOR",
    "TEXT_BRANCHES",
    "BranchTokens",
    "FoIConfig",
    "FoIInputs",
    "FoIModulation",
    "InstructionError",
    "InstructionTokens",
    "SubInstruction",
    "branch_keyword_maps",
    "branch_text_masks",
    "branch_tokens",
    "composite_prompt",
    "decoupled_text_mask",
    "draw_tau",
    "extract_masks",
    "foi_config",
    "foi_settings",
    "gaussian_filter",
    "in_decoupled_window",
    "instruction_tokens",
    "keyword_maps",
    "make_foi_sampler",
    "mask_size",
    "masks_from_keyword_maps",
    "min_max",
    "modulated_probs",
    "noise_difference_maps",
    "per_instruction_guidance",
    "resize_masks",
    "sharpen",
    "token_masks",
    "union_mask",
    "xi",
]
