#!/bin/bash
# Fine-tune Qwen2-VL-7B-Instruct with omnitune (MindSpeed-MM finetune_qwen2vl_7b.sh flags).
# CUDA is the default device; on Ascend NPU (torch_npu installed) the same script uses hccl.
# Weights: ckpt/hf_path/Qwen2-VL-7B-Instruct (HF folder) or a save_dir to resume.
# Data: ./data/mllm_format_llava_instruct_data.json (examples/qwen2vl/llava_instruct_2_mllm_demo_format.py).

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="${MM_DATA:-./examples/qwen2vl/data_7b.json}"
MM_MODEL="${MM_MODEL:-./examples/qwen2vl/model_7b.json}"
LOAD_PATH="${LOAD_PATH:-ckpt/hf_path/Qwen2-VL-7B-Instruct}"
SAVE_PATH="${SAVE_PATH:-save_dir}"

# TP, CP and PP work here (checked before launch: heads, kv heads, batch; PP splits by model.json pipeline_num_layers).
TP=1
PP=4   # the seed: model_7b.json vision [32,0,0,0] + text [1,10,10,7] on 4 stages
CP=1
MBS=1
GRAD_ACC_STEP=96
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# Model structure comes from model_7b.json + the HF config.json; structure flags here are ignored.
GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --seq-length 1024 \
    --lr 1.0e-5 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters 10000 \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --use-distributed-optimizer \
    --use-flash-attn \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 8 \
    --distributed-timeout-minutes 20 \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 10000 \
    --eval-iters 5000 \
    --save $SAVE_PATH \
    --ckpt-format torch \
    --log-tps \
"
logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m omnitune.train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    "$@" \
    2>&1 | tee logs/train_${logfile}.log
