"""The ShapesEdit InstructPix2Pix model (``models/shapes-ip2p``), the last stage of the miniature lineage
(docs/shapes.md): the text-to-image model of ``configs/shapes_t2i.py`` (continued on varied captions, stage 2b)
fine-tuned on ShapesEdit's edit pairs exactly as the paper fine-tunes Stable Diffusion: its UNet expanded from 4
to 8 input channels (the new channels' weights zero, the bias kept), the VAE and the CLIP text encoder frozen, the
reference's 5 % conditioning dropouts. No grounding objective here: whatever localisation the model keeps, it keeps
from pretraining. The shipped folder's ``foi_config.json`` (gamma 1, tau 0.1) was written after the export, from
``tools/attention_localisation.py --sweep``.

    python train.py --config configs/shapes_ip2p.py --workdir runs/shapes-ip2p
    python export.py --workdir runs/shapes-ip2p --out models/shapes-ip2p

That is stage 3b, from the stage-2b text-to-image folder (``models/shapes-t2i`` of commit e2fad12; add
``--config.model=runs/stage-2b/models/shapes-t2i`` after ``configs/shapes_t2i.py``'s ``git archive`` line). The
shipped folder (stage 3c) continues it for 2,500 steps with v-prediction and zero terminal SNR, the objective that
fixed its weak high-noise denoising (docs/shapes.md):

    python train.py --config configs/shapes_ip2p.py --config.model=models/shapes-ip2p --config.init_from=ip2p \
        --config.objective.prediction_type=v_prediction --config.objective.rescale_betas_zero_snr=True \
        --config.steps=2500 --workdir runs/ip2p-cont-vz

The variant ``regrown`` (issue 31) is the same stage over the regrown text-to-image model (``configs/shapes_t2i.py``
variant ``regrown``, shipped in ``models/shapes-t2i``), which already predicts v with zero terminal SNR, so the
fine-tuning does too from its first step, for 2,500 steps:

    python train.py --config configs/shapes_ip2p.py:regrown --workdir runs/shapes-ip2p-regrown
"""

import ml_collections

from ip2p_jax.training.config import diffusion_objective, edit_data, training_config, unet_kernels


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in ("", "regrown"):
        raise ValueError(f"unknown variant {variant!r} of configs/shapes_ip2p.py (none, or regrown)")
    config = training_config("ip2p", model="models/shapes-t2i")  # the lineage's text-to-image model
    config.init_from = "sd"  # 4 -> 8 input channels
    config.steps = 3000  # 65 min here (about 1.3 s a step alone, docs/shapes.md stage 3b)
    config.data = edit_data("shapes_edit", resolution=64, resize_max=72, global_batch_size=32)
    config.optim.learning_rate = 2e-4
    config.objective = diffusion_objective(conditioning_dropout=0.05)
    config.sample = dict(every=1000, count=6, steps=50)  # edits of the first batch's images by the EMA UNet
    config.eval = dict(
        name="keyword_localisation",  # training/evaluators.py
        count=64,  # fresh training-distribution edits for the keyword's localisation (0: never)
        timesteps=(500, 800),  # 800: about where FoI's mask step sits at strength 0.8
        map_size=(16, 16),
        gamma=1,  # FoI's mask extraction (FoIConfig.gamma, tau): the text-to-image stage's measured best
        tau=0.2,
    )
    if variant == "regrown":
        config.steps = 2500  # about 55 min alone here
        config.objective.prediction_type = "v_prediction"
        config.objective.rescale_betas_zero_snr = True
    unet_kernels(config)
    config.lock()
    return config
