#!/bin/bash
# Merge the LoRA adapters of a LoRA save dir (finetune_*_lora.sh) into the base model: a full HF folder
# that plain transformers loads.
# Without --merge-lora, `omnitune export` writes a peft adapter folder instead
# (PeftModel.from_pretrained(<base model>, ADAPTER_DIR)).
SAVE_PATH="${SAVE_PATH:-save_dir_lora}"                  # the LoRA training save dir
HF_PATH="${HF_PATH:-ckpt/hf_path/Qwen2.5-VL-3B-Instruct}"     # original HF folder: config, tokenizer, processor files
BASE_MODEL="${BASE_MODEL:-}"                            # the base the adapters trained on [default: recorded in the checkpoint]
OUTPUT_PATH="${OUTPUT_PATH:-ckpt/merged/Qwen2.5-VL-3B-Instruct-lora}"

omnitune export \
    --load "$SAVE_PATH" \
    --save "$OUTPUT_PATH" \
    --model-assets "$HF_PATH" \
    --merge-lora \
    ${BASE_MODEL:+--load-base-model "$BASE_MODEL"} \
    "$@"
