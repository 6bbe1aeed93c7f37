#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one go, on a machine with one NVIDIA GPU (issue 18). Never run by
# the tests. Each script below runs ours and the reference (diffusers / PyTorch) side by side and prints ratios,
# MFU (benchmarks/mfu.py) and peak device memory:
#
#   1. the SD 1.5 UNet forward at 512 px, bfloat16, guidance batch 24 (8 images): cuDNN attention, then XLA's;
#   2. the IP2P edit of the SD 1.5 architecture at 512 px, batch 1 and 8, 20 steps: ours in bfloat16 with cuDNN
#      attention against diffusers' pipeline in bfloat16 (PyTorch's SDPA);
#   3. FoI against IP2P on the same model, 512 px, batch 8, 20 steps;
#   4. one training step of the SD 1.5 architecture at 256 px, batch 8, bfloat16 compute;
#   5. what rematerialisation saves in the compiled train step (XLA's memory analysis), 256 and 512 px.
#
# Needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, transformers, torch (CUDA) and diffusers. A machine
# that lacks a package and cannot reach an index takes wheels from .whl/ (made beforehand with `pip download`; see
# BENCHMARKS.md): they are installed into /tmp/site first.
#
#   bash benchmarks/accelerator.sh [OUT_FOLDER]      # writes OUT_FOLDER/accelerator.md (default: /tmp/accelerator)
#   bash benchmarks/accelerator.sh --smoke [OUT]     # the same steps on tiny models, float32 XLA attention: on a
#                                                    # CPU, minutes; checks the script before device time is spent
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model=sd15 size=512 train_model=sd15 batch=8 steps=20 dtype=bfloat16 attention=cudnn repeats=10 remat=256,512
if [[ "${1:-}" == --smoke ]]; then
    shift
    model=tiny size=64 train_model=tiny batch=2 steps=2 dtype=bfloat16 attention=xla repeats=1 remat=64
fi
out="${1:-/tmp/accelerator}"
mkdir -p "$out"
if compgen -G "$root/.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$root"/.whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$root:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
report="$out/accelerator.md"
: >"$report"

# Each step's table goes to the report; a failing step is reported and the next one still runs.
step() {
    echo "\$ $*" | tee -a "$report"
    if ! (cd "$root/benchmarks" && "$@") 2>"$out/stderr.txt" | tee -a "$report"; then
        echo "FAILED: $(tail -n 3 "$out/stderr.txt")" | tee -a "$report"
    fi
    echo | tee -a "$report"
}

python3 - <<'EOF' | tee -a "$report"
import datetime, jax, torch
print(f"# {datetime.date.today()}: jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__}"
      f" on {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'}")
EOF
step python3 unet.py --model "$model" --sizes "$size" --batch $((3 * batch)) --dtype "$dtype" \
    --attention-backend "$attention" --repeats "$repeats"
step python3 unet.py --model "$model" --sizes "$size" --batch $((3 * batch)) --dtype "$dtype" \
    --attention-backend xla --repeats "$repeats"
step python3 sample.py --model "$model" --size "$size" --batches 1 "$batch" --steps "$steps" --dtype "$dtype" \
    --attention-backend "$attention"
step python3 foi.py --model "$model" --size "$size" --batch "$batch" --steps "$steps" --dtype "$dtype" \
    --attention-backend "$attention"
step python3 train.py --models "$train_model" --batch "$batch" --steps "$repeats" --dtype "$dtype"
step python3 remat.py --model "$model" --sizes "$remat"
echo "report: $report"
