#!/usr/bin/env bash
# JiT-B/4 on 64x64 images (4096 tokens each) on one node with 8 GPUs, bf16 autocast, torch.compile.
# Global batch 1024 images = batch_size 128 x 8 micro-steps, one micro-step per GPU.
# Learning rate 2e-4 = JiT's 5e-5 * 1024 / 256: 5000 warmup iterations, then constant; EMA decay 0.9999.
# First: python prepare_data.py --input your_corpus.jsonl  (the built-in corpus is far too small for this)
# Extra flags pass through, e.g. ./train_8gpu.sh --max_iters=20 --eval_interval=20   (a quick MFU check)
# or ./train_8gpu.sh --init_from=resume
set -euo pipefail
cd "$(dirname "$0")"
torchrun --standalone --nproc_per_node=8 pixeldlm.py \
    --out_dir=out --img_size=64 --patch_size=4 --n_layer=12 --n_head=12 --n_embd=768 \
    --batch_size=128 --gradient_accumulation_steps=8 --learning_rate=2e-4 --warmup_iters=5000 \
    --max_iters=100000 --dtype=bfloat16 --compile=True "$@"
