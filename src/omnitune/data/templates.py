"""Chat templates as data, and the encoding of a normalized conversation into ids and labels.

A template says how each turn is wrapped and how each media placeholder (``<image>``, ``<video>``,
``<audio>``) expands into the tokens the family's HF processor puts in its place. Adding a family's
template is a new :data:`TEMPLATES` entry, not new code; the few ways families differ in media
expansion are fields of the entry (``video_layout``, ``video_pixels_per``, ``audio_rule``,
``audio_in_video``).

Encoding joins the wrapped turns into one string and tokenizes it once, so the ids are exactly what
the HF processor produces for the same conversation (tokenizing turn by turn is not: an answer that
starts with a newline merges with the header's newline into one token). Labels come from the
character offsets of each token: a token is trained when it starts inside a trained turn. Prompt
turns are trained only with train_on_prompt; with mask_history only the last answer is trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from omnitune.data.formats import DataError

IGNORE_INDEX = -100
KINDS = ("image", "video", "audio")


@dataclass(frozen=True)
class MediaTokens:
    """How one media kind appears: a placeholder in the data, expanded to start + pad x n + end."""
    placeholder: str
    start: str
    pad: str
    end: str


@dataclass(frozen=True)
class Template:
    system: str                  # "{content}" -> the system block
    user: str                    # user turn, followed by the assistant header
    assistant: str               # the answer
    default_system: str | None   # used when the sample has no system prompt
    image: MediaTokens
    video: MediaTokens
    audio: MediaTokens | None = None
    # "flat": start + pad x t*h*w/merge^2 + end. "frames" (Qwen3-VL): per temporal step
    # "<{sec:.1f} seconds>" + start + pad x h*w/merge^2 + end, with no start/end around the whole
    # video (as Qwen's own processor, LLaMA-Factory / MindSpeed-MM's Qwen3VLPlugin and transformers
    # >= 5.25, which collapses the chat template's wrapper; 5.0-5.24 nested the frames in it).
    video_layout: str = "flat"
    # How the family's video processor reads its pixel bounds: per "frame" or per "clip" (Qwen3-VL).
    video_pixels_per: str = "frame"
    # Audio features and token count: None (no audio), "qwen2_omni" (features padded to the Whisper
    # extractor's window, 300 s in the real checkpoint, and cut there) or "qwen3_omni" (no window).
    audio_rule: str | None = None
    # use_audio_in_video: "chunked" (Qwen2.5-Omni: per seconds_per_chunk, the chunk's video tokens then
    # its audio tokens) or "interleaved" (Qwen3-Omni: token by token in time order). None: unsupported.
    audio_in_video: str | None = None
    # Reasoning template (Qwen3 *_think): enable_thinking false -> an empty thought closes every prompt
    # (untrained) and thoughts are removed from answers; true -> answers without a thought get the
    # empty thought (trained). As LLaMA-Factory / MindSpeed-MM's ReasoningTemplate.
    reasoning: bool = False
    thought: tuple[str, str] = ("<think>\n", "\n</think>\n\n")

    def media(self, kind: str) -> MediaTokens | None:
        return getattr(self, kind)

    @property
    def reserved_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for k in KINDS if self.media(k) is not None
                                   for t in (self.media(k).start, self.media(k).pad, self.media(k).end)))


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>\n",
)

_VISION = dict(image=MediaTokens("<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
               video=MediaTokens("<video>", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"))
_QWEN3_VL = dict(**_CHATML, **_VISION, default_system=None, video_layout="frames", video_pixels_per="clip")
_QWEN2_OMNI = dict(
    **_CHATML, default_system="You are a helpful assistant.",
    image=MediaTokens("<image>", "<|vision_bos|>", "<|IMAGE|>", "<|vision_eos|>"),
    video=MediaTokens("<video>", "<|vision_bos|>", "<|VIDEO|>", "<|vision_eos|>"),
    audio=MediaTokens("<audio>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
    audio_rule="qwen2_omni", audio_in_video="chunked")
_QWEN3_OMNI = dict(**_CHATML, **_VISION, default_system=None,
                   audio=MediaTokens("<audio>", "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"),
                   audio_rule="qwen3_omni", audio_in_video="interleaved")

# Each entry renders exactly as the family's real chat template (models/<family>/spec.py) + its HF
# processor; the reasoning variants add the empty thought as described on Template.reasoning.
TEMPLATES: dict[str, Template] = {
    "qwen2vl": Template(**_CHATML, **_VISION, default_system="You are a helpful assistant."),
    "qwen2_omni": Template(**_QWEN2_OMNI),
    "qwen3_vl": Template(**_QWEN3_VL, reasoning=True),
    "qwen3_vl_nothink": Template(**_QWEN3_VL),
    "qwen3_omni": Template(**_QWEN3_OMNI, reasoning=True),
    "qwen3_omni_nothink": Template(**_QWEN3_OMNI),
}


# Which templates render each model family (registry name) as its own chat template and processor
# do. Other pairs can share every special token (qwen3_vl and qwen2vl both use <|vision_start|>,
# <|image_pad|>) and would train silently on the wrong prompt format, so they are refused.
FAMILY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("qwen2vl",),
    "qwen2_5_vl": ("qwen2vl",),
    "qwen2_5_omni": ("qwen2_omni",),
    "qwen3_vl": ("qwen3_vl", "qwen3_vl_nothink"),
    "qwen3_vl_moe": ("qwen3_vl", "qwen3_vl_nothink"),
    "qwen3_omni_moe": ("qwen3_omni", "qwen3_omni_nothink"),
}


def check_template_fits(template: str, family: str, source: str, hf_dir: str) -> None:
    """Refuse a data.json template that is not one of the model family's (both named)."""
    from omnitune.config.errors import ConfigError

    fits = FAMILY_TEMPLATES.get(family)
    if fits is not None and template not in fits:
        raise ConfigError(f"{source}: basic_parameters.template {template!r} does not fit the model family "
                          f"{family} ({hf_dir}); use {' or '.join(repr(t) for t in fits)}")


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not implemented; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ------------------------------------------------------------------------------------ token counts
def audio_token_count(rule: str, feature_frames: int) -> int:
    """Audio tokens the family's audio encoder gives for ``feature_frames`` log-mel frames."""
    if rule == "qwen2_omni":
        return ((feature_frames - 1) // 2 + 1 - 2) // 2 + 1
    if rule == "qwen3_omni":
        chunk = 100  # n_window * 2
        rest = feature_frames % chunk
        feat = (rest - 1) // 2 + 1
        return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (feature_frames // chunk) * 13
    raise ValueError(f"unknown audio rule {rule!r}")


def expand_image(t: Template, grid: tuple[int, int, int], merge: int) -> str:
    tt, h, w = grid
    return t.image.start + t.image.pad * (tt * h * w // merge ** 2) + t.image.end


def expand_audio(t: Template, n_tokens: int) -> str:
    return t.audio.start + t.audio.pad * n_tokens + t.audio.end


def frame_timestamps(indices: tuple[int, ...], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal grid step: mean time of its first and last frame (the last frame is
    repeated to fill the final step), as Qwen3-VL's processor computes them."""
    idx = list(indices)
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    ts = [i / fps for i in idx]
    return [(ts[k] + ts[k + temporal_patch_size - 1]) / 2 for k in range(0, len(ts), temporal_patch_size)]


def _chunks(positions: np.ndarray, per_chunk: int) -> list[int]:
    """Sizes of consecutive runs of ``positions`` (increasing) falling in [k*per_chunk, (k+1)*per_chunk)."""
    sizes, start, bound = [], 0, per_chunk
    for i, p in enumerate(positions):
        if p >= bound:
            sizes.append(i - start)
            start, bound = i, bound + per_chunk
    sizes.append(len(positions) - start)
    return sizes


def expand_video(t: Template, grid: tuple[int, int, int], merge: int, *, indices=(), fps: float = 1.0,
                 temporal_patch_size: int = 2, second_per_grid: float = 1.0,
                 audio_tokens: int | None = None, position_id_per_seconds: float = 25.0,
                 seconds_per_chunk: float = 2.0) -> str:
    """The text a video placeholder becomes. ``audio_tokens`` (use_audio_in_video) interleaves the
    video's own audio tokens with its frames in time order, as the family's Omni processor does
    (``position_id_per_seconds`` / ``seconds_per_chunk``: the processor's)."""
    v = t.video
    tt, h, w = grid
    per_step = h * w // merge ** 2
    if audio_tokens is not None:
        a = t.audio
        video_pos = np.repeat(np.arange(tt) * second_per_grid * position_id_per_seconds, per_step)
        body = a.start
        if t.audio_in_video == "chunked":
            per_chunk = int(position_id_per_seconds * seconds_per_chunk)
            vs, as_ = _chunks(video_pos, per_chunk), _chunks(np.arange(audio_tokens), per_chunk)
            for j in range(max(len(vs), len(as_))):
                body += v.pad * (vs[j] if j < len(vs) else 0) + a.pad * (as_[j] if j < len(as_) else 0)
        elif t.audio_in_video == "interleaved":
            i = j = 0
            parts = []
            while i < len(video_pos) and j < audio_tokens:
                if video_pos[i] <= j:
                    parts.append(v.pad)
                    i += 1
                else:
                    parts.append(a.pad)
                    j += 1
            body += "".join(parts) + v.pad * (len(video_pos) - i) + a.pad * (audio_tokens - j)
        else:
            raise ValueError("this template has no use_audio_in_video rule")
        return v.start + body + a.end + v.end
    if t.video_layout == "frames":
        stamps = frame_timestamps(indices, fps, temporal_patch_size)
        return "".join(f"<{s:.1f} seconds>" + v.start + v.pad * per_step + v.end for s in stamps[:tt])
    return v.start + v.pad * (tt * per_step) + v.end


# ------------------------------------------------------------------------------------ placeholders
def place_media_tags(template: Template, messages: list[dict], counts: dict[str, int], where: str) -> list[dict]:
    """Check the media placeholders of a conversation against its media counts.

    Placeholders belong in user turns and, per kind, their number must equal the number of media;
    a sample with media of a kind and no placeholder of that kind at all gets them prepended to its
    first user turn (images, then videos, then audios). Literal media tokens in the text are
    refused: they would desynchronize tokens and media.
    Returns the (possibly updated) messages; raises DataError naming ``where``.
    """
    reserved = template.reserved_tokens
    kinds = [k for k in KINDS if template.media(k) is not None]
    for j, m in enumerate(messages):
        for tok in reserved:
            if tok in m["content"]:
                raise DataError(f"{where}: turn {j} contains the reserved token {tok}; mark media with "
                                f"{'/'.join(template.media(k).placeholder for k in kinds)}")
        for k in kinds:
            ph = template.media(k).placeholder
            if m["role"] != "user" and ph in m["content"]:
                raise DataError(f"{where}: turn {j} ({m['role']}) contains {ph}; media tags belong in user turns")
    prepend = ""
    for k in KINDS:
        n = counts.get(k, 0)
        if template.media(k) is None:
            if n:
                raise DataError(f"{where}: has {n} {k}(s) but template {_name(template)!r} takes no {k}; "
                                f"use a template of a model that reads {k}s")
            continue
        ph = template.media(k).placeholder
        n_tags = sum(m["content"].count(ph) for m in messages)
        if n_tags == 0 and n:
            prepend += ph * n
        elif n_tags != n:
            raise DataError(f"{where}: {n_tags} {ph} tag(s) but {n} {k}(s); each {k} needs exactly one tag")
    if prepend:
        messages = [dict(m) for m in messages]
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = prepend + first_user["content"]
    return messages


def place_image_tags(template: Template, messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Images only: :func:`place_media_tags` with no video or audio."""
    return place_media_tags(template, messages, {"image": n_images}, where)


def _name(template: Template) -> str:
    return next((k for k, v in TEMPLATES.items() if v is template), "?")


def _placeholder_re(template: Template) -> re.Pattern:
    phs = [template.media(k).placeholder for k in KINDS if template.media(k) is not None]
    return re.compile("|".join(re.escape(p) for p in phs))


def remove_thought(template: Template, text: str) -> str:
    start, end = template.thought
    return re.sub(re.escape(start) + "(.*?)" + re.escape(end), "", text, flags=re.DOTALL).lstrip("\n")


def render(template: Template, messages: list[dict], expansions, train_on_prompt: bool = False,
           mask_history: bool = False, enable_thinking: bool | None = None) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) segments, media placeholders expanded in order.

    ``expansions``: {kind: [expanded text of each media of that kind, in order]}; a plain list is
    read as image pad-token counts (the images-only form). ``enable_thinking`` (reasoning templates
    only; None means true): see :attr:`Template.reasoning`."""
    if not isinstance(expansions, dict):
        expansions = {"image": [template.image.start + template.image.pad * n + template.image.end
                                for n in expansions]}
    by_placeholder = {template.media(k).placeholder: iter(expansions.get(k, ()))
                      for k in KINDS if template.media(k) is not None}
    pattern = _placeholder_re(template)

    def expand(text: str) -> str:
        return pattern.sub(lambda m: next(by_placeholder[m.group(0)]), text)

    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else template.default_system
    segments = []
    if system is not None:
        segments.append((template.system.format(content=system), train_on_prompt))
    thinking = enable_thinking is not False
    empty_thought = "".join(template.thought)
    n_turns = len(msgs) // 2
    for k in range(n_turns):
        user, answer = msgs[2 * k], msgs[2 * k + 1]["content"]
        prompt = template.user.format(content=expand(user["content"]))
        if template.reasoning:
            if not thinking:
                answer = remove_thought(template, answer)
            if template.thought[0].strip() not in answer and template.thought[1].strip() not in answer:
                if thinking:
                    answer = empty_thought + answer
                else:
                    prompt += empty_thought
        segments.append((prompt, train_on_prompt))
        trained = not mask_history or k == n_turns - 1
        segments.append((template.assistant.format(content=answer), trained))
    return segments


def encode(tokenizer, conversations: list[list[tuple[str, bool]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) int64 arrays of rendered conversations, tokenized in one batch call.

    A token is labelled with its id when it starts inside a trained segment, else IGNORE_INDEX.
    ``tokenizer`` must be a fast tokenizer (it reports character offsets).
    """
    texts = ["".join(text for text, _ in segments) for segments in conversations]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for segments, ids, offsets in zip(conversations, enc["input_ids"], enc["offset_mapping"]):
        ids = np.asarray(ids, dtype=np.int64)
        seg_ends = np.cumsum([len(text) for text, _ in segments])
        trained = np.array([t for _, t in segments])
        starts = np.array([start for start, _ in offsets], dtype=np.int64)
        seg = np.minimum(np.searchsorted(seg_ends, starts, side="right"), len(segments) - 1)
        out.append((ids, np.where(trained[seg], ids, IGNORE_INDEX)))
    return out
