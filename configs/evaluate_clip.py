"""The CLIP image similarity / directional similarity trade-off of an editing model (IP2P's figure 8).

    python evaluate_clip.py --config configs/evaluate_clip.py --config.data=DATA --out RESULTS
    python evaluate_clip.py --config configs/evaluate_clip.py:tiny --config.data=/tmp/tiny-data --out /tmp/curve
    python evaluate_clip.py --config configs/evaluate_clip.py:shapes --out runs/clip-curve   # ShapesEdit

``data`` is a folder in the released layout (``generate_data.py`` writes one), the edits from its test split, or a
ShapesEdit TFDS name (``shapes_edit``) whose caption triples give the captions.
The default is the reference's (``metrics/compute_metrics.py``): the released checkpoint, text guidance 7.5, image
guidance 1.0 to 2.2, 100 steps at 512 px, CLIP ViT-L/14; the paper averages 2000 edits.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "timbrooks/instruct-pix2pix"  # an IP2P diffusers folder / hub id, or "tiny"
    config.clip = "openai/clip-vit-large-patch14"  # a transformers CLIPModel folder / hub id, or "tiny"
    config.data = ""  # a released-layout folder (seeds.json, NAME/prompt.json with both captions, NAME/{seed}_0.jpg)
    config.split = "test"
    config.num_samples = 2000  # at most this many edits (one per prompt, its first seed)
    config.resolution = 512  # input images are resized to this square
    config.steps = 100
    config.scheduler = ""  # "" for the checkpoint's own, or one of schedulers.SCHEDULERS
    config.guidance_scale = 7.5
    config.image_guidance_scales = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)
    config.seed = 0
    config.batch_size = 8  # edits per call over all devices
    config.dtype = "float32"
    config.title = ""  # the plot's title; default: the model's name
    if variant == "tiny":
        # A random IP2P model and CLIP built in code: the whole path in seconds, on a tiny generate_data.py run.
        config.model = "tiny"
        config.clip = "tiny"
        config.num_samples = 4
        config.resolution = 32
        config.steps = 4
        config.image_guidance_scales = (1.0, 1.6, 2.2)
        config.batch_size = 4
    elif variant == "shapes":
        # The shipped ShapesEdit editor scored by the lineage's CLIP on ShapesEdit's caption triples (test_single).
        config.model = "models/shapes-ip2p"
        config.clip = "models/shapes-clip"
        config.data = "shapes_edit"  # a TFDS name: the split's pictures and captions (built on first use)
        config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
        config.split = "test_single"
        config.num_samples = 200
        config.resolution = 64
        config.steps = 50
        config.batch_size = 25
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (the default, 'tiny' or 'shapes')")
    config.lock()
    return config
