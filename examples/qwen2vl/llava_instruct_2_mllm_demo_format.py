"""LLaVA-Instruct-150K -> mllm json, as in the MindSpeed-MM guides. Run from the folder holding data/:

    python examples/qwen2vl/llava_instruct_2_mllm_demo_format.py

reads ./data/llava_instruct_150k.json and images under ./data/COCO2017/train2017/, writes
./data/mllm_format_llava_instruct_data.json. Flags override the paths (--help).
Same as `omnitune data llava-to-mllm`.
"""
import sys

from omnitune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["data", "llava-to-mllm", *sys.argv[1:]]))
