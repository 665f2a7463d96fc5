"""`omnitune generate` and `omnitune chat`: parsing only; the work is in omnitune.infer."""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate and chat: the model, the prompt format, the decoding."""
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="an HF folder (omnitune export output or an original model) or a training --save dir "
                        "(latest_checkpointed_iteration.txt + iter_*) or one iter_* folder (required)")
    m.add_argument("--model-assets", default=None,
                   help="with a training save dir: the original HF folder to build the model and processor from "
                        "(default: the hf_dir the save recorded)")
    f = p.add_argument_group("prompt format")
    f.add_argument("--mm-data", default=None,
                   help="the training data.json: its template and preprocess_parameters (pixel bounds, video_fps, "
                        "...) are used, so inference sees media as training did (default: the model family's "
                        "template and the data.json defaults)")
    f.add_argument("--system", default=None, help="system prompt (default: the template's, e.g. "
                                                  "'You are a helpful assistant.' for Qwen2-VL)")
    f.add_argument("--use-audio-in-video", action="store_true",
                   help="Omni: give the model each video's sound track too (default: off)")
    d = p.add_argument_group("decoding")
    d.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    d.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    d.add_argument("--temperature", type=float, default=1.0, help="with --do-sample: softmax temperature "
                                                                   "(default: 1.0)")
    d.add_argument("--top-p", type=float, default=1.0, help="with --do-sample: nucleus probability mass "
                                                             "(default: 1.0, off)")
    d.add_argument("--top-k", type=int, default=50, help="with --do-sample: keep the k likeliest tokens, 0 = off "
                                                          "(default: 50)")
    d.add_argument("--seed", type=int, default=1234, help="with --do-sample: random seed, set before each reply "
                                                          "(default: 1234)")


def _quiet() -> None:
    """No per-load weight progress bars: the replies (and one-line errors) are the output."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def _sampling(a):
    from omnitune.infer.generate import Sampling

    s = Sampling(a.max_new_tokens, a.do_sample, a.temperature, a.top_p, a.top_k, a.seed)
    s.check()
    return s


def _fail(e: Exception) -> int:
    print(f"omnitune: error: {e}", file=sys.stderr)
    return 2


def _errors():
    from omnitune.config.errors import ConfigError
    from omnitune.data.formats import DataError
    from omnitune.infer.loader import InferError

    return (InferError, ConfigError, DataError, FileNotFoundError)


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnitune generate",
                                description="Reply to a prompt with images / videos / audios (Omni), or to every "
                                            "line of a JSONL file")
    _common(p)
    q = p.add_argument_group("one prompt")
    q.add_argument("--prompt", default=None, help="the user prompt; <image>/<video>/<audio> in it place the files, "
                                                  "else they go before the text (required without --input-file)")
    q.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several "
                                                                                 "(default: none)")
    q.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file (decoded with PyAV); "
                                                                                 "repeat for several (default: none)")
    q.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="Omni: an audio file (WAV/FLAC/OGG...); repeat for several (default: none)")
    b = p.add_argument_group("batch")
    b.add_argument("--input-file", default=None,
                   help='JSONL, one {"prompt": ..., "images": [...], "videos": [...], "audios": [...]} per line '
                        '(optional "system"); media paths are relative to the file\'s folder (default: none)')
    b.add_argument("--output-file", default=None,
                   help="with --input-file: JSONL written with each input line plus its \"reply\" (default: none)")
    return p


def cmd_generate(argv: list[str]) -> int:
    """One prompt (reply on stdout) or a JSONL file of prompts (--input-file / --output-file).
    Flags, the model folder, the batch lines and every media file are checked before the model
    is loaded; every bad input is one ``omnitune: error:`` line and exit status 2."""
    from omnitune.infer.generate import Generator

    a = generate_parser().parse_args(argv)
    try:
        _check_modes(a)
        sampling = _sampling(a)
        cfg, template = _prompt_config(a)
        if a.input_file is not None:
            from omnitune.infer.batch import read_requests, run_batch

            requests = read_requests(a.input_file, template, cfg)
            _quiet()
            n = run_batch(Generator(a.model, a.model_assets, cfg=cfg), a.input_file, a.output_file, sampling,
                          a.system, requests)
            print(f"{a.output_file}: {n} replies", file=sys.stderr)
            return 0
        media = _checked_media(a, template, cfg)
        _quiet()
        g = Generator(a.model, a.model_assets, cfg=cfg)
        conv = g.new_conversation(a.system)
        conv.add_user(g.template, a.prompt, media, _where(media))
        print(g.reply(conv, sampling, _where(media)))
    except _errors() as e:
        return _fail(e)
    return 0


def _check_modes(a) -> None:
    """One prompt or a batch file, not both, not neither."""
    from omnitune.infer.loader import InferError

    batch = a.input_file is not None
    if batch and (a.prompt is not None or a.image or a.video or a.audio):
        raise InferError("--input-file: the prompts and media come from the file; drop --prompt/--image/--video/"
                         "--audio")
    if batch != (a.output_file is not None):
        raise InferError("--input-file and --output-file go together; give both")
    if not batch and a.prompt is None:
        raise InferError("--prompt: required (or --input-file IN.jsonl --output-file OUT.jsonl)")


def _prompt_config(a):
    """(DataConfig, Template) of the prompts: --mm-data's, else the model family's defaults; the
    family is read from the (original) HF folder's config.json, without loading the model."""
    from transformers import AutoConfig

    from omnitune.data.templates import get_template
    from omnitune.infer.loader import InferError, resolve
    from omnitune.infer.prompt import data_config
    from omnitune.models.registry import family_for_hf_config

    assets, _ = resolve(a.model, a.model_assets)
    try:
        family = family_for_hf_config(AutoConfig.from_pretrained(assets, trust_remote_code=False))
    except ValueError as e:
        raise InferError(f"--model {assets}: {e}; omnitune generates with the Qwen families it trains") from None
    cfg = data_config(family.template, a.mm_data, a.use_audio_in_video)
    return cfg, get_template(cfg.dataset_param.basic_parameters.template)


def _checked_media(a, template, cfg) -> dict[str, list[str]]:
    from omnitune.infer.loader import InferError
    from omnitune.infer.prompt import check_media, user_turn

    media = {"image": a.image, "video": a.video, "audio": a.audio}
    for kind, files in media.items():
        if files and template.media(kind) is None:
            raise InferError(f"--{kind}: this model reads no {kind}; remove it or use an Omni model")
        for f in files:
            check_media(kind, f, f"--{kind} {f}", cfg)
    user_turn(template, a.prompt, media, _where(media))
    return media


def _where(media: dict[str, list[str]]) -> str:
    """How one-prompt errors name the input: the media flags given, else --prompt."""
    return "/".join(f"--{k}" for k in media if media[k]) or "--prompt"


def chat_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnitune chat",
                                description="Interactive session on stdin: each line a prompt; /image PATH, "
                                            "/video PATH, /audio PATH attach a file to the next prompt; /reset "
                                            "forgets the conversation; /exit ends")
    _common(p)
    return p


def cmd_chat(argv: list[str], stdin=None, stdout=None, stderr=None) -> int:
    from omnitune.infer.chat import run_chat
    from omnitune.infer.generate import Generator

    a = chat_parser().parse_args(argv)
    inp, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        sampling = _sampling(a)
        cfg, _ = _prompt_config(a)
        _quiet()
        g = Generator(a.model, a.model_assets, cfg=cfg)
    except _errors() as e:
        print(f"omnitune: error: {e}", file=err)
        return 2
    interactive = hasattr(inp, "isatty") and inp.isatty()
    return run_chat(g, sampling, a.system, inp, out, err, interactive)
