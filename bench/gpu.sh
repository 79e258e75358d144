#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (#29; expert #14/#15) in one command on a bare GPU machine (one CUDA GPU, torch
# and torchvision in its image, no internet, no Ray/pydantic/anomalib).
#
#   bash bench/gpu.sh --fetch              # HERE, with PyPI: the wheels into .whl/ (git-ignored), see below
#   bash bench/gpu.sh --probe              # THERE: Python, torch, GPU, and which lock packages the image lacks
#   bash bench/gpu.sh [OUT]                # THERE: install the wheels into .gpuvenv, then run everything into OUT
#   bash bench/gpu.sh --cpu-smoke [OUT]    # HERE: the same runs at tiny sizes on the CPU (proves the script)
#   bash bench/gpu.sh --install-check      # HERE: the offline install into a throw-away venv that has only torch
#
# ONLY=cuda-tests,expert,mllm,pipeline,experts (default: all but experts) picks the parts; WORK=DIR holds the
# synthetic data and the 7B-shaped checkpoint (~16 GB; default OUT/work).
#
# The wheels: every package of requirements.lock except the image's torch stack (bench/gpu_wheels.py; SKIP=globs
# to change it), plus pytest for the CUDA tests, downloaded with their lock hashes checked (`pip download
# --require-hashes`; cp311 manylinux x86-64, PYVER=3.11), sdists built into wheels here, SHA256SUMS written; they
# are checked again and installed with `pip install --no-index --find-links .whl --no-deps` there. About 470 MB
# (ray 79 MB, opencv 61, pyarrow 55, scipy 35, ...): more than one device call carries (64 MiB with the 4.4 MB
# tree), so --fetch also cuts them into 9 .whl/parts/part-* of 56 MiB (PART_MB); carry them one per call (an
# ignored folder stays between calls while the machine is warm), then this script joins them. With --probe's list, SKIP can leave out what the image has.
#
# Parts (random weights and synthetic images everywhere: the figures are cost, not accuracy):
#   cuda-tests  the certified search, guidance exactness and MLLM batching tests on CUDA (EAGLE_TEST_DEVICE=cuda)
#   expert      the expert stage vs the backbone forward, and the search table: exact vs the certified
#               float16/bfloat16/TF32 shortlist (bench_expert.py --searches)
#   mllm        the 7B-shaped MLLM at batch 8/16/32/64, unguided vs guided, peak memory, sorted/static/compile
#               (bench_mllm.py), and the answer-only length (8 new tokens)
#   pipeline    fit + inspect through Ray: 3 products x 56 test images x COPIES files of 1024^2 (default 16: 2,688
#               images), not-confident-normal routing, the 7B-shaped MLLM pool, nvidia-smi dmon in the background
#               (bench_gpu_pipeline.py): end-to-end images/s, GPU utilisation, rows and KB per image per stage
#   experts     every expert model's fit time and images/s (bench_experts.py; docs/EXPERT.md)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
    --fetch|--probe|--cpu-smoke|--install-check) mode=${1#--}; shift ;;
esac
out=${1:-gpu-out}
PYVER=${PYVER:-3.11}
PY=${PYTHON:-python3}  # the GPU image's Python with torch (PYTHON=... when it is not python3)
SKIP=${SKIP:-torch,torchvision,triton,nvidia-*,cuda-*}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false

fetch() {
    mkdir -p .whl
    python bench/gpu_wheels.py requirements.lock --dev-lock requirements-dev.lock --skip "$SKIP" > .whl/requirements.gpu.txt
    python bench/gpu_wheels.py requirements.lock --dev-lock requirements-dev.lock --skip "$SKIP" --pins > .whl/pins.txt
    local abi="cp${PYVER/./}"
    pip download --no-deps --require-hashes --python-version "$PYVER" --implementation cp --abi "$abi" --abi abi3 \
        --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any -d .whl -r .whl/requirements.gpu.txt
    for sdist in .whl/*.tar.gz; do  # packages without a wheel (freia): built here, pure Python
        [ -e "$sdist" ] || continue
        pip wheel --no-deps --no-build-isolation -w .whl "$sdist" && rm "$sdist"
    done
    (cd .whl && sha256sum ./*.whl > SHA256SUMS)
    rm -rf .whl/parts && mkdir -p .whl/parts
    tar -cf - -C .whl SHA256SUMS pins.txt $(cd .whl && ls ./*.whl) | split -b "${PART_MB:-56}m" - .whl/parts/part-
    du -sh .whl/*.whl | sort -h | tail -5
    echo "$(ls .whl/*.whl | wc -l) wheels, $(du -ch .whl/*.whl | tail -1 | cut -f1); parts to carry: $(ls .whl/parts | tr '\n' ' ')"
}

probe() {
    "$PY" --version
    "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
    "$PY" -c "import torchvision; print('torchvision', torchvision.__version__)" || echo "torchvision MISSING: the image needs one built for its torch (the lock's 0.29.1 is for torch 2.14.1)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" bench/gpu_wheels.py requirements.lock --skip "$SKIP" --pins > /tmp/lock-pins.txt 2>/dev/null
    "$PY" - <<'EOF'
import importlib.metadata as md
missing, other = [], []
for line in open("/tmp/lock-pins.txt"):
    name, version = line.strip().split("==")
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
        continue
    if have != version:
        other.append(f"{name} {have} (lock {version})")
print(f"missing ({len(missing)}):", " ".join(missing))
print(f"other version ({len(other)}):", "; ".join(other))
EOF
}

install() {  # into .gpuvenv, which sees the image's torch (system site packages)
    if [ -d .whl/parts ] && ls .whl/parts/part-* >/dev/null 2>&1; then
        cat .whl/parts/part-* | tar -xf - -C .whl
    fi
    [ -f .whl/SHA256SUMS ] || { echo "no .whl/: run 'bash bench/gpu.sh --fetch' where PyPI is reachable, carry .whl" >&2; exit 2; }
    (cd .whl && sha256sum --quiet -c SHA256SUMS)
    local have; have=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    [ "$have" = "$PYVER" ] || { echo "python $have here, wheels are for $PYVER: PYVER=$have bash bench/gpu.sh --fetch" >&2; exit 2; }
    [ -d .gpuvenv ] || "$PY" -m venv --system-site-packages .gpuvenv
    # shellcheck disable=SC1091
    . .gpuvenv/bin/activate
    pip install --quiet --no-index --find-links .whl --no-deps -r .whl/pins.txt
    # the project itself, as the README installs it (fits record its version from the package metadata)
    pip install --quiet --no-index --no-deps --no-build-isolation -e .
    python -c "import torch, ray, pydantic, anomalib, transformers, eagle; print('torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__, '| eagle from', eagle.__file__)"
}

wants() { [[ ",${ONLY:-cuda-tests,expert,mllm,pipeline}," == *",$1,"* ]]; }

run_gpu() {
    mkdir -p "$out"
    local work=${WORK:-$out/work}
    nvidia-smi | tee "$out/nvidia_smi.txt"
    if wants cuda-tests; then
        EAGLE_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_expert_search.py tests/test_guidance.py \
            tests/test_mllm.py -k "not s3_prefix" 2>&1 | tee "$out/cuda_tests.txt" \
            || echo "PART FAILED: cuda-tests"  # (the one left out needs moto's S3 server, not in the runtime lock)
    fi
    if wants expert; then
        python bench/bench_expert.py --device cuda --skip-coreset --dtypes float32,float16 --train 100 --test 512 \
            --batch 64 --searches exact,float16,bfloat16,tf32 2>&1 | tee "$out/bench_expert_cuda.txt" || echo "PART FAILED: expert"
    fi
    if wants mllm; then
        python bench/bench_mllm.py --shape 7b --device cuda --dtype bfloat16 --images 128 --batches 8,16,32,64 \
            --new-tokens 32 2>&1 | tee "$out/bench_mllm_7b.txt" || echo "PART FAILED: mllm"
        python bench/bench_mllm.py --shape 7b --device cuda --dtype bfloat16 --images 128 --batches 32,64 \
            --new-tokens 8 --options '' 2>&1 | tee "$out/bench_mllm_7b_answer_only.txt" || echo "PART FAILED: mllm 8"
    fi
    if wants pipeline; then
        python bench/bench_gpu_pipeline.py --device cuda --size 1024 --copies "${COPIES:-16}" --root "$work" \
            --out "$out" > "$out/bench_gpu_pipeline.log" 2>&1 && cat "$out/pipeline.txt" \
            || { tail -30 "$out/bench_gpu_pipeline.log"; echo "PART FAILED: pipeline"; }
    fi
    if wants experts; then
        python bench/bench_experts.py --device cuda --dtypes float32,float16 --experts patchcore,stfpm \
            --backbone wide_resnet50_2 --layers layer2,layer3 --size 256 --crop 224 --train 32 --test 512 --batch 64 \
            2>&1 | tee "$out/bench_experts_wrn50_cuda.txt" || echo "PART FAILED: experts"
    fi
    echo "results in $out"
}

cpu_smoke() {  # the same scripts at tiny sizes in the current environment
    mkdir -p "$out"
    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    if wants expert; then
        python bench/bench_expert.py --backbone resnet18 --skip-coreset --train 4 --test 4 --batch 2 --threads 1 \
            --searches exact,float16 2>&1 | tee "$out/bench_expert_cpu.txt" | tail -6
    fi
    if wants mllm; then
        python bench/bench_mllm.py --images 6 --batches 2,3 --new-tokens 4 2>&1 | tee "$out/bench_mllm_cpu.txt" | tail -12
    fi
    if wants pipeline; then
        python bench/bench_gpu_pipeline.py --cpu-smoke --out "$out" > "$out/bench_gpu_pipeline.log" 2>&1
        cat "$out/pipeline.txt"
    fi
}

install_check() {  # an image with only torch: a venv that sees this venv's torch stack and nothing else
    local venv=${TMPDIR:-/tmp}/eagle-gpu-install-check site
    rm -rf "$venv" && python3 -m venv "$venv"
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    local mine; mine=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
    mkdir -p "$venv/image-site"
    for entry in "$mine"/torch "$mine"/torch-*.dist-info "$mine"/torchgen "$mine"/functorch "$mine"/torchvision \
                 "$mine"/torchvision-*.dist-info "$mine"/torchvision.libs "$mine"/triton "$mine"/triton-*.dist-info \
                 "$mine"/nvidia "$mine"/nvidia_*.dist-info "$mine"/cuda "$mine"/cuda_*.dist-info; do
        [ -e "$entry" ] && ln -s "$entry" "$venv/image-site/"
    done
    echo "$venv/image-site" > "$site/gpu-image.pth"
    "$venv/bin/python" -c "import ray" 2>/dev/null && { echo "ray already visible: not a bare image" >&2; exit 1; }
    "$venv/bin/pip" install --quiet --no-index --find-links .whl --no-deps -r .whl/pins.txt
    "$venv/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e .
    "$venv/bin/python" -c "import torch; print('image torch', torch.__version__)"  # its deps came from the wheels
    (cd /tmp && "$venv/bin/python" -c "import ray, pydantic, anomalib, transformers, duckdb, eagle.pipeline.inspection, eagle.expert.search; print('offline install OK: ray', ray.__version__)")
    "$venv/bin/pip" check || true
}

case $mode in
    fetch) fetch ;;
    probe) probe ;;
    cpu-smoke) cpu_smoke ;;
    install-check) install_check ;;
    run) install; run_gpu ;;
esac
