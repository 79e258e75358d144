#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (#14) and docs/EXPERT.md (#15), one command on a machine with one CUDA GPU:
#
#     bash bench/gpu.sh [OUTPUT_DIR]
#
# Random backbone weights and synthetic images: the numbers are cost (images/s, fit seconds), not accuracy.
# 1. the expert stage as the pipeline runs it (Expert.score_inputs on uint8 model inputs: H2D copy, normalise,
#    backbone, patch embedding, nearest-neighbour search on the GPU, maps at the original size) next to the
#    backbone forward alone, per backbone dtype; scores against anomalib's float32 PatchCore;
# 2. every expert model's fit time and images/s, WRN50 layer2+layer3 at 224 (PaDiM with resnet18: its inverse
#    covariances at WRN50's 550 channels over 28x28 positions would be ~0.9 GB), and resnet18 for all three.
set -euo pipefail
out=${1:-.}
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python bench/bench_expert.py --device cuda --dtypes float32,float16,bfloat16 --train 100 --test 512 --batch 64 \
    2>&1 | tee "$out/bench_expert_cuda.txt"
python bench/bench_experts.py --device cuda --dtypes float32,float16 --experts patchcore,stfpm \
    --backbone wide_resnet50_2 --layers layer2,layer3 --size 256 --crop 224 --train 32 --test 512 --batch 64 \
    2>&1 | tee "$out/bench_experts_wrn50_cuda.txt"
python bench/bench_experts.py --device cuda --dtypes float32,float16 --size 256 --crop 224 --train 32 --test 512 \
    --batch 64 2>&1 | tee "$out/bench_experts_resnet18_cuda.txt"
