"""Chat templates as data, and the encoding of a normalized conversation into ids and labels.

A template says how each turn is wrapped and which tokens stand for an image. Adding a family's
template (qwen2_omni, qwen3_vl, ...) is a new :data:`TEMPLATES` entry, not new code.

Encoding joins the wrapped turns into one string and tokenizes it once, so the ids are exactly what
the HF processor produces for the same conversation (tokenizing turn by turn is not: an answer that
starts with a newline merges with the header's newline into one token). Labels come from the
character offsets of each token: a token is trained when it starts inside a trained turn. Prompt
turns are trained only with train_on_prompt; with mask_history only the last answer is trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnitune.data.formats import DataError

IGNORE_INDEX = -100


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


TEMPLATES: dict[str, Template] = {
    "qwen2vl": Template(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        image=MediaTokens("<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not implemented; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def place_image_tags(template: Template, messages: list[dict], n_images: int, where: str) -> list[dict]:
    """Check the image placeholders of a conversation against its image count.

    Placeholders belong in user turns and their number must equal the number of images; a sample
    with images and no placeholder at all gets them prepended to its first user turn. Literal
    media tokens in the text are refused: they would desynchronize tokens and pixels.
    Returns the (possibly updated) messages; raises DataError naming ``where``.
    """
    img = template.image
    for j, m in enumerate(messages):
        for reserved in (img.start, img.pad, img.end):
            if reserved in m["content"]:
                raise DataError(f"{where}: turn {j} contains the reserved token {reserved}; "
                                f"mark images with {img.placeholder}")
        if m["role"] != "user" and img.placeholder in m["content"]:
            raise DataError(f"{where}: turn {j} ({m['role']}) contains {img.placeholder}; "
                            f"image tags belong in user turns")
    n_tags = sum(m["content"].count(img.placeholder) for m in messages)
    if n_tags == 0 and n_images:
        messages = [dict(m) for m in messages]
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = img.placeholder * n_images + first_user["content"]
    elif n_tags != n_images:
        raise DataError(f"{where}: {n_tags} {img.placeholder} tag(s) but {n_images} image(s); "
                        f"each image needs exactly one tag")
    return messages


def render(template: Template, messages: list[dict], image_token_counts: list[int],
           train_on_prompt: bool = False, mask_history: bool = False) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) segments, image placeholders expanded in order."""
    img = template.image
    counts = iter(image_token_counts)

    def expand(text: str) -> str:
        first, *rest = text.split(img.placeholder)
        return first + "".join(img.start + img.pad * next(counts) + img.end + part for part in rest)

    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else template.default_system
    segments = []
    if system is not None:
        segments.append((template.system.format(content=system), train_on_prompt))
    n_turns = len(msgs) // 2
    for k in range(n_turns):
        user, answer = msgs[2 * k], msgs[2 * k + 1]
        segments.append((template.user.format(content=expand(user["content"])), train_on_prompt))
        trained = not mask_history or k == n_turns - 1
        segments.append((template.assistant.format(content=answer["content"]), trained))
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
