"""Does a model's cross-attention point at the object an instruction names? The question behind FoI's masks.

For the first ``--limit`` object edits (recolour, reshape, remove) of ShapesEdit's ``test_single``, the input
picture's latent is noised to timestep ``t`` (as FoI's sampler sees it), the UNet runs once on the instruction,
and the cross-attention maps of the largest attention layers are averaged over heads and layers. For each token
role (the keyword, the instruction's last word, the start token, the end token) it prints how often the map's
peak cell lies in the ground-truth region, and the map's mean inside the region over its mean everywhere
(1: no preference). A model whose keyword maps do not find the object cannot give FoI masks that do.

    python tools/attention_localisation.py --model models/shapes-ip2p --limit 100
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> dict:
    """Prints the table; returns ``{t: {role: (peak in region, inside / overall)}}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-ip2p")
    parser.add_argument("--dataset", default="shapes_edit", help="TFDS name (and config), e.g. shapes_edit/small")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default TFDS's)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--timesteps", default="900,700,500")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    import ip2p_jax.data.shapes_edit  # noqa: F401 (registers the builder)
    from ip2p_jax.evaluation import downsample_mask
    from ip2p_jax.foi import SubInstruction, instruction_tokens
    from ip2p_jax.models.attention import RecordCrossAttention, mean_of_layers
    from ip2p_jax.pipeline import InstructPix2PixPipeline
    from ip2p_jax.schedulers import SchedulerConfig
    from ip2p_jax.weights import load_noise_schedule

    pipe = InstructPix2PixPipeline.from_pretrained(args.model)
    examples = [
        e
        for e in tfds.as_numpy(tfds.load(args.dataset, split="test_single", data_dir=args.data_dir))
        if e["kinds"][0].decode() != "background"
    ][: args.limit]
    instructions = [e["instruction"].decode() for e in examples]
    # Token weights per role, (B, 77) each; the keyword's are FoI's own (its tokens averaged, paper 4.1).
    tokens = [
        instruction_tokens(pipe.tokenizer, [SubInstruction(text, e["keywords"][0].decode())])
        for text, e in zip(instructions, examples, strict=True)
    ]
    ends = [int(np.argmax(t.ids == pipe.tokenizer.eos_token_id)) for t in tokens]
    one_hot = lambda positions: np.eye(len(tokens[0].ids), dtype=np.float32)[positions]  # noqa: E731
    roles = {
        "keyword": np.stack([t.keyword_weights[0] for t in tokens]),
        "last word": one_hot([end - 1 for end in ends]),
        "start token": one_hot([0] * len(tokens)),
        "end token": one_hot(ends),
    }

    image_latents = pipe.encode_image([e["input_image"] for e in examples])
    context = pipe.encode_prompt(instructions)
    latent_size = image_latents.shape[1:3]
    control = RecordCrossAttention(sizes=(tuple(latent_size),))
    alphas_cumprod = SchedulerConfig(**load_noise_schedule(args.model)).alphas_cumprod()
    regions = np.stack([downsample_mask(e["regions"][0], tuple(latent_size)) for e in examples])
    scale = pipe.vae.config.scaling_factor
    results = {}
    for t in [int(t) for t in args.timesteps.split(",")]:
        a = alphas_cumprod[t]
        noise = jax.random.normal(jax.random.PRNGKey(t), image_latents.shape)
        noisy = np.sqrt(a) * scale * image_latents + np.sqrt(1 - a) * noise
        unet_input = jnp.concatenate([noisy, image_latents], axis=-1)
        _, aux = pipe.unet.apply(
            {"params": pipe.params["unet"]}, unet_input, jnp.full((len(examples),), t), context, control
        )
        maps = np.asarray(mean_of_layers(aux))  # (B, h, w, 77)
        print(f"t = {t}: {len(examples)} object edits, maps of {latent_size[0]}x{latent_size[1]}")
        results[t] = {}
        for role, weights in roles.items():
            role_maps = np.einsum("bhwt,bt->bhw", maps, weights)
            hits, ratios = [], []
            for m, region in zip(role_maps, regions, strict=True):
                peak = np.unravel_index(np.argmax(m), m.shape)
                hits.append(bool(region[peak]))
                ratios.append(m[region].mean() / m.mean() if region.any() else np.nan)
            results[t][role] = (float(np.mean(hits)), float(np.nanmean(ratios)))
            print(f"  {role:12s} peak in region {np.mean(hits):6.1%}   inside / overall {np.nanmean(ratios):5.2f}")
    area = regions.reshape(len(examples), -1).mean(axis=1)
    print(f"chance of a random peak in the region: {area.mean():.1%}")
    return results


if __name__ == "__main__":
    main()
