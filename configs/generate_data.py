"""IP2P's data generation (paper 3.1.2): caption triples -> CLIP-filtered Prompt-to-Prompt pairs.

    python generate_data.py --config configs/generate_data.py --config.triples=TRIPLES.jsonl --out DATA
    python generate_data.py --config configs/generate_data.py:tiny --out /tmp/tiny-data   # random models, seconds

The default is the reference's recipe (``dataset_creation/generate_img_dataset.py``): Stable Diffusion 1.5, 512 px,
100 Euler ancestral steps, 100 candidates per triple with ``p ~ U(0.1, 0.9)`` and guidance ``~ U(7.5, 15)``, CLIP
ViT-L/14 filtering, at most 4 pairs kept per triple.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.triples = ""  # JSONL, one {"input", "edit", "output"} per line
    config.model = "runwayml/stable-diffusion-v1-5"  # a 4-channel SD diffusers folder / hub id, or "tiny"
    config.clip = "openai/clip-vit-large-patch14"  # a transformers CLIPModel folder / hub id, or "tiny"
    config.dtype = "float32"  # compute dtype ("bfloat16" on TPU); params stay float32
    config.resolution = 512
    config.steps = 100
    config.scheduler = "euler_ancestral"  # with the model's noise schedule (schedulers.SCHEDULERS)
    config.samples_per_triple = 100  # candidates generated per triple (the reference's --n-samples)
    config.max_kept = 4  # pairs kept per triple after filtering, best by directional similarity
    config.p2p_min = 0.1  # p ~ U(p2p_min, p2p_max): fraction of the steps that share attention
    config.p2p_max = 0.9
    config.cfg_min = 7.5  # classifier-free guidance scale ~ U(cfg_min, cfg_max)
    config.cfg_max = 15.0
    config.clip_threshold = 0.2  # each image against its caption
    config.clip_dir_threshold = 0.2  # directional similarity
    config.clip_img_threshold = 0.7  # input image against edited image
    # Prompt-to-Prompt: "auto" (a word swap for captions of as many words, else a refinement), "word_swap", "refine".
    config.alignment = "auto"
    config.cross_attention = True  # replace the edited caption's cross-attention maps (P2P; the paper's 3.1.2)
    config.self_attention = True  # inject the input image's self-attention (what the reference's code does)
    config.self_attention_max_size = 0  # inject at layers of at most this many positions; 0: every layer
    config.batch_size = 16  # pairs per sampler call over all local devices (rounded up to a multiple of them)
    config.seed = 0  # with the triple's line number, decides every candidate's seed
    config.jpeg_quality = 100
    config.save_candidates = False  # also write every candidate's pictures to NAME/candidates/ (to judge the filter)
    if variant == "tiny":
        # Random models built in code and the bundled example triples: runs on a laptop CPU in seconds. A random
        # CLIP's scores mean nothing, so the tiny run keeps the best candidates whatever their scores.
        config.triples = "examples/triples_tiny.jsonl"
        config.model = "tiny"
        config.clip = "tiny"
        config.resolution = 32
        config.steps = 10
        config.samples_per_triple = 4
        config.max_kept = 2
        config.clip_threshold = -1.0
        config.clip_dir_threshold = -1.0
        config.clip_img_threshold = -1.0
        config.batch_size = 8
    elif variant == "shapes":
        # The miniature lineage (docs/shapes.md, docs/datagen.md): its text-to-image model and CLIP, 64 px, the
        # triples of tools/shapes_triples.py. Thresholds and guidance re-derived for these models (docs/datagen.md).
        config.triples = "runs/datagen/triples.jsonl"
        config.model = "models/shapes-t2i"
        config.clip = "models/shapes-clip"
        config.resolution = 64
        config.steps = 50
        config.samples_per_triple = 16
        config.cfg_min = 3.0  # 7.5-15 over-saturates this model (docs/datagen.md)
        config.cfg_max = 7.0
        # No thresholds at generation: every candidate is saved, and the filter is applied afterwards with
        # thresholds derived for the small CLIP (tools/judge_generated_pairs.py; docs/datagen.md).
        config.clip_threshold = -1.0
        config.clip_dir_threshold = -1.0
        config.clip_img_threshold = -1.0
        config.batch_size = 32
        config.save_candidates = True
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (the default, 'tiny' or 'shapes')")
    config.lock()
    return config
