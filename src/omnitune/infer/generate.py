"""Text generation with a fine-tuned model: ``omnitune generate`` / ``omnitune chat``.

:class:`Generator` = the loaded model (infer.loader) + the prompt encoder (infer.prompt) + the
sampling settings. It calls the HF model's own ``generate`` (Omni: the thinker's), with every
setting passed explicitly so a folder's generation_config.json (Qwen's ships sampling on) never
silently changes greedy decoding; stop tokens are the folder's eos ids plus the template's
end-of-turn token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnitune.infer.loader import InferError, load
from omnitune.infer.prompt import Conversation, PromptEncoder, data_config


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 1234

    def check(self) -> None:
        """Flag values generate() would refuse or misread, as flag errors."""
        if self.max_new_tokens < 1:
            raise InferError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature <= 0:
            raise InferError(f"--temperature {self.temperature}: must be > 0 (for greedy decoding leave out "
                             f"--do-sample)")
        if not 0 < self.top_p <= 1:
            raise InferError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise InferError(f"--top-k {self.top_k}: must be >= 0 (0 turns top-k filtering off)")

    def kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


class Generator:
    """One loaded model answering conversations."""

    def __init__(self, model: str | Path, model_assets: str | Path | None = None, mm_data: str | None = None,
                 use_audio_in_video: bool = False, cfg=None):
        self.loaded = load(model, model_assets)
        family = self.loaded.family
        self.cfg = cfg or data_config(family.template, mm_data, use_audio_in_video)
        self.prompts = PromptEncoder(self.loaded.processor, self.cfg, family.forward_batch_keys)
        tok = self.loaded.processor.tokenizer
        eos = self.loaded.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        end_turn = tok.convert_tokens_to_ids("<|im_end|>")
        self.eos = list(dict.fromkeys(eos + ([end_turn] if end_turn is not None else [])))
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos[0]
        self.tokenizer = tok

    @property
    def template(self):
        return self.prompts.template

    def new_conversation(self, system: str | None = None) -> Conversation:
        return Conversation(system=system if system is not None else self.prompts.default_system())

    def reply_ids(self, conv: Conversation, sampling: Sampling, where: str) -> list[int]:
        """The generated token ids (without the prompt, without the stop token)."""
        inputs = self.prompts.inputs(conv, where)
        if sampling.do_sample:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.loaded.model.generate(**inputs, max_new_tokens=sampling.max_new_tokens,
                                             eos_token_id=self.eos, pad_token_id=self.pad, **sampling.kwargs())
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        while new and new[-1] in self.eos:
            new.pop()
        return new

    def reply(self, conv: Conversation, sampling: Sampling, where: str) -> str:
        return self.tokenizer.decode(self.reply_ids(conv, sampling, where), skip_special_tokens=True)


def generate(model_dir: str | Path, prompt: str, image: str | None = None, max_new_tokens: int = 64,
             mm_data: str | None = None) -> str:
    """Greedy reply to one prompt (with at most one image): the demo's call. ``mm_data``: the
    training data.json, so the image is sized as training sized it."""
    g = Generator(model_dir, mm_data=mm_data)
    conv = g.new_conversation()
    where = f"--image {image}" if image else "--prompt"
    conv.add_user(g.template, prompt, {"image": [image] if image else []}, where)
    return g.reply(conv, Sampling(max_new_tokens=max_new_tokens), where)
