#!/usr/bin/env bash
# pixeldlm.py's defaults, JiT-B/4 on 64x64 images (4096 tokens each), bf16 autocast, torch.compile: one node
# of 8 GPUs, fewer GPUs, or several nodes. The global batch is 1024 images whatever the GPU count: 8 micro-steps
# of 128 shared out among the GPUs (past 8 GPUs, one micro-step each, of 1024 / GPUs). Learning rate 2e-4 =
# JiT's 5e-5 * 1024 / 256, 5000 warmup iterations, then constant; EMA decay 0.9999.
#
# First: python prepare_data.py --input your_corpus/   (the built-in corpus is far too small for this)
#   ./train_8gpu.sh                                      one node, 8 GPUs
#   NPROC=1 ./train_8gpu.sh --max_iters=50 --out_dir=out-check     one GPU: a quick check of speed and MFU
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./train_8gpu.sh         on node0; NODE_RANK=1 on the second node
#   ./train_8gpu.sh --init_from=resume                   after an interruption (SIGTERM or SIGUSR1 save first)
# Extra flags pass through to pixeldlm.py and win over its defaults and the two flags below.
set -euo pipefail
cd "$(dirname "$0")"
NPROC=${NPROC:-8}    # GPUs (processes) on this node
NNODES=${NNODES:-1}  # nodes; each runs this script with its own NODE_RANK
WORLD=$((NPROC * NNODES))
ACCUM=$((WORLD > 8 ? WORLD : 8))  # micro-steps per iteration, at least one per GPU
if ((ACCUM % WORLD || 1024 % ACCUM)); then
    echo "error: $WORLD GPUs in all (NPROC x NNODES) cannot share 8 micro-steps of 128 images; use 1, 2, 4, 8, 16, ..." >&2
    exit 1
fi
if ((NNODES > 1)); then
    launch=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK (0 to NNODES-1) on every node}"
            --master_addr="${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"
            --master_port="${MASTER_PORT:-29500}")
else
    launch=(--standalone)
fi
# torchrun passes these signals on to every process, which then saves before it stops (SLURM: --signal=USR1@120)
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # torchrun --signals_to_handle
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}  # seconds to finish that save
# The rest of the recipe above is pixeldlm.py's defaults (out_dir 'out'). Only what the GPU count decides is passed:
# a flag would win over what a resumed run saved, so the first run's extra flags (say --max_iters=200000) hold on
# ./train_8gpu.sh --init_from=resume without being given again.
exec torchrun "${launch[@]}" --nproc_per_node="$NPROC" pixeldlm.py \
    --batch_size=$((1024 / ACCUM)) --gradient_accumulation_steps=$ACCUM "$@"
