"""PyTorch state dicts -> Flax parameter trees, by name.

Our modules are named after diffusers' and transformers' (``down_blocks.0.resnets.1.conv1.weight`` lives at
``down_blocks_0/resnets_1/conv1/kernel``): a PyTorch key becomes a Flax path by joining each numeric part to the
part before it. Layouts change on the way: a convolution's ``(O, I, kh, kw)`` becomes ``(kh, kw, I, O)``, a
linear layer's ``(O, I)`` becomes ``(I, O)`` (a 1x1 convolution feeding one of our Dense layers too), a norm's
``weight`` is its ``scale`` and an embedding's ``weight`` its ``embedding``. A bare ``nn.Parameter`` (CLIP's
``class_embedding`` and ``logit_scale``) has no ``.weight`` suffix: the caller names those in ``bare_parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

import jax
import numpy as np
from flax import traverse_util

from ip2p_jax.weights.files import CheckpointError

# Buffers that PyTorch checkpoints may carry and that are not parameters.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


def flax_path(torch_key: str) -> tuple[str, ...]:
    """``"down_blocks.0.resnets.1.conv1.weight"`` -> ``("down_blocks_0", "resnets_1", "conv1", "weight")``."""
    parts: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _to_flax(leaf: str, tensor: np.ndarray, expected: tuple[int, ...]) -> np.ndarray | None:
    """The tensor in Flax layout, or None if its shape cannot be the expected one."""
    if leaf == "kernel" and len(expected) == 4 and tensor.ndim == 4:
        tensor = tensor.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and len(expected) == 2 and tensor.ndim in (2, 4):
        if tensor.ndim == 4:  # a 1x1 convolution stored for what is a Dense here
            if tensor.shape[2:] != (1, 1):
                return None
            tensor = tensor[:, :, 0, 0]
        tensor = tensor.T
    return tensor if tensor.shape == expected else None


def _torch_shape(leaf: str, expected: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(expected) == 4:
        return (expected[3], expected[2], expected[0], expected[1])
    if leaf == "kernel" and len(expected) == 2:
        return (expected[1], expected[0])
    return expected


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    expected_params: Mapping,
    *,
    what: str,
    rename: Callable[[str], str] = lambda key: key,
    bare_parameters: Collection[str] = (),
) -> dict:
    """Builds the Flax params for ``expected_params`` (a tree of arrays or ``jax.ShapeDtypeStruct``) from a
    PyTorch state dict. Every expected tensor must be present with the right shape and every checkpoint tensor
    used, else ``CheckpointError`` lists all the problems at once; nothing is returned half converted.

    ``bare_parameters`` are the (renamed) PyTorch keys of parameters that are not a layer's ``weight``/``bias``
    but a bare ``nn.Parameter`` (``"logit_scale"``): the Flax leaf of the same path holds them as they are.
    """
    bare = {flax_path(key) for key in bare_parameters}
    by_path: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}
    for key, tensor in state_dict.items():
        if not IGNORED_KEYS.search(key):
            by_path[flax_path(rename(key))] = (key, tensor)
    expected_flat = traverse_util.flatten_dict(dict(expected_params))
    params, missing, misshapen = {}, [], []
    for path, spec in expected_flat.items():
        leaf = path[-1]
        torch_path = path if path in bare else path[:-1] + ("bias" if leaf == "bias" else "weight",)
        found = by_path.pop(torch_path, None)
        torch_key = ".".join(torch_path)
        if found is None:
            missing.append(torch_key)
            continue
        key, tensor = found
        converted = _to_flax(leaf, np.asarray(tensor, np.float32), tuple(spec.shape))
        if converted is None:
            misshapen.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {_torch_shape(leaf, tuple(spec.shape))}")
        else:
            params[path] = converted
    unexpected = sorted(key for key, _ in by_path.values())
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
    if misshapen:
        problems.append(f"tensors of the wrong shape ({len(misshapen)}): {misshapen}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    return jax.tree.map(np.asarray, traverse_util.unflatten_dict(params))


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_old_vae_attention(key: str) -> str:
    """Checkpoints saved before diffusers 0.14 name the VAE's attention ``query/key/value/proj_attn``."""
    match = re.search(r"\.attentions\.\d+\.(query|key|value|proj_attn)\.(weight|bias)$", key)
    if match is None:
        return key
    return key[: match.start(1)] + _OLD_VAE_ATTENTION[match.group(1)] + key[match.end(1) :]


# Module names that end in ``_<digits>`` in PyTorch too (diffusers' TimestepEmbedding); every other such Flax
# name is a list entry (``down_blocks_0`` is ``down_blocks.0``).
_NAMES_WITH_DIGITS = frozenset({"linear_1", "linear_2"})
_LIST_ENTRY = re.compile(r"^(.+)_(\d+)$")


def torch_key(path: tuple[str, ...]) -> str:
    """``("down_blocks_0", "resnets_1", "conv1", "kernel")`` -> ``"down_blocks.0.resnets.1.conv1.weight"``."""
    parts = []
    for part in path[:-1]:
        match = _LIST_ENTRY.match(part)
        parts.extend(match.groups() if match and part not in _NAMES_WITH_DIGITS else (part,))
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)
