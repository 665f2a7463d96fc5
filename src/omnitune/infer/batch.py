"""Batch mode of ``omnitune generate``: a JSONL file of prompts in, the same lines + "reply" out.

Every line is checked (JSON, keys, types, media files present and decodable) before the model is
loaded, so a bad line fails in seconds and names ``file:line``. Lines are answered one at a time
(batch size 1), so a line's reply is exactly what the single-prompt command gives for it. The
output is written to a temp file and renamed when every line has its reply: an error midway
leaves no half-written output.
"""
from __future__ import annotations

import json
from pathlib import Path

from omnitune.data.templates import KINDS
from omnitune.infer.loader import InferError
from omnitune.infer.prompt import check_media, user_turn

KEYS = {"prompt": "prompt", "system": "system", "image": "images", "video": "videos", "audio": "audios"}


def read_requests(path: str, template, cfg) -> list[tuple[str, dict]]:
    """[(``file:line``, request)] of the non-blank lines. A request is the line's object; its media
    paths are resolved against the input file's folder (so the file moves with its media)."""
    p = Path(path)
    if not p.is_file():
        raise InferError(f"--input-file {path}: no such file; give a JSONL file with one "
                         f'{{"prompt": ..., "images": [...], "videos": [...], "audios": [...]}} per line')
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InferError(f"--input-file {path}: not UTF-8 text ({e}); give a JSONL file") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object "
                             f"per line") from None
        if not isinstance(req, dict):
            raise InferError(f"{where}: a JSON {type(req).__name__}, expected an object with a \"prompt\"")
        if not isinstance(req.get("prompt"), str):
            raise InferError(f"{where}: \"prompt\" is missing or not a string; every line needs "
                             f"{{\"prompt\": \"...\"}}")
        if "system" in req and not isinstance(req["system"], str):
            raise InferError(f"{where}: \"system\" must be a string")
        if "reply" in req:
            raise InferError(f"{where}: already has a \"reply\"; remove it (the output adds it)")
        for kind in KINDS:
            key = KEYS[kind]
            files = req.get(key, [])
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise InferError(f"{where}: \"{key}\" must be a list of file paths")
            if files and template.media(kind) is None:
                raise InferError(f"{where}: \"{key}\": this model reads no {kind}; remove them or use an Omni model")
            for i, f in enumerate(files):
                check_media(kind, str(p.parent / f), f"{where}: {key}[{i}] {f}", cfg)
        user_turn(template, req["prompt"], media_of(req, path), where)
        out.append((where, req))
    if not out:
        raise InferError(f"--input-file {path}: no prompt in it (the file is empty)")
    return out


def media_of(req: dict, input_file: str) -> dict[str, list[str]]:
    base = Path(input_file).parent
    return {kind: [str(base / f) for f in req.get(KEYS[kind], [])] for kind in KINDS}


def run_batch(generator, input_file: str, output_file: str, sampling, system: str | None,
              requests: list[tuple[str, dict]]) -> int:
    """Answer every request; write ``output_file`` (temp + rename). Returns the number of lines."""
    from omnitune.fsutil import write_text_atomic

    lines = []
    for where, req in requests:
        conv = generator.new_conversation(req.get("system", system))
        conv.add_user(generator.template, req["prompt"], media_of(req, input_file), where)
        lines.append(json.dumps({**req, "reply": generator.reply(conv, sampling, where)}, ensure_ascii=False))
    try:
        write_text_atomic(output_file, "".join(line + "\n" for line in lines))
    except OSError as e:
        raise InferError(f"--output-file {output_file}: cannot be written ({e.strerror}); choose a writable "
                         f"path") from None
    return len(lines)
