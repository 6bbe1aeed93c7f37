"""What rematerialisation saves in training: XLA's memory analysis of the compiled UNet loss and gradient, for each
``remat`` setting of the train step (``ip2p_jax/models/unet.py``), against no rematerialisation.

The real SD 1.5 architecture with 8 input channels (InstructPix2Pix), batch 1, float32, compiled for this machine's
first device from shapes alone (no weights are made, nothing runs). The differentiated function is the UNet's noise
prediction and its MSE, the part of the train step whose activations rematerialisation trades for compute; the
frozen VAE encoder and text encoder run outside the gradient, and the optimizer's state does not depend on it.
Prints, per image size and setting: XLA's temporary memory (activations kept for the backward pass and workspace),
its ratio to no rematerialisation, and XLA's FLOP count (the recomputation's price); first, a control on a plain
chain of dense layers that says whether this backend's compiled programs follow rematerialisation at all (XLA's
CPU backend does not: it keeps as much with it as without).

    python benchmarks/remat.py                          # SD 1.5 at 256 and 512 px (minutes to compile on a CPU)
    python benchmarks/remat.py --model tiny --sizes 64  # seconds, for a smoke run
"""

from __future__ import annotations

import argparse

from unet import MODELS, TOKENS  # benchmarks/ is on sys.path


def memory_and_flops(config: dict, latent: int, remat: str) -> dict:
    """XLA's memory analysis and FLOP count of the jitted loss and gradient for one setting."""
    import jax
    import jax.numpy as jnp

    from ip2p_jax.models.unet import UNet2DConditionModel, UNetConfig

    module = UNet2DConditionModel(UNetConfig.from_diffusers(config), remat=remat)
    sample = jax.ShapeDtypeStruct((1, latent, latent, config["in_channels"]), jnp.float32)
    target = jax.ShapeDtypeStruct((1, latent, latent, config["out_channels"]), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    context = jax.ShapeDtypeStruct((1, TOKENS, config["cross_attention_dim"]), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), sample, timesteps, context)["params"]

    def loss(p, x, t, c, goal):
        eps, _ = module.apply({"params": p}, x, t, c)
        return jnp.mean((eps - goal) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, sample, timesteps, context, target).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    return dict(
        temp_mib=memory.temp_size_in_bytes / 2**20,
        arguments_mib=memory.argument_size_in_bytes / 2**20,
        flops=float((cost[0] if isinstance(cost, list) else cost)["flops"]),
    )


def dense_chain_control() -> tuple[float, float]:
    """XLA's temporary memory (MiB) of the gradient of 16 blocks of 4 dense layers (4096 x 1024 activations),
    without and with each block rematerialised: about 16 x 4 x 16 MiB kept, against 16 block inputs and one
    block's activations, if the backend follows the rematerialisation. A check of the backend, not of the UNet."""
    import jax
    import jax.numpy as jnp

    def block(w, x):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x

    def loss(weights, x, remat):
        step = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable) if remat else block
        for w in weights:
            x = step(w, x)
        return jnp.sum(x**2)

    weights = [jax.ShapeDtypeStruct((1024, 1024), jnp.float32)] * 16
    x = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    temp = []
    for remat in (False, True):
        compiled = jax.jit(jax.grad(lambda w, x, r=remat: loss(w, x, r))).lower(weights, x).compile()
        temp.append(compiled.memory_analysis().temp_size_in_bytes / 2**20)
    return temp[0], temp[1]


def main() -> None:
    from ip2p_jax.models.unet import REMAT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels (latents are 1/8)")
    args = parser.parse_args()
    import jax

    plain, remat = dense_chain_control()
    print(
        f"device {jax.devices()[0].device_kind}; control, a chain of dense layers: {plain:.0f} MiB without "
        f"rematerialisation, {remat:.0f} MiB with it (about 1024 against 320 if the backend follows it)"
    )
    print(f"{args.model}, batch 1, float32: XLA memory analysis of the UNet's loss and gradient")
    print("| image | remat | temporary memory (MiB) | against none | parameters (MiB) | GFLOP | against none |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        base = None
        for remat in REMAT:
            figures = memory_and_flops(MODELS[args.model], size // 8, remat)
            base = base or figures
            print(
                f"| {size} px | {remat} | {figures['temp_mib']:.0f} | {figures['temp_mib'] / base['temp_mib']:.2f}x "
                f"| {figures['arguments_mib']:.0f} | {figures['flops'] / 1e9:.1f} "
                f"| {figures['flops'] / base['flops']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
