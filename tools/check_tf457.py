"""Does an HF folder load in transformers 4.57 (what vLLM, LLaMA-Factory and MindSpeed-MM pin)?

Run it with the side venv's python (no omnitune import; only torch, transformers, pillow):

    /work/venv457/bin/python tools/check_tf457.py check FOLDER [FOLDER ...]
        loads config, processor (tokenizer + image/video/audio processors) and the model class named
        in config.json, refuses missing or unexpected weights (transformers would silently leave them
        random), runs one forward on an image + text prompt (Omni: the thinker). Prints one JSON line
        per folder; exit 1 when any folder fails.

    /work/venv457/bin/python tools/check_tf457.py resave SRC DST [SRC DST ...]
        DST = SRC written by this transformers: SRC's weights and settings, its config.json adapted
        (transformers 5's ``rope_parameters`` -> ``rope_scaling``), tokenizer and processors rebuilt
        from SRC's files. Use it to make a test input that transformers 4.57 itself saved (a folder
        that transformers 5 wrote does not load in 4.57: that is what it proves).

The tests (tests/test_export_consumers.py) run it with $OMNITUNE_TF4_PYTHON, else
/work/venv457/bin/python, and skip when neither exists.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path


# ------------------------------------------------------------------------------------ check
def _inputs(processor, omni: bool):
    """One user turn with a 56x56 image and a question, through the folder's own chat template."""
    from PIL import Image

    image = Image.new("RGB", (56, 56), (200, 30, 30))
    content = [{"type": "image"}, {"type": "text", "text": "What colour is this square?"}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def _only_buffers(message: str) -> bool:
    """A "newly initialized" list holding only rotary ``inv_freq`` buffers: computed from the config
    at init (4.57 lists them, 5.x does not save them), so nothing is left random."""
    import re

    m = re.search(r"\[([^\]]*)\]", message)
    names = [n.strip(" '\"") for n in m[1].split(",")] if m else []
    return bool(names) and all(n.endswith("inv_freq") for n in names)


def load_model(cls, folder: Path, **kw):
    """``cls.from_pretrained`` in fp32, refusing missing, unused or mismatched weights (transformers
    only logs them and leaves such weights random). Read from its log: 4.57's
    ``output_loading_info`` breaks the Omni full class (it returns a tuple before load_speakers)."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = hf_logging.get_logger("transformers.modeling_utils")
    h = Grab(level=logging.WARNING)
    log.addHandler(h)
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False, **kw)
    finally:
        log.removeHandler(h)
    bad = [m for m in seen if ("not initialized from the model checkpoint" in m and not _only_buffers(m))
           or "were not used when" in m or "size mismatch" in m]
    if bad:
        raise RuntimeError(f"weights do not match {cls.__name__}: {' '.join(bad[0].split())[:400]}")
    return model


def check(folder: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise RuntimeError(f"config.json architectures {config.architectures} is not a transformers "
                           f"{transformers.__version__} class")
    model = load_model(cls, folder)
    omni = hasattr(model, "thinker")
    net = model.thinker if omni else model
    net.eval()
    batch = _inputs(processor, omni)
    with torch.no_grad():
        logits = net(**batch).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the forward gave non-finite logits")
    return {"folder": str(folder), "ok": True, "transformers": transformers.__version__, "class": arch,
            "processor": type(processor).__name__, "tokens": int(batch["input_ids"].shape[1]),
            "logits_shape": list(logits.shape), "logits_sum": float(logits.double().sum())}


# ------------------------------------------------------------------------------------ resave
def _rope_to_v4(node):
    """transformers 5 writes ``rope_parameters`` {rope_type, rope_theta, mrope_section ...}; 4.x
    reads ``rope_theta`` + ``rope_scaling``. Every nested config is adapted in place."""
    if isinstance(node, dict):
        rp = node.pop("rope_parameters", None)
        if isinstance(rp, dict):
            rp = dict(rp)
            if "rope_theta" in rp:
                node.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("mrope_section") is not None or rp.get("rope_type", "default") != "default":
                node["rope_scaling"] = rp
            else:
                node.setdefault("rope_scaling", None)
        for v in node.values():
            _rope_to_v4(v)
    elif isinstance(node, list):
        for v in node:
            _rope_to_v4(v)
    return node


_STANDARD = {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}


def _processor(src: Path, tmp: Path):
    """The processor of SRC rebuilt from its files: tokenizer from tokenizer.json, each
    sub-processor from its section of processor_config.json (transformers 5's single file)."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    if isinstance(tok_cfg.get("extra_special_tokens"), list):  # 5.x list; 4.x wants a dict
        tok_cfg.pop("extra_special_tokens")
    # 5.x writes named media tokens (image_token ...) as top-level keys; 4.x as extra_special_tokens
    named = {k: v for k, v in tok_cfg.items() if k.endswith("_token") and isinstance(v, str) and k not in _STANDARD}
    if named:
        tok_cfg["extra_special_tokens"] = {**tok_cfg.get("extra_special_tokens", {}), **named}
        for k in named:
            tok_cfg.pop(k)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    pc_file = src / "processor_config.json"
    if not pc_file.is_file():
        return AutoProcessor.from_pretrained(src)
    pc = json.loads(pc_file.read_text())
    parts = {}
    for key, kind in (("image_processor", "image_processor_type"), ("video_processor", "video_processor_type"),
                      ("feature_extractor", "feature_extractor_type")):
        sec = pc.pop(key, None)
        if isinstance(sec, dict):
            parts[key] = getattr(transformers, sec[kind])(**{k: v for k, v in sec.items() if k != kind})
    cls = getattr(transformers, pc.pop("processor_class", None) or tok_cfg["processor_class"])
    template = src / "chat_template.jinja"
    chat = template.read_text() if template.is_file() else None
    return cls(tokenizer=tokenizer, chat_template=chat, **parts, **pc)


def resave(src: Path, dst: Path) -> None:
    import torch
    import transformers
    from transformers import AutoConfig

    cfg = _rope_to_v4(json.loads((src / "config.json").read_text()))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        config = AutoConfig.from_pretrained(tmp)
        processor = _processor(src, tmp)
    config.architectures = cfg["architectures"]  # 4.57's Qwen2-VL config drops it when text_config is nested
    cls = getattr(transformers, cfg["architectures"][0])
    model = load_model(cls, src, config=config)
    out = Path(tempfile.mkdtemp(prefix=dst.name + ".tmp-", dir=dst.parent))
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
        fe, ip = getattr(processor, "feature_extractor", None), getattr(processor, "image_processor", None)
        if fe is not None and ip is not None:  # both save to preprocessor_config.json: keep both, as Hub folders do
            (out / "preprocessor_config.json").write_text(json.dumps({**fe.to_dict(), **ip.to_dict()}, indent=2))
        for f in src.iterdir():  # family extras (Qwen2.5-Omni's spk_dict.pt), not weights
            if f.suffix in (".pt", ".pth") and not (out / f.name).exists():
                shutil.copyfile(f, out / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        out.rename(dst)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _one_line(e: BaseException) -> str:
    """The exception (and the one it was raised from or during) on one line."""
    parts = []
    while e is not None and len(parts) < 3:
        parts.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)[:800]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "check":
        failed = 0
        for f in argv[1:]:
            try:
                print(json.dumps(check(Path(f))), flush=True)
            except Exception as e:  # noqa: BLE001 - report every folder, one line each
                failed += 1
                print(json.dumps({"folder": f, "ok": False, "error": _one_line(e)}), flush=True)
        return 1 if failed else 0
    if len(argv) >= 3 and len(argv) % 2 == 1 and argv[0] == "resave":
        for src, dst in zip(argv[1::2], argv[2::2]):
            resave(Path(src), Path(dst))
            print(json.dumps({"resaved": dst}), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
