#!/usr/bin/env bash
# Issue #14's GPU measurement, prepared for a lent GPU machine, where one short run must do.
#
#   here:   make device-wheels              the project's wheels, and the packages the GPU image
#                                           lacks or has too old, for its Python 3.12, into .device/
#   there:  bash benchmarks/device_check.sh (the device tool's `run`, with `carry: [".device"]`)
#           bash benchmarks/device_check.sh graphs   (then, time left: compiled with CUDA graphs)
#           bash benchmarks/device_check.sh decode   (time left still: `dharma generate --compile`)
#           bash benchmarks/device_check.sh unstacked (the eager rows with the groups' weights
#                                           stacked in every forward, as before train/stacked.py)
#
# It installs the wheels into /tmp (no network there), prints the card, then times the module
# stacks against the bare backbone in bf16 at batch 8 x 256: eager rows first, then compiled
# ones; with `graphs`, the compiled rows in mode reduce-overhead (CUDA graphs) instead. Each
# part writes to $OUT (or ./device-out) as it goes, so a run cut off at its time limit still
# returns what it measured.
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
python=${PYTHON:-python3}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dharma-site .device/*.whl || exit 1
export PYTHONPATH=/tmp/dharma-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    uptime
} 2>&1 | tee "$out/device.txt"
# What the benchmark will import, and from where (the wheels in /tmp, not the checkout).
"$python" -c "
import dharma_kernel, tokenizers, torch, transformers
from dharma_kernel import registry
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__,
      'tokenizers', tokenizers.__version__)
print('dharma_kernel', dharma_kernel.__file__, len(registry.discover('module')), 'module plugins')
" 2>&1 | tee -a "$out/device.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
if [ "${1:-}" = decode ]; then
    # Decoding eager against compiled (benchmarks/bench_decode.py), bf16.
    timeout "${DECODE_SECONDS:-500}" "$python" benchmarks/bench_decode.py 2>&1 | tee "$out/decode.txt"
    exit
fi
if [ "${1:-}" = unstacked ]; then
    DHARMA_BENCH_STACKED=0 timeout "${EAGER_SECONDS:-200}" "$python" benchmarks/bench_modules.py --quick \
        --speed-only 2>&1 | tee "$out/eager-unstacked.txt"
    exit
fi
if [ "${1:-}" = graphs ]; then
    # A second call: CUDA graphs over the whole step (the fixed-capacity row traces as one graph).
    DHARMA_BENCH_COMPILE_MODE=reduce-overhead timeout "${GRAPHS_SECONDS:-500}" "$python" \
        benchmarks/bench_modules.py --quick --speed-only --compiled-only 2>&1 | tee "$out/cuda-graphs.txt"
    exit
fi
timeout "${EAGER_SECONDS:-200}" "$python" benchmarks/bench_modules.py --quick --speed-only 2>&1 \
    | tee "$out/eager.txt"
timeout "${COMPILED_SECONDS:-330}" "$python" benchmarks/bench_modules.py --quick --speed-only --compile \
    --compiled-only 2>&1 | tee "$out/compiled.txt"
