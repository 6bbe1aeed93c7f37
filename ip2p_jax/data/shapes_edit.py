"""The ``shapes_edit`` TFDS builder: ShapesEdit (``shapes.py``) as a data set, procedural and deterministic.

Splits ``train`` (single instructions, a ``leak_fraction`` of leaky targets, no held-out combination),
``test_single`` and ``test_multi`` (2 or 3 instructions applied together). Example ``i`` of a split is a pure
function of ``(seed, split, i)``: the same config builds the same bytes on any machine, no download, no manual dir.

    import ip2p_jax.data.shapes_edit  # registers the builder
    builder = tfds.builder("shapes_edit", data_dir=DATA)              # "shapes_edit/small" for tests
    builder.download_and_prepare()

Features: ``input_image``, ``edited_image`` (64 x 64 x 3 PNG), ``instruction`` (the composite prompt),
``input_caption`` and ``edited_caption`` (the caption triple with the instruction), and for
judging edits: ``instructions`` / ``keywords`` / ``kinds`` / ``values`` (one per instruction), ``regions``
``(K, 64, 64)`` and ``mask`` ``(64, 64)`` bool ground truth of what may change, ``object_masks`` ``(N, 64, 64)`` with
``object_shapes`` / ``object_colours``, ``background``, ``leak``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ip2p_jax.data import shapes

SPLIT_SEEDS = {"train": 0, "test_single": 1, "test_multi": 2}
CAPTION_STREAM = 1  # captions draw from their own generator, so the examples' draws are those of version 1.0.0


@dataclasses.dataclass
class ShapesEditConfig(tfds.core.BuilderConfig):
    """Sizes, the share of leaky training targets and the seed."""

    num_train: int = 20_000
    num_test: int = 200
    leak_fraction: float = 0.3
    seed: int = 0


def example_features(example: shapes.Example, captions: tuple[str, str]) -> dict:
    """A ``shapes.Example`` and its ``(input caption, edited caption)`` as the builder's feature dict."""
    scene = example.scene
    return {
        "input_image": example.input_image,
        "edited_image": example.edited_image,
        "instruction": example.instruction,
        "input_caption": captions[0],
        "edited_caption": captions[1],
        "instructions": [edit.instruction for edit in example.edits],
        "keywords": [edit.keyword for edit in example.edits],
        "kinds": [edit.kind for edit in example.edits],
        "values": [edit.value for edit in example.edits],
        "regions": example.regions,
        "mask": example.mask,
        "object_masks": example.object_masks,
        "object_shapes": [obj.shape for obj in scene.objects],
        "object_colours": [obj.colour for obj in scene.objects],
        "background": scene.background,
        "leak": example.leak,
    }


def draw(config: ShapesEditConfig, split: str, index: int) -> shapes.Example:
    """Example ``index`` of ``split`` under ``config``."""
    rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], index])
    return shapes.draw_example(rng, split, config.leak_fraction)


def draw_captions(config: ShapesEditConfig, split: str, index: int, example: shapes.Example) -> tuple[str, str]:
    """The input and edited captions of example ``index`` of ``split`` (objects in an order of their own draw)."""
    rng = np.random.default_rng([config.seed, SPLIT_SEEDS[split], index, CAPTION_STREAM])
    return shapes.caption_pair(example, rng)


class ShapesEdit(tfds.core.GeneratorBasedBuilder):
    """ShapesEdit: instruction edits of flat-shape scenes with exact masks (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Scenes, edits, regions and object masks.",
        "1.1.0": "Input and edited captions (the paper's caption triples); every example as in 1.0.0.",
    }
    BUILDER_CONFIGS = [
        ShapesEditConfig(name="default", description="20,000 training and 200 + 200 test examples"),
        ShapesEditConfig(name="small", description="for tests", num_train=64, num_test=8),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = shapes.SIZE
        mask = lambda *shape: tfds.features.Tensor(  # noqa: E731
            shape=shape, dtype=np.bool_, encoding=tfds.features.Encoding.ZLIB
        )
        texts = tfds.features.Sequence(tfds.features.Text())
        features = tfds.features.FeaturesDict(
            {
                "input_image": tfds.features.Image(shape=(size, size, 3)),
                "edited_image": tfds.features.Image(shape=(size, size, 3)),
                "instruction": tfds.features.Text(),
                "input_caption": tfds.features.Text(),
                "edited_caption": tfds.features.Text(),
                "instructions": texts,
                "keywords": texts,
                "kinds": texts,
                "values": texts,
                "regions": mask(None, size, size),
                "mask": mask(size, size),
                "object_masks": mask(None, size, size),
                "object_shapes": texts,
                "object_colours": texts,
                "background": tfds.features.Text(),
                "leak": tfds.features.Text(),
            }
        )
        return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "test_single": cfg.num_test, "test_multi": cfg.num_test}
        return {split: self._generate_examples(split, count) for split, count in sizes.items()}

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            example = draw(self.builder_config, split, index)
            yield index, example_features(example, draw_captions(self.builder_config, split, index, example))
