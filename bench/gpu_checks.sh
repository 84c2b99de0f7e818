#!/usr/bin/env bash
# Every GPU check and GPU benchmark of the project, as named steps, results under $OUT
# (default /tmp/gpu-checks): for a GPU machine that is lent for minutes (docs/PERFORMANCE.md,
# "On a GPU").
#
#   OUT=/tmp/gpu bash bench/gpu_checks.sh [STEP ...]
#
# Steps, each under its own time limit so that one slow step cannot take the others' time
# (default: machine tests resnet50 n_m structured, and dali when DALI is importable: up to
# 17 minutes one after another, more than one call to a lent machine may run, so name the
# steps there):
#   stash     copy what this call carried (.bundle/ parts, .devdata/) to $STASH, which
#             outlives the call on a machine that stays warm: a bundle too large for one
#             call travels over several (below)
#   machine   nvidia-smi and the Python stack seen there                 -> machine.txt
#   tests     tests/test_gpu.py and tests/test_dali_loader.py -m gpu     -> gpu-tests.log
#   resnet50  bench/gpu_resnet50.py --ours $OURS (default auto, and auto-dali when DALI is
#             there): ResNet-50 at 224x224 in memory (dense, masked, masked compiled) vs the
#             trainer, each megabatch's phase shares; the restricted variants run Restricted
#             ImageNet's config (32x32) (`BENCH_SECONDS`, default 330)  -> resnet50.log
#   n_m       the 2:4 ViT export: each semi-structured Linear layer and the whole vit_cifar
#             in fp16, dense vs torch.sparse semi-structured at batch 1024 -> n_m.log, n_m.json
#   structured  ResNet-20 dense vs its unstructured and channel exports, fp32, batch 1 and
#             256 (bench/structured_inference.py --device cuda)          -> structured.log
#   dali      bench/dali_throughput.py: CPU readers, perf.gpu_decode and DALI feeding
#             batches alone                                               -> dali.log, dali.json
#
# A machine without the project's pure-Python dependencies gets them from ./.whl when that
# folder holds wheels. DALI (260 MB of wheels) travels as a bundle split into parts
# (bench/offline_bundle.py), kept in .bundle/ (git-ignored): one call per part, back to back
# (a machine idle for 30 s is given back, its stash with it). A call carries at most 64 MiB
# with the working tree (2.3 MiB) and .whl (0.3 MiB): the photos (.devdata, 21 MiB) go with
# the smallest part. About 13 minutes of device time in all, the figure that matters most
# (the trainer with DALI decoding against the compiled in-memory limit) before the tests:
#   carry [.bundle/<part 1>, .whl]:  bash bench/gpu_checks.sh stash machine
#   carry [.bundle/<part 2>, .whl]:  bash bench/gpu_checks.sh stash n_m structured
#   carry [.bundle/<part 3>, .devdata, .whl]:
#       OURS=auto-dali BENCH_SECONDS=450 bash bench/gpu_checks.sh stash resnet50
#   carry [.whl]:                    bash bench/gpu_checks.sh tests
# and with time left, Restricted ImageNet's phase shares:
#   carry [.whl]:
#       OURS=restricted,restricted-dali bash bench/gpu_checks.sh resnet50
# Each call prints what its stash holds. Once every part is there, the first step that needs
# DALI checks the bundle and extracts it beside $PYTHON's torch.
set -u
OUT=${OUT:-/tmp/gpu-checks}
STASH=${STASH:-/tmp/gpu-stash}
BENCH_SECONDS=${BENCH_SECONDS:-330}
PYTHON=${PYTHON:-python3}  # the device image's python3 holds torch
mkdir -p "$OUT" "$STASH"
OUT=$(cd "$OUT" && pwd) STASH=$(cd "$STASH" && pwd)
cd "$(dirname "$0")/.."
steps=("$@")
for step in "${steps[@]}"; do
    case $step in
        stash|machine|tests|resnet50|n_m|structured|dali) ;;
        *) echo "error: unknown step '$step' (stash, machine, tests, resnet50, n_m," \
                "structured, dali)" >&2
           exit 2 ;;
    esac
done

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export APP_DIST_BENCH_DIR=${APP_DIST_BENCH_DIR:-/tmp/app-dist-bench}
for sample in .devdata/imagenet-sample-restricted "$STASH/imagenet-sample-restricted"; do
    if [ -d "$sample" ]; then
        export APP_DIST_IMAGENET_SAMPLE=$(cd "$sample" && pwd)
        break
    fi
done

has_dali() { "$PYTHON" -c "import nvidia.dali" 2>/dev/null; }

bundle_sha() {  # the hash in the stashed parts' names (one bundle per stash)
    local part
    part=$(compgen -G "$STASH/bundle-*" | head -1)
    [ -n "$part" ] || return 1
    part=${part##*/bundle-}
    echo "${part%%.*}"
}

dali_from_bundle() {  # DALI importable? Extracts the stashed bundle once it is complete.
    has_dali && return 0
    local sha site
    sha=$(bundle_sha) || return 1
    [ -e "$STASH/.extracted-$sha" ] && return 1  # extracted already, still not importable
    # Beside torch, in the folder of the image's own `nvidia` package (its CUDA libraries).
    site=$("$PYTHON" -c "import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1])") \
        || { echo "DALI: $PYTHON has no torch to put DALI beside"; return 1; }
    "$PYTHON" bench/offline_bundle.py unpack --target "$site" "$STASH" >> "$OUT/bundle.log" 2>&1 \
        || return 1
    touch "$STASH/.extracted-$sha"
    if has_dali; then echo "DALI extracted from bundle $sha into $site"; return 0; fi
    "$PYTHON" -c "import nvidia.dali" >> "$OUT/bundle.log" 2>&1
    echo "DALI extracted from bundle $sha but not importable (bundle.log says why)"
    return 1
}

run_logged() {  # SECONDS LOG COMMAND...: COMMAND under a time limit, its output and exit in LOG
    local seconds=$1 log=$OUT/$2
    shift 2
    timeout "$seconds" "$@" > "$log" 2>&1
    echo "${log##*/}: exit $?" >> "$log"
}

step_stash() {
    if compgen -G ".bundle/bundle-*" >/dev/null; then cp .bundle/bundle-* "$STASH/"; fi
    if [ -d .devdata/imagenet-sample-restricted ]; then
        cp -r .devdata/imagenet-sample-restricted "$STASH/"
    fi
    ls -l "$STASH" > "$OUT/stash.txt"
    local parts
    parts=$(cd "$STASH" && compgen -G "bundle-*" | sed 's/.*\.tar\.xz\.//' | sort -n | tr '\n' ' ')
    echo "stash: bundle $(bundle_sha || echo none), parts ${parts:-none}; photos:" \
        "$([ -d "$STASH/imagenet-sample-restricted" ] && echo yes || echo no)"
}

step_machine() {
    dali_from_bundle
    {
        nvidia-smi
        "$PYTHON" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name())"
        "$PYTHON" -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>&1 | tail -1
        nproc
    } > "$OUT/machine.txt" 2>&1
}

step_tests() {
    if dali_from_bundle; then echo "tests: with DALI"; else echo "tests: DALI's skip"; fi
    run_logged 200 gpu-tests.log "$PYTHON" -m pytest -q -rs -p no:cacheprovider --durations=10 \
        tests/test_gpu.py tests/test_dali_loader.py -m gpu
}

step_resnet50() {
    local ours=${OURS:-auto}
    if dali_from_bundle; then
        [ -z "${OURS:-}" ] && ours=auto,auto-dali
    elif [[ $ours == *dali* ]]; then  # minutes of device time for a run that cannot start
        ours=$(tr ',' '\n' <<< "$ours" | grep -v dali | paste -sd, -)
        echo "resnet50: DALI is not importable: its variants left out (ours: ${ours:-none})"
        [ -z "$ours" ] && return
    fi
    run_logged "$BENCH_SECONDS" resnet50.log "$PYTHON" bench/gpu_resnet50.py --copies 80 \
        --ours "$ours" --compiled --no-write
}

step_n_m() {
    run_logged 240 n_m.log "$PYTHON" bench/n_m_inference.py --batch 1024 --rounds 5 \
        --no-write --json "$OUT/n_m.json"
}

step_structured() {
    run_logged 120 structured.log "$PYTHON" bench/structured_inference.py --device cuda \
        --no-write
}

step_dali() {
    if ! dali_from_bundle; then
        echo "dali: DALI is not importable (bundle.log says why)" > "$OUT/dali.log"
        return
    fi
    run_logged 150 dali.log "$PYTHON" bench/dali_throughput.py --out "$OUT/dali.json"
}

if [ ${#steps[@]} -eq 0 ]; then
    steps=(machine tests resnet50 n_m structured)
    if dali_from_bundle; then steps+=(dali); fi
fi
for step in "${steps[@]}"; do "step_$step"; done
