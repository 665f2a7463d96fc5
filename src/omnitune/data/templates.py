"""Chat templates as data: how each turn is wrapped. Encoding turn by turn keeps labels exact:
prompt tokens get -100 (unless train_on_prompt), mask_history trains only the last answer.

A new template is a new :class:`Template` entry, not new code.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    system: str            # "{content}" -> system block
    user: str              # user turn + assistant header
    assistant: str         # assistant answer
    default_system: str | None
    image_placeholder: str   # tag in the user text
    image_token: str
    vision_start: str
    vision_end: str


TEMPLATES = {
    "qwen2vl": Template(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        image_placeholder="<image>", image_token="<|image_pad|>",
        vision_start="<|vision_start|>", vision_end="<|vision_end|>",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def encode_conversation(tokenizer, template: Template, messages: list[dict], image_token_counts: list[int],
                        train_on_prompt: bool = False, mask_history: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of a normalized conversation. Each ``<image>`` tag in user text becomes
    vision_start + image_token x count + vision_end, counts in order of appearance."""
    counts = iter(image_token_counts)

    def expand(text: str) -> str:
        parts = text.split(template.image_placeholder)
        out = parts[0]
        for part in parts[1:]:
            out += template.vision_start + template.image_token * next(counts) + template.vision_end + part
        return out

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    ids, labels = [], []
    msgs = list(messages)
    system = template.default_system
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]
    if system is not None:
        t = enc(template.system.format(content=system))
        ids += t
        labels += t if train_on_prompt else [IGNORE_INDEX] * len(t)
    n_turns = len(msgs) // 2
    for k in range(n_turns):
        user, answer = msgs[2 * k], msgs[2 * k + 1]
        p = enc(template.user.format(content=expand(user["content"])))
        a = enc(template.assistant.format(content=answer["content"]))
        ids += p + a
        labels += p if train_on_prompt else [IGNORE_INDEX] * len(p)
        trained = not mask_history or k == n_turns - 1
        labels += a if trained else [IGNORE_INDEX] * len(a)
    return ids, labels
