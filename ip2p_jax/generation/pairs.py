"""InstructPix2Pix's training data (paper 3.1.2): caption triples -> filtered Prompt-to-Prompt image pairs.

For each triple ``{"input", "edit", "output"}`` (input caption, instruction, edited caption) of a JSONL file, ``N``
candidate pairs are generated with Stable Diffusion and Prompt-to-Prompt (``text_to_image``), each with its own
seed, shared-attention fraction ``p ~ U(0.1, 0.9)`` and guidance scale ``~ U(7.5, 15)`` (the reference's
``generate_img_dataset.py``), batched over the device mesh across triples. Each pair is scored with CLIP as the
reference's ``ClipSimilarity`` does (``clip_metrics.edit_similarities`` on ``clip_preprocess.ip2p_pixel_values``) and
kept when

    cos(image_0, input caption) >= 0.2 and cos(image_1, output caption) >= 0.2     (image-caption)
    directional similarity >= 0.2 and cos(image_0, image_1) >= 0.7                 (change, consistency)

and among the best ``max_kept`` (4) of its triple by directional similarity. The output is the released data
set's layout, which ``ip2p_jax.data.edit_datasets``' ``ip2p_original`` builder reads::

    OUT/seeds.json                     [[NAME, [seed, ...]], ...] for every triple that kept a pair, by name
    OUT/NAME/prompt.json               {"edit", "input", "output"}
    OUT/NAME/{seed}_0.jpg, {seed}_1.jpg    input and edited image (JPEG, quality 100)
    OUT/NAME/metadata.jsonl            one line per kept seed: p2p_threshold, cfg_scale, the four CLIP scores
    OUT/NAME/scores.jsonl              the same for every candidate, with "kept"
    OUT/NAME/candidates/{seed}_0.png, {seed}_1.png   every candidate's pictures, with ``save_candidates`` only
    OUT/generation.json                the settings that decide the pictures

``NAME`` is the triple's 0-based line number, 7 digits (the reference's). ``metadata.jsonl`` is written last (an
atomic rename): a folder that has it is finished, and a rerun skips it. A seed gives a candidate's noise, ``p``
and guidance scale, so a rerun produces the same pairs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.clip_preprocess import ip2p_pixel_values
from ip2p_jax.evaluation.clip_metrics import SCORE_NAMES, edit_scores
from ip2p_jax.generation.candidates import (
    Candidate,
    FilterThresholds,
    candidate_seeds,
    make_candidate,
    rank_key,
    select,
)
from ip2p_jax.generation.layout import (
    RESULT_SETTINGS,
    check_settings,
    is_finished,
    write_candidate,
    write_seeds_json,
    write_triple,
)
from ip2p_jax.generation.prompt_to_prompt import AlignmentError, TokenAlignment, align_prompts
from ip2p_jax.generation.text_to_image import (
    PromptToPromptInputs,
    PromptToPromptSettings,
    TextToImageSettings,
    make_prompt_to_prompt_sampler,
)
from ip2p_jax.generation.triples import Triple, TripleError, read_triples
from ip2p_jax.models.clip import CLIPModel
from ip2p_jax.models.stack import ModelStack
from ip2p_jax.parallel import batch_sharded, data_mesh, pad_batch, padded_size, replicated
from ip2p_jax.random_models import tiny_clip, tiny_text_to_image
from ip2p_jax.tokenizer import tokenize


@dataclasses.dataclass
class ClipScorer:
    """A CLIP model for the filter: module, params, tokenizer."""

    module: CLIPModel
    params: dict
    tokenizer: Any


def load_models(config, workdir: Path) -> tuple[ModelStack, ClipScorer]:
    """The config's text-to-image stack and CLIP: diffusers / transformers folders or hub ids, or ``"tiny"`` for
    random ones built in code (their vocabulary files go to ``workdir``)."""
    from ip2p_jax.schedulers import Scheduler
    from ip2p_jax.weights import load_clip, load_stack, load_tokenizer

    def text_to_image_unet(unet, params):
        if unet.config.in_channels != 4:
            raise ValueError(
                f"{config.model}: data generation needs a text-to-image UNet (4 input channels), this one has "
                f"{unet.config.in_channels}"
            )
        return unet, params

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]
    if config.model == "tiny":
        models = tiny_text_to_image(workdir / "tiny-vocab", config.seed, in_channels=4, dtype=dtype)
        models.scheduler = Scheduler(config.scheduler, models.scheduler.config)
    else:
        models = load_stack(config.model, dtype=dtype, scheduler_kind=config.scheduler, prepare_unet=text_to_image_unet)
    if config.clip == "tiny":
        clip = ClipScorer(*tiny_clip(workdir / "tiny-clip-vocab", config.seed + 1))
    else:
        module, params = load_clip(config.clip)
        clip = ClipScorer(module, params, load_tokenizer(config.clip, subfolder=""))
    return models, clip


@dataclasses.dataclass
class TripleWork:
    """A triple in flight: its encodings, alignment, candidates, and how many are still to be scored."""

    triple: Triple
    context: jax.Array  # (2, 77, D)
    clip_text: jax.Array  # (2, P)
    alignment: TokenAlignment
    candidates: list[Candidate]
    pending: int


class PairGenerator:
    """The jitted, sharded pieces: prompt encoding, the P2P sampler, decoding and CLIP scoring.

    Args:
      models, clip: from ``load_models``.
      config: the generation config (``configs/generate_data.py``).
      mesh: a ``data`` mesh (default: this process's devices).
      progress: optional host callback given the steps done in the current batch.
    """

    def __init__(self, models: ModelStack, clip: ClipScorer, config, mesh=None, progress=None):
        self.models, self.clip, self.config = models, clip, config
        self.mesh = data_mesh(jax.local_devices()) if mesh is None else mesh
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        if config.resolution % factor:
            raise ValueError(f"resolution {config.resolution} is not a multiple of the VAE's factor {factor}")
        size = config.resolution // factor
        self.settings = TextToImageSettings(
            scheduler=models.scheduler,
            num_inference_steps=config.steps,
            latent_size=(size, size),
            latent_channels=models.unet.config.out_channels,
            guidance=True,
        )
        p2p = PromptToPromptSettings(
            cross_attention=config.cross_attention,
            self_attention=config.self_attention,
            self_attention_max_size=config.self_attention_max_size or None,
        )
        unet = models.unet
        self.sampler = make_prompt_to_prompt_sampler(
            lambda p, x, t, c, control: unet.apply({"params": p}, x, t, c, control),
            self.settings,
            p2p,
            self.mesh,
            progress,
        )
        self.params = jax.device_put(models.params, replicated(self.mesh))
        self.clip_params = jax.device_put(clip.params, replicated(self.mesh))
        text_encoder, vae, clip_module = models.text_encoder, models.vae, clip.module
        self._encode = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids))
        self._clip_text = jax.jit(
            lambda p, ids: clip_module.apply({"params": p}, ids, method=CLIPModel.get_text_features)
        )
        clip_size = clip.module.config.vision.image_size

        def decode_and_score(vae_params, clip_params, latents_b2hwc, clip_text_b2p):
            """Scaled latents of both images -> uint8 images ``(B, 2, H, W, 3)`` and the four CLIP scores ``(B,)``."""
            z = latents_b2hwc.reshape(-1, *latents_b2hwc.shape[2:]) / vae.config.scaling_factor
            pixels = vae.apply({"params": vae_params}, z, method="decode").astype(jnp.float32)
            images = jnp.clip(pixels / 2 + 0.5, 0.0, 1.0)  # scored as floats, as the reference does
            embeds = clip_module.apply(
                {"params": clip_params}, ip2p_pixel_values(images, clip_size), method=CLIPModel.get_image_features
            ).reshape(latents_b2hwc.shape[0], 2, -1)
            image_0, image_1, text_0, text_1 = embeds[:, 0], embeds[:, 1], clip_text_b2p[:, 0], clip_text_b2p[:, 1]
            scores = edit_scores(image_0, image_1, text_0, text_1)
            uint8 = jnp.round(images * 255).astype(jnp.uint8)
            return uint8.reshape(*latents_b2hwc.shape[:2], *uint8.shape[1:]), scores

        self._decode_and_score = jax.jit(decode_and_score)
        self.null_context = self._encode(self.params["text_encoder"], tokenize(models.tokenizer, [""]))[0]

    def prepare(self, triple: Triple) -> tuple[jax.Array, jax.Array, TokenAlignment]:
        """A triple's SD encodings ``(2, 77, D)``, CLIP text embeddings ``(2, P)`` and token alignment; raises
        ``TripleError`` for captions over 77 tokens or that do not align as configured."""
        try:
            alignment = align_prompts(self.models.tokenizer, triple.input, triple.output, self.config.alignment)
        except AlignmentError as error:
            raise TripleError(str(error)) from error
        captions = [triple.input, triple.output]
        context = self._encode(self.params["text_encoder"], tokenize(self.models.tokenizer, captions))
        clip_text = self._clip_text(self.clip_params, tokenize(self.clip.tokenizer, captions))
        return context, clip_text, alignment

    def run_batch(self, items: Sequence[tuple[TripleWork, Candidate]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Generates and scores one batch of candidates (padded to the mesh; padding dropped): uint8 images
        ``(n, 2, H, W, 3)`` and scores ``{name: (n,)}``."""
        n = len(items)
        size = padded_size(max(n, self.config.batch_size), self.mesh)
        pairs = [work for work, _ in items]
        candidates = [candidate for _, candidate in items]
        inputs = PromptToPromptInputs(
            context=jnp.stack([w.context for w in pairs]),
            null_context=jnp.broadcast_to(self.null_context, (n, *self.null_context.shape)),
            keys=jax.vmap(jax.random.key)(np.asarray([c.seed for c in candidates], np.uint32)),
            guidance_scale=jnp.asarray([c.cfg_scale for c in candidates], jnp.float32),
            p=jnp.asarray([c.p2p_threshold for c in candidates], jnp.float32),
            mapper=jnp.asarray(np.stack([w.alignment.mapper for w in pairs])),
            alphas=jnp.asarray(np.stack([w.alignment.alphas for w in pairs])),
        )
        sharding = batch_sharded(self.mesh)
        inputs = jax.tree.map(lambda x: jax.device_put(pad_batch(x, size), sharding), inputs)
        clip_text = jax.device_put(pad_batch(jnp.stack([w.clip_text for w in pairs]), size), sharding)
        latents, _ = self.sampler(self.params["unet"], inputs)
        images, scores = self._decode_and_score(self.params["vae"], self.clip_params, latents, clip_text)
        return np.asarray(images)[:n], {k: np.asarray(v)[:n] for k, v in scores.items()}


def thresholds_of(config) -> FilterThresholds:
    return FilterThresholds(
        text_image=config.clip_threshold,
        directional=config.clip_dir_threshold,
        image=config.clip_img_threshold,
        max_kept=config.max_kept,
    )


def _batches(works: Iterator[TripleWork], batch_size: int) -> Iterator[list[tuple[TripleWork, Candidate]]]:
    batch: list[tuple[TripleWork, Candidate]] = []
    for work in works:
        for candidate in work.candidates:
            batch.append((work, candidate))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


@dataclasses.dataclass
class GenerationSummary:
    """What a run did.

    Attributes:
      finished: triples generated by this run.
      skipped_finished: triples already finished by an earlier run.
      bad: ``(line number, reason)`` of the triples that could not be generated.
      kept: pairs kept by this run.
      listed: triples in ``seeds.json`` after the run.
    """

    finished: int = 0
    skipped_finished: int = 0
    bad: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    kept: int = 0
    listed: int = 0


def generate_dataset(
    config,
    out: str | os.PathLike,
    *,
    mesh=None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> GenerationSummary:
    """Generates the data set of ``config.triples`` into ``out`` (see the module docstring); resumable.

    Bad triples are reported through ``report`` (default: a line on stderr), as ``FILE:LINE: skipped: reason``,
    when found, and skipped; the rest still run. With several processes each takes every ``process_count``-th
    triple on its own devices, and process 0 writes ``seeds.json`` once all are done.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {key: config[key] for key in RESULT_SETTINGS})
    triples, bad = read_triples(config.triples)
    summary = GenerationSummary()

    def skip(line: int, reason: str) -> None:
        summary.bad.append((line, reason))
        message = f"{config.triples}:{line}: skipped: {reason}"
        if report is not None:
            report(message)
        else:
            tqdm.write(message, file=sys.stderr)

    for line, reason in bad:
        skip(line, reason)
    index, count = jax.process_index(), jax.process_count()
    mine = [t for t in triples if t.index % count == index]
    todo = [t for t in mine if not is_finished(out, t)]
    summary.skipped_finished = len(mine) - len(todo)
    thresholds = thresholds_of(config)
    steps_bar = tqdm(total=config.steps, desc="steps", unit="step", leave=False, disable=not progress, position=1)

    def on_step(done):
        steps_bar.n = int(done)
        steps_bar.refresh()

    with tempfile.TemporaryDirectory() as workdir:
        models, clip = load_models(config, Path(workdir))
        generator = PairGenerator(models, clip, config, mesh, on_step if progress else None)
    pairs_bar = tqdm(
        total=len(todo) * config.samples_per_triple, desc="pairs", unit="pair", disable=not progress, position=0
    )

    def works() -> Iterator[TripleWork]:
        for triple in todo:
            try:
                context, clip_text, alignment = generator.prepare(triple)
            except TripleError as error:
                skip(triple.index + 1, str(error))
                pairs_bar.total -= config.samples_per_triple
                continue
            seeds = candidate_seeds(config.seed, triple.index, config.samples_per_triple)
            candidates = [
                make_candidate(s, (config.p2p_min, config.p2p_max), (config.cfg_min, config.cfg_max)) for s in seeds
            ]
            yield TripleWork(triple, context, clip_text, alignment, candidates, len(candidates))

    try:
        for batch in _batches(works(), config.batch_size):
            steps_bar.reset()
            images, scores = generator.run_batch(batch)
            for row, (work, candidate) in enumerate(batch):
                candidate.scores = {name: float(scores[name][row]) for name in SCORE_NAMES}
                if config.save_candidates:
                    write_candidate(out, work.triple, candidate, images[row])
                # Only the candidates that can still be kept hold on to their images: at most max_kept per triple.
                if thresholds.passes(candidate.scores):
                    candidate.images = images[row]
                    holding = sorted((c for c in work.candidates if c.images is not None), key=rank_key, reverse=True)
                    for dropped in holding[thresholds.max_kept :]:
                        dropped.images = None
                work.pending -= 1
                if work.pending == 0:
                    kept = select(work.candidates, thresholds)
                    write_triple(out, work.triple, work.candidates, kept, config.jpeg_quality)
                    summary.finished += 1
                    summary.kept += len(kept)
                    work.candidates = []
            pairs_bar.update(len(batch))
            pairs_bar.set_postfix(triples=summary.finished, kept=summary.kept)
    finally:
        pairs_bar.close()
        steps_bar.close()
        if count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("data generation done")
        if index == 0:
            summary.listed = write_seeds_json(out)
    return summary
