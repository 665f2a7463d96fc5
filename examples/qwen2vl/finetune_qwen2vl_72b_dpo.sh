#!/bin/bash
# DPO on Qwen2-VL-72B-Instruct with LoRA, with omnitune (MindSpeed-MM finetune_qwen2vl_72b_dpo.sh flags)
# Data: ./data/rlhf-v.json from rlhfv_2_sharegpt_demo_format.py (data_72b_dpo.json: attr.ranking true).
# The reference model is LOAD_PATH; under LoRA it is the same model with the adapters switched off
# (no second copy in memory). Without the LoRA flags the whole model trains and the reference is a
# frozen copy of REF_MODEL sharded like the policy. Export: merge_lora.sh (SAVE_PATH -> HF folder).
# CUDA is the default device; on Ascend NPU (torch_npu installed) the same script uses hccl.

NPUS_PER_NODE=${NPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))

MM_DATA="${MM_DATA:-./examples/qwen2vl/data_72b_dpo.json}"
MM_MODEL="${MM_MODEL:-./examples/qwen2vl/model_72b.json}"
# an HF folder, or the mm-convert hf_to_mm output as in MindSpeed-MM
LOAD_PATH="${LOAD_PATH:-ckpt/hf_path/Qwen2-VL-72B-Instruct}"
REF_MODEL="${REF_MODEL:-$LOAD_PATH}"
SAVE_PATH="${SAVE_PATH:-save_dir}"

# The seed runs TP=2 PP=4. Pipeline parallel is not implemented in this version, and LoRA trains
# under FSDP2 data parallel only: every rank is a data-parallel rank (model_72b.json's
# pipeline_num_layers are not used).
TP=1
PP=1
CP=1
MBS=1
GRAD_ACC_STEP=64
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# Model structure comes from model_72b.json + the HF config.json; structure flags here are ignored.
GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size 152064 \
    --seq-length 1024 \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --no-masked-softmax-fusion \
    --lr 5.0e-6 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters 5000 \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --no-gradient-accumulation-fusion \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --reuse-fp32-param \
    --use-flash-attn \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 8 \
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
"

DPO_ARGS="
    --dpo-beta 0.1 \
    --dpo-loss-type sigmoid \
    --dpo-label-smoothing 0.0 \
    --pref-ftx 0.0 \
    --ref-model $REF_MODEL \
"

logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p logs
torchrun $DISTRIBUTED_ARGS -m omnitune.train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    $DPO_ARGS \
    --distributed-backend nccl \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    "$@" \
    2>&1 | tee logs/train_${logfile}.log
exit ${PIPESTATUS[0]}
