"""Training batches from the editing data sets: the reference's augmentation, per-host shards, a reproducible
stream that resumes at any position.

Each example, as the reference's ``EditDataset``: both images resized to ``s x s`` with ``s`` uniform in
``[resize_min, resize_max]`` (Lanczos, as the reference's PIL resize), the same random ``crop x crop`` window cut
from both, both flipped left-right with probability ``flip_prob``, pixels scaled to [-1, 1]. The randomness of
element ``n`` of a host's stream is a pure function of ``(seed, n, host)``, and the shuffle is seeded, so the stream
is a pure function of the seed: resuming at batch ``p`` skips ``p`` batches of encoded records without decoding them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from ip2p_jax.data.hard_negatives import HARD_NEGATIVE_KINDS

SYNTHETIC = "synthetic"
CAPTIONED_SCENES = "shapes_captions"  # the endless stream of captioned scenes (``captioned_scenes.py``)
STREAMS = (SYNTHETIC, CAPTIONED_SCENES)  # generated as they are read: no builder
BUILDERS = ("ip2p_original", "ip2p_manifest", "shapes_edit")  # a name may carry a config: "shapes_edit/small"
PROCEDURAL = ("shapes_edit",)  # built from nothing (no manual dir)
TRAINING_FEATURES = ("input_image", "edited_image", "instruction")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The reference's training augmentation (``configs/train.yaml`` of InstructPix2Pix, resize range widened as
    our issue asks)."""

    resize_min: int = 256
    resize_max: int = 288
    crop: int = 256
    flip_prob: float = 0.5

    def __post_init__(self):
        if not self.crop <= self.resize_min <= self.resize_max:
            raise ValueError(
                f"need crop <= resize_min <= resize_max, got {self.crop}, {self.resize_min}, {self.resize_max}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")


def augment_pair(input_image, edited_image, seed, augmentation: Augmentation):
    """One example's augmentation in TensorFlow: two ``(H, W, 3)`` uint8 images and a ``(2,)`` int64 stateless
    seed -> two ``(crop, crop, 3)`` float32 images in [-1, 1]."""
    import tensorflow as tf

    size_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    a = augmentation
    size = tf.random.stateless_uniform((), size_seed, a.resize_min, a.resize_max + 1, dtype=tf.int32)
    pair = tf.cast(tf.stack([input_image, edited_image]), tf.float32)
    pair = tf.image.resize(pair, (size, size), method="lanczos3", antialias=True)
    pair = tf.clip_by_value(pair, 0.0, 255.0)  # Lanczos overshoots; PIL clips to uint8
    top, left = tf.unstack(tf.random.stateless_uniform((2,), crop_seed, 0, size - a.crop + 1, dtype=tf.int32))
    pair = pair[:, top : top + a.crop, left : left + a.crop, :]
    flip = tf.random.stateless_uniform((), flip_seed) < a.flip_prob
    pair = tf.cond(flip, lambda: tf.reverse(pair, axis=[2]), lambda: pair)
    pair = pair / 127.5 - 1.0
    return pair[0], pair[1]


def tfds_batches(
    builder,
    split: str,
    *,
    batch_size: int,
    seed: int,
    augmentation: Augmentation,
    position: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    shuffle_buffer: int = 1000,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches from a prepared TFDS builder, forever: ``input_image`` / ``edited_image``
    ``(batch_size, crop, crop, 3)`` float32 in [-1, 1] and ``instruction`` ``(batch_size,)`` str.

    ``batch_size`` is the host's share of the global batch. Each host reads its own contiguous part of ``split``
    (``tfds.even_splits``), so the hosts together see every example once per epoch. ``position`` is the number of
    batches already consumed (a resumed run's data position).
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    host_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    skip = tfds.decode.SkipDecoding()  # shuffle encoded bytes; decode after skipping
    options = tf.data.Options()
    options.deterministic = True
    decoders = tfds.decode.PartialDecoding(  # a data set's other features (masks, ...) are never decoded
        {name: builder.info.features[name] for name in TRAINING_FEATURES},
        decoders={"input_image": skip, "edited_image": skip},
    )
    dataset = builder.as_dataset(
        split=host_split,
        shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=seed, options=options),
        decoders=decoders,
    )
    dataset = dataset.repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
    dataset = dataset.skip(position * batch_size)

    def prepare(index, example):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), index * process_count + process_index])
        decode = lambda data: tf.io.decode_image(data, channels=3, expand_animations=False)  # noqa: E731
        input_image, edited_image = augment_pair(
            decode(example["input_image"]), decode(example["edited_image"]), seed_pair, augmentation
        )
        return {"input_image": input_image, "edited_image": edited_image, "instruction": example["instruction"]}

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(2)
    for batch in dataset.as_numpy_iterator():
        batch["instruction"] = np.array([text.decode("utf-8") for text in batch["instruction"]])
        yield batch


def prepared_builder(name: str, data_dir: str | None, manual_dir: str | None, *, prepare: bool):
    """The TFDS builder ``name`` (one of ``BUILDERS``, with an optional ``/config``), built first if ``prepare`` and
    it has not been built yet (from ``manual_dir``, except procedural data sets); raises ``FileNotFoundError`` when
    it is neither built nor buildable."""
    import tensorflow_datasets as tfds

    from ip2p_jax.data import edit_datasets, shapes_edit  # noqa: F401  (registers the builders)

    base = name.split("/")[0]
    if base not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}: use one of {STREAMS} or {BUILDERS}")
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not manual_dir and base not in PROCEDURAL:
            raise FileNotFoundError(f"{name} is not built in {builder.data_dir}; give manual_dir to build it")
        if prepare:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
            builder.download_and_prepare(download_config=config)
    return builder


def builder_from_config(config, main_process: bool = True):
    """The prepared TFDS builder of a training config's ``data`` (``None`` for the generated streams). Process 0
    builds it if needed (from ``manual_dir`` unless procedural) while the other processes wait."""
    if config.data.name in STREAMS:
        return None
    from jax.experimental import multihost_utils

    data_dir, manual_dir = config.data.data_dir or None, config.data.manual_dir or None
    builder = prepared_builder(config.data.name, data_dir, manual_dir, prepare=main_process)
    multihost_utils.sync_global_devices("data set prepared")
    return builder if main_process else prepared_builder(config.data.name, data_dir, manual_dir, prepare=False)


def batches_from_config(config, builder, micro_batch: int, position: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch of ``micro_batch`` pairs from data position ``position`` on, as a
    training config describes them: numpy dicts with ``input_image``, ``edited_image`` ``(b, S, S, 3)`` float32 in
    [-1, 1] and ``instruction`` ``(b,)`` str, ``b = micro_batch / process_count`` (for ``shapes_captions``, the
    rows of ``captioned_scenes.batches``)."""
    import itertools

    import jax

    from ip2p_jax.data.synthetic import process_rows, synthetic_batch

    index, count = jax.process_index(), jax.process_count()
    if config.data.name == CAPTIONED_SCENES:
        from ip2p_jax.data import captioned_scenes

        yield from captioned_scenes.batches(
            config.seed,
            micro_batch,
            position=position,
            process_index=index,
            process_count=count,
            style=config.data.get("caption_style", "full"),
            hard_negative_count=config.data.get("hard_negatives", 0),  # the CLIP's (training/clip.py)
            hard_negative_kinds=tuple(config.data.get("hard_negative_kinds", HARD_NEGATIVE_KINDS)),
        )
    if builder is None:
        for step in itertools.count(position):
            yield process_rows(synthetic_batch(config.seed, step, micro_batch, config.data.resolution), index, count)
    augmentation = Augmentation(
        config.data.resize_min, config.data.resize_max, config.data.resolution, config.data.flip_prob
    )
    yield from tfds_batches(
        builder,
        config.data.split,
        batch_size=micro_batch // count,
        seed=config.seed,
        augmentation=augmentation,
        position=position,
        process_index=index,
        process_count=count,
        shuffle_buffer=config.data.shuffle_buffer,
    )
