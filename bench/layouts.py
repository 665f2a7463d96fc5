"""What `omnitune train --dry-run` estimates per rank for real model sizes and candidate layouts
(the README's layout table comes from this). Config-only HF folders with the published sizes of
Qwen2.5-VL-7B, Qwen2.5-VL-72B and Qwen3-VL-30B-A3B are written to a temp folder; no weights exist
or are needed: the estimate builds the model on the meta device.

    .venv/bin/python bench/layouts.py
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

MODELS = {
    "Qwen2.5-VL-7B": ("qwen2_5_vl", "Qwen2_5_VLConfig", dict(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=False)),
    "Qwen2.5-VL-72B": ("qwen2_5_vl", "Qwen2_5_VLConfig", dict(
        text_config=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=152064, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=8192,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=False)),
    "Qwen3-VL-30B-A3B": ("qwen3_vl_moe", "Qwen3VLMoeConfig", dict(
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                         moe_intermediate_size=768, vocab_size=151936, decoder_sparse_step=1),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                           deepstack_visual_indexes=[8, 16, 24]),
        tie_word_embeddings=False)),
}
# devices -> candidate layouts (flags)
LAYOUTS = {
    8: [[], ["--tensor-model-parallel-size", "2"], ["--tensor-model-parallel-size", "4"],
        ["--tensor-model-parallel-size", "8"], ["--context-parallel-size", "4"], ["--expert-model-parallel-size", "8"]],
    32: [[], ["--tensor-model-parallel-size", "4"], ["--tensor-model-parallel-size", "8"],
         ["--tensor-model-parallel-size", "8", "--context-parallel-size", "2"], ["--expert-model-parallel-size", "8"],
         ["--expert-model-parallel-size", "32"]],
}


def main() -> None:
    import transformers

    from omnitune.cli.demo import demo_configs
    from omnitune.config.errors import ConfigError
    from omnitune.models.registry import get_family
    from omnitune.train.trainer import make_plan

    root = Path(tempfile.mkdtemp(prefix="omnitune_layouts_"))
    for model, (family, cls, kw) in MODELS.items():
        folder = root / model
        folder.mkdir()
        getattr(transformers, cls)(**kw).save_pretrained(folder)
        data_json, model_json = demo_configs(folder, folder)
        m = json.loads(model_json.read_text())
        m["model_id"] = get_family(family).model_ids[0]
        model_json.write_text(json.dumps(m))
        for world, layouts in LAYOUTS.items():
            for flags in layouts:
                argv = ["--mm-data", str(data_json), "--mm-model", str(model_json), "--train-iters", "1",
                        "--micro-batch-size", "1", "--bf16", *flags]
                short = {"--tensor-model-parallel-size": "TP", "--context-parallel-size": "CP",
                         "--expert-model-parallel-size": "EP"}
                name = " x ".join(short[f] + v for f, v in zip(flags[::2], flags[1::2])) or "FSDP only"
                try:
                    plan, _ = make_plan(argv, world_size=world)
                except ConfigError as e:
                    print(f"{model:<17} {world:>3} dev  {name:<12} refused: {str(e)[:90]}")
                    continue
                from omnitune.parallel.estimate import estimate_rank_bytes

                e = estimate_rank_bytes(plan.family, plan.hf_config, plan.dims, set(), bf16=True)
                print(f"{model:<17} {world:>3} dev  {name:<12} DP {plan.dims.dp:<3} state/rank "
                      f"{e.bytes_total / 2**30:7.2f} GiB  largest unit gathered {e.bytes_transient / 2**30:5.2f} GiB")


if __name__ == "__main__":
    main()
