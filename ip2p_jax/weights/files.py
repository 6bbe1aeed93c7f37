"""Finding a checkpoint's files: a local diffusers-layout folder, or a Hugging Face Hub repo id.

A hub repo id goes through ``huggingface_hub.snapshot_download`` with only the files the component needs, so
``HF_HOME``, ``HF_HUB_OFFLINE`` and ``revision`` behave as everywhere else in the Hugging Face tools.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing folder or file, missing / unexpected / misshapen tensors."""


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # a diffusers component's weights file
TRANSFORMERS_WEIGHTS = "model.safetensors"  # a transformers model's
FOI_CONFIG = "foi_config.json"  # a model folder's recommended FoI settings (``FoIConfig.for_model``)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def add_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (the variant goes before the last suffix, as diffusers)."""
    if not variant:
        return filename
    stem, suffix = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _hub_patterns(subfolder: str, weights_name: str | None, variant: str | None) -> list[str]:
    prefix = f"{subfolder}/" if subfolder else ""
    if weights_name is None:  # a tokenizer: every file of the folder
        return [f"{prefix}*", "model_index.json"]
    stem = add_variant(weights_name, variant).rsplit(".", 1)[0]
    return [f"{prefix}*.json", f"{prefix}{stem}.safetensors", f"{prefix}{stem}-*-of-*.safetensors", "model_index.json"]


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    subfolder: str,
    *,
    weights_name: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
) -> Path:
    """The local folder of one component (``subfolder`` of a pipeline folder or hub repo).

    A local folder is used as it is; a string of the form ``owner/name`` that is not a local folder is a hub repo
    id, downloaded (only this component's files) or taken from the cache. Raises ``CheckpointError``.
    """
    root = _root(path_or_repo_id, _hub_patterns(subfolder, weights_name, variant), revision)
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise CheckpointError(f"{root} has no {subfolder!r} folder")
    return folder


def optional_file(path_or_repo_id: str | os.PathLike, filename: str, *, revision: str | None = None) -> Path | None:
    """A top-level file of a model folder or hub repo that it need not have (``FOI_CONFIG``), or ``None`` where it
    lacks it (a single-file checkpoint lacks every such file). A hub repo id downloads only that file (or takes it
    from the cache); an unreachable hub is ``CheckpointError`` as for the components."""
    if Path(path_or_repo_id).expanduser().is_file():
        return None
    root = _root(path_or_repo_id, [filename], revision)
    return root / filename if (root / filename).is_file() else None


def _root(path_or_repo_id: str | os.PathLike, allow_patterns: list[str], revision: str | None) -> Path:
    """A local folder as it is, or a hub repo id's snapshot of the files ``allow_patterns`` match (downloaded or
    from the cache); ``CheckpointError`` for a file or a path that is neither."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if isinstance(path_or_repo_id, str) and _REPO_ID.match(path_or_repo_id) and not path.exists():
        return _download(path_or_repo_id, allow_patterns, revision)
    if path.exists():
        raise CheckpointError(f"{path} is a file, not a diffusers-layout folder")
    raise CheckpointError(f"no such folder: {path} (nor is it a hub repo id of the form owner/name)")


def _download(repo_id: str, allow_patterns: list[str], revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache and {why}: "
            "download it once with network access, or pass a local folder"
        ) from error
    except RevisionNotFoundError as error:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}") from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(f"no hub repo {repo_id!r} (or it is private and no token is set)") from error


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def read_safetensors(folder: Path, weights_name: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component, as float32 NumPy arrays keyed by PyTorch name.

    Reads ``weights_name`` (with ``variant`` inserted, e.g. ``.fp16``) or its sharded form (an
    ``.safetensors.index.json`` naming the shards).
    """
    single = folder / add_variant(weights_name, variant)
    index = folder / add_variant(f"{weights_name}.index.json", variant)
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_config(folder, index.name).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {missing}")
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors", ".ckpt", ".pt"))
        hint = f"; the folder has {others}" if others else ""
        if any(name.endswith((".bin", ".ckpt", ".pt")) for name in others):
            hint += " (PyTorch pickles are not read: save the model again with safe_serialization=True)"
        raise CheckpointError(f"missing weights: neither {single.name} nor {index.name} in {folder}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="flax") as handle:
                for key in handle.keys():
                    tensors[key] = np.asarray(handle.get_tensor(key), dtype=np.float32)
        except Exception as error:  # safetensors raises its own and OS errors for truncated or foreign files
            raise CheckpointError(f"cannot read {file}: {error}") from error
    return tensors
