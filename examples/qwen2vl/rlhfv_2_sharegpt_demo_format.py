"""RLHF-V -> DPO pairs json, as in the MindSpeed-MM guides. Run from the folder holding data/:

    python examples/qwen2vl/rlhfv_2_sharegpt_demo_format.py

reads the dataset at ./data/datasets/rlhf-v (HF dataset folder or parquet files), writes images to
./data/rlhf_v_images/res and pairs to ./data/rlhf-v.json. Flags override the paths (--help).
Same as `omnitune data rlhfv-to-dpo`.
"""
import sys

from omnitune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["data", "rlhfv-to-dpo", *sys.argv[1:]]))
