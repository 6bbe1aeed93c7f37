"""Candidate pairs and the CLIP filter (paper 3.1.2): each candidate's seed, Prompt-to-Prompt fraction ``p``,
guidance scale and four CLIP scores; the reference's thresholds and the best ``max_kept`` of a triple."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass
class Candidate:
    """One candidate pair of a triple: its seed, ``p``, guidance scale, and (once generated) scores and images.

    Attributes:
      scores: ``clip_metrics.SCORE_NAMES`` -> float.
      images: ``(2, H, W, 3)`` uint8, the input and edited image (dropped once the candidate cannot be kept).
    """

    seed: int
    p2p_threshold: float
    cfg_scale: float
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    images: np.ndarray | None = None

    def record(self, **extra) -> dict:
        return dict(seed=self.seed, p2p_threshold=self.p2p_threshold, cfg_scale=self.cfg_scale, **self.scores, **extra)


def candidate_seeds(base_seed: int, triple_index: int, count: int) -> list[int]:
    """``count`` distinct 32-bit seeds of a triple, a function of ``(base_seed, triple_index)`` only."""
    rng = np.random.default_rng([base_seed, triple_index])
    seeds: dict[int, None] = {}
    while len(seeds) < count:
        seeds.update(dict.fromkeys(int(s) for s in rng.integers(0, 2**32, count - len(seeds), dtype=np.uint64)))
    return list(seeds)


def make_candidate(seed: int, p2p_range: tuple[float, float], cfg_range: tuple[float, float]) -> Candidate:
    """A seed's ``p ~ U(p2p_range)`` and guidance scale ``~ U(cfg_range)`` (drawn from the seed, so reproducible)."""
    p, cfg = np.random.default_rng(seed).random(2)
    return Candidate(
        seed=seed,
        p2p_threshold=float(p2p_range[0] + p * (p2p_range[1] - p2p_range[0])),
        cfg_scale=float(cfg_range[0] + cfg * (cfg_range[1] - cfg_range[0])),
    )


@dataclasses.dataclass(frozen=True)
class FilterThresholds:
    """IP2P's CLIP filter (the reference's defaults).

    Attributes:
      text_image: each image's similarity with its caption must be at least this (``--clip-threshold``).
      directional: the directional similarity must be at least this (``--clip-dir-threshold``).
      image: the two images' similarity must be at least this (``--clip-img-threshold``).
      max_kept: at most this many pairs per triple, the best by directional similarity (``--max-out-samples``).
    """

    text_image: float = 0.2
    directional: float = 0.2
    image: float = 0.7
    max_kept: int = 4

    def passes(self, scores: dict[str, float]) -> bool:
        """Whether a candidate's scores pass every threshold (each ``>=``, as the reference)."""
        return (
            scores["clip_sim_0"] >= self.text_image
            and scores["clip_sim_1"] >= self.text_image
            and scores["clip_sim_dir"] >= self.directional
            and scores["clip_sim_image"] >= self.image
        )


def rank_key(candidate: Candidate) -> tuple[float, int]:
    """Best first when sorted in reverse: directional similarity, then the larger seed (the reference sorts
    ``(clip_sim_dir, seed)`` tuples in reverse)."""
    return candidate.scores["clip_sim_dir"], candidate.seed


def select(candidates: Sequence[Candidate], thresholds: FilterThresholds) -> list[Candidate]:
    """The candidates that pass the thresholds, best first by ``rank_key``, at most ``max_kept``."""
    passing = [c for c in candidates if thresholds.passes(c.scores)]
    return sorted(passing, key=rank_key, reverse=True)[: thresholds.max_kept]
