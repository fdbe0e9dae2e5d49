#!/usr/bin/env bash
# The device check, in one go, for a machine with an NVIDIA GPU (and a CUDA build of
# torch): the CUDA tests, the GPU benchmarks and one seed of recipes/bengio2007.yaml.
# Everything it prints also goes under $OUT (default gpu-results/).
#
#     OUT=/tmp/gpu bash benchmarks/gpu.sh [quick]
#
# `quick` runs 10k examples and skips bengio2007 (about 2 minutes on an H100).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
quick=${1:-}
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA GPU here; nothing to measure." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"

n=()
[ "$quick" = quick ] && n=(--n 10000)
python benchmarks/rbm.py --device cuda --rounds 3 "${n[@]}" 2>&1 | tee "$out/rbm.txt"
for flags in "" "--amp"; do  # float32 and bf16 autocast
    python benchmarks/finetune.py --device cuda --rounds 3 $flags "${n[@]}" 2>&1 | tee -a "$out/finetune.txt"
done
python benchmarks/run.py --device cuda --json ${quick:+--quick} > "$out/run.json" 2> "$out/run.err"
tail -c 4000 "$out/run.json"

if [ "$quick" != quick ]; then
    start=$(date +%s)
    surgery run recipes/bengio2007.yaml --out "$out/bengio2007" --set 'experiment.seeds=[0]' \
        --set data.device=cuda --set finetune.device=cuda 2>&1 | tail -20 | tee "$out/bengio2007.txt"
    echo "bengio2007, one seed of all arms: $(( $(date +%s) - start )) s" | tee -a "$out/bengio2007.txt"
fi
