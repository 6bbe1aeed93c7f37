"""Pictures of edits: masks and word heatmaps over the pictures they belong to, and the grids that show them.

Small pictures (the shipped 64 px model's) are enlarged by a whole factor with nearest neighbour to about
``SMALL_TILE`` px, so that every pixel stays visible as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SMALL_TILE = 256
LABEL_WIDTH = 96  # px of the word column of an attention grid


def mask_overlay(image: Image.Image, mask_hw) -> Image.Image:
    """The image with the mask's region tinted red and the rest dimmed (mask ``(H, W)`` of 0 / 1 at the image's
    size)."""
    # float64: each pixel rounds from its exact blend (float32's rounding moves some by a level)
    pixels = np.asarray(image.convert("RGB"), np.float64)
    mask = np.asarray(mask_hw, np.float64)[..., None]
    red = np.array([255.0, 40.0, 40.0])
    tinted = mask * (0.5 * pixels + 0.5 * red) + (1 - mask) * 0.35 * pixels
    return Image.fromarray(tinted.round().astype(np.uint8))


def heat_overlay(image: Image.Image, heat_hw, opacity: float = 0.55) -> Image.Image:
    """The image under a heatmap: ``heat_hw`` (any size, e.g. a 16 x 16 attention map) upsampled bilinearly to the
    image's size, scaled to [0, 1] by its own minimum and maximum, coloured with matplotlib's ``jet`` (blue low,
    red high) and blended at ``opacity``."""
    from matplotlib import colormaps

    heat = np.asarray(heat_hw, np.float32)
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    heat = np.asarray(Image.fromarray(heat).resize(image.size, Image.BILINEAR), np.float32).clip(0, 1)
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    pixels = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray(((1 - opacity) * pixels + opacity * colours).round().astype(np.uint8))


def _enlarged(tiles: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    factor = max(1, SMALL_TILE // max(size))
    return [tile.resize((size[0] * factor, size[1] * factor), Image.NEAREST) for tile in tiles]


def row_grid(tiles: Sequence[Image.Image]) -> Image.Image:
    """Pictures of one size side by side, enlarged when small."""
    tiles = _enlarged(tiles, tiles[-1].size)
    width, height = tiles[0].size
    grid = Image.new("RGB", (width * len(tiles), height))
    for position, tile in enumerate(tiles):
        grid.paste(tile, (position * width, 0))
    return grid


def grid(rows: Sequence[Sequence[Image.Image]], enlarge: int = 1) -> Image.Image:
    """Rows of tiles of one size, top to bottom, each tile enlarged ``enlarge`` times by nearest neighbour; a short
    row is padded white on the right (the grids of the scripts: ``evaluate.py``'s examples, ``train.py``'s samples,
    the tools' pictures)."""
    width, height = tiles_size = rows[0][0].size
    columns = max(len(row) for row in rows)
    picture = Image.new("RGB", (columns * width, len(rows) * height), "white")
    for y, row in enumerate(rows):
        for x, tile in enumerate(row):
            if tile.size != tiles_size:
                raise ValueError(f"grid tiles must all be {width}x{height}, got {tile.width}x{tile.height}")
            picture.paste(tile.convert("RGB"), (x * width, y * height))
    if enlarge == 1:
        return picture
    return picture.resize((picture.width * enlarge, picture.height * enlarge), Image.NEAREST)


def compare_grid(image: Image.Image, masks_khw, plain: Image.Image, edited: Image.Image) -> Image.Image:
    """input | each mask over the input | IP2P | FoI, in one row."""
    base = image.resize(edited.size, Image.LANCZOS) if image.size != edited.size else image
    return row_grid([base] + [mask_overlay(base, mask) for mask in masks_khw] + [plain, edited])


def attention_grid(
    image: Image.Image,
    edited: Image.Image,
    words: Sequence[str],
    maps_whw,
    masks_whw=None,
) -> Image.Image:
    """One row per word: the word | its map over the input | its map over the edit | (FoI) its mask over the input.

    Args:
      maps_whw: ``(W, h, w)`` attention maps (any resolution; each is scaled by its own range).
      masks_whw: ``(W, H, W)`` masks at the edit's size, or ``None``.
    """
    base = image.resize(edited.size, Image.LANCZOS) if image.size != edited.size else image
    rows = []
    for index, heat in enumerate(np.asarray(maps_whw)):
        tiles = [heat_overlay(base, heat), heat_overlay(edited, heat)]
        if masks_whw is not None:
            tiles.append(mask_overlay(base, masks_whw[index]))
        rows.append(row_grid(tiles))
    width, height = rows[0].size
    grid = Image.new("RGB", (LABEL_WIDTH + width, height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (word, row) in enumerate(zip(words, rows, strict=True)):
        grid.paste(row, (LABEL_WIDTH, index * height))
        draw.text((6, index * height + height // 2 - 6), word, fill="black")
    return grid
