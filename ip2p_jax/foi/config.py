"""Every setting of FoI in one frozen dataclass (paper 5.1's defaults), and a model folder's recommended ones."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from ip2p_jax.weights.files import FOI_CONFIG, optional_file

TEXT_BRANCHES = ("composite", "per_instruction")
MASK_SOURCES = ("attention", "noise_difference")


@dataclasses.dataclass(frozen=True)
class FoIConfig:
    """Every setting of Focus on Your Instruction (``docs/foi.md`` explains each). Defaults: paper 5.1.

    Attributes:
      strength: the edit enters the schedule at ``strength`` (0.8: 80 of 100 steps run).
      gamma: rounds of square + min-max in mask extraction (4.1).
      tau: mask threshold, a value or a ``(low, high)`` range drawn per image from its key (paper: [0.4, 0.7]).
      filter_size, filter_sigma: the Gaussian filter of the keyword maps (4.1).
      mask_downsample: a power of two ``d``; the masks have the size of the UNet's layers ``log2(d)`` levels
        below the latent (16 x 16 for a 64 x 64 latent and ``d = 4``; 19 x 13 for a 75 x 50 one: each level rounds
        up, as the stride-2 convolutions do; ``mask_size``); maps are averaged over every cross-attention layer of
        that size.
      mask_step: which step run records the maps and builds the masks (0 = the first); earlier steps are plain
        IP2P.
      modulation: cross-condition attention modulation on or off (4.2).
      modulation_stop: fraction of the steps run after which modulation stops (1 = never).
      outside_values: outside the mask, the text+image branch combines the image-only probabilities with its own
        values (``"own"``) or with the image-only branch's values (``"image_only"``).
      decoupled_guidance: the masked text term of 4.3 on or off.
      decoupled_fraction: fraction of the steps run that use decoupled guidance (0.75).
      text_branches: ``"composite"`` (the paper: one text+image branch for the sub-instructions joined into one
        prompt) or ``"per_instruction"`` (ours, docs/foi.md: each sub-instruction encoded alone in a text+image
        branch of its own, its mask from its own branch's attention, its text term guided inside its own mask).
      mask_source: where the masks come from at the mask step: ``"attention"`` (the paper, 4.1: each keyword's
        cross-attention) or ``"noise_difference"`` (DiffEdit's, the paper's baseline: where the text changes the
        prediction, ``|e(I, T) - e(I, 0)|`` averaged over channels; each sub-instruction's own branch in the
        per-instruction mode, the composite prompt's for all of them otherwise), then the same filter, ``gamma`` and
        ``tau``.
    """

    strength: float = 0.8
    gamma: int = 3
    tau: float | tuple[float, float] = 0.5
    filter_size: int = 3
    filter_sigma: float = 0.5
    mask_downsample: int = 4
    mask_step: int = 0
    modulation: bool = True
    modulation_stop: float = 1.0
    outside_values: str = "own"
    decoupled_guidance: bool = True
    decoupled_fraction: float = 0.75
    text_branches: str = "composite"
    mask_source: str = "attention"

    def __post_init__(self):
        """Checks every setting against its range, so that none can silently switch FoI off (a ``tau`` above 1 gives
        empty masks and an edit that does almost nothing); the errors name the setting and its range. Numbers are
        stored as Python ``int`` / ``float`` (NumPy scalars are accepted), ``tau`` ranges as tuples."""
        real, integer = _check_real, _check_int
        unit = lambda x: 0.0 <= x <= 1.0  # noqa: E731
        settings = dict(
            strength=real("strength", self.strength, "in (0, 1]", lambda x: 0.0 < x <= 1.0),
            gamma=integer("gamma", self.gamma, "an integer >= 0", lambda x: x >= 0),
            tau=_check_tau(self.tau),
            filter_size=integer("filter_size", self.filter_size, "a positive odd integer", lambda x: x > 0 and x % 2),
            filter_sigma=real("filter_sigma", self.filter_sigma, "a finite number > 0", lambda x: x > 0.0),
            mask_downsample=integer(
                "mask_downsample", self.mask_downsample, "a power of two >= 1", lambda x: x >= 1 and not x & (x - 1)
            ),
            mask_step=integer("mask_step", self.mask_step, "an integer >= 0", lambda x: x >= 0),
            modulation_stop=real("modulation_stop", self.modulation_stop, "in [0, 1]", unit),
            decoupled_fraction=real("decoupled_fraction", self.decoupled_fraction, "in [0, 1]", unit),
        )
        for name in ("modulation", "decoupled_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.outside_values not in ("own", "image_only"):
            raise ValueError(f"outside_values must be 'own' or 'image_only', got {self.outside_values!r}")
        if self.text_branches not in TEXT_BRANCHES:
            raise ValueError(f"text_branches must be one of {TEXT_BRANCHES}, got {self.text_branches!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    @property
    def mask_level(self) -> int:
        """The UNet resolution level of the masks: ``log2(mask_downsample)`` (0 at the latent's size)."""
        return self.mask_downsample.bit_length() - 1

    @classmethod
    def for_model(cls, model: str | os.PathLike, *, revision: str | None = None, **overrides) -> FoIConfig:
        """The paper's settings, updated by the model's ``foi_config.json`` where it has one (settings its makers
        chose for its architecture, e.g. the shipped ShapesEdit model's mask resolution), then by ``overrides``.
        ``model`` is a local folder or a hub repo id (``revision``: its revision). Unknown or invalid settings in the
        file are errors that name it (even when overridden)."""
        path = optional_file(model, FOI_CONFIG, revision=revision)
        settings = json.loads(path.read_text()) if path is not None else {}
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"{path}: unknown FoI settings {unknown}")
        try:
            cls(**settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
        return cls(**{**settings, **overrides})


def _is_real(value) -> bool:
    """A finite real number (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_real(name: str, value, expected: str, ok) -> float:
    """``value`` as a ``float``, or a ``ValueError`` naming the setting and its range unless it is a finite real
    number passing ``ok``."""
    if not (_is_real(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _check_int(name: str, value, expected: str, ok) -> int:
    """``value`` as an ``int``, or a ``ValueError`` naming the setting and its range unless it is an integer (not a
    bool) passing ``ok``."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _check_tau(tau) -> float | tuple[float, float]:
    """``tau`` as a ``float`` in [0, 1] or a ``(low, high)`` tuple with ``0 <= low <= high <= 1``."""
    if isinstance(tau, list | tuple):
        if not (len(tau) == 2 and all(map(_is_real, tau)) and 0.0 <= tau[0] <= tau[1] <= 1.0):
            raise ValueError(f"tau must be a (low, high) range with 0 <= low <= high <= 1, got {tau!r}")
        return float(tau[0]), float(tau[1])
    return _check_real(
        "tau", tau, "in [0, 1], or a (low, high) range with 0 <= low <= high <= 1", lambda x: 0 <= x <= 1
    )


def foi_settings() -> ml_collections.ConfigDict:
    """Every ``FoIConfig`` setting, unset, as a script config's ``foi`` group (``--config.foi.tau=0.3``): each is a
    placeholder of its field's type (``tau``, a value or a range, takes any Python literal), so that the fields are
    declared once, here in the dataclass. ``foi_config`` turns the group into a ``FoIConfig``."""
    types = typing.get_type_hints(FoIConfig)
    return ml_collections.ConfigDict(
        {
            field.name: config_dict.placeholder(
                types[field.name] if types[field.name] in (bool, int, float, str) else object
            )
            for field in dataclasses.fields(FoIConfig)
        }
    )


def foi_config(model: str | os.PathLike, settings: Mapping[str, Any]) -> FoIConfig:
    """``FoIConfig.for_model(model)`` with the settings of ``settings`` (a ``foi_settings`` group) that are set."""
    return FoIConfig.for_model(model, **{name: value for name, value in settings.items() if value is not None})
