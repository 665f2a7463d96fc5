"""Table-driven keymaps: a family's keymap.py lists renames and fusions; this class applies them.

A :class:`TableKeymap` instance offers the keymap interface the converters and the trainer use
(``hf_to_mm``, ``mm_to_hf``, ``tp_rule``, ``modules``, ``Sizes`` ...; see ``engine``). What the
tables say (names, which weights fuse, head counts) is the family's knowledge; how to apply a
table is not, so it lives here.

Fusions (HF -> mm; each is undone exactly by mm -> HF):
- ``Rename(hf, mm)``: prefix regexes with ``{i}`` for a layer index; the rest of the key is kept.
- ``Merge(kind, parts, mm)``: HF keys ``parts`` (templates with ``{i}`` and ``{p}`` = weight/bias)
  -> one mm key. kind ``glu``: cat([gate, up]); ``qkv``: [q_g, k_g, v_g] per group g (groups and row
  counts from the sizes); ``qv``: like qkv with a zero k part (audio k_proj has no bias); ``perhead``:
  one HF tensor [q | k | v] re-laid per head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from omnitune.convert.layout import ConvertError, ModuleSchema, cat_rows, deinterleave_qkv, flat, interleave_qkv


@dataclass(frozen=True)
class Rename:
    hf: str      # e.g. "visual.blocks.{i}.attn.proj"
    mm: str      # e.g. "image_encoder.encoder.blocks.layers.{i}.self_attention.linear_proj"


@dataclass(frozen=True)
class Merge:
    kind: str                                  # glu | qkv | qv | perhead
    parts: tuple[str, ...]                     # HF templates with {i} and {p}
    mm: str                                    # mm template with {i} and {p}
    groups: Optional[Callable] = None          # sizes -> number of groups (qkv/qv/perhead)
    rows: Optional[Callable] = None            # sizes -> (q, k, v) rows per group (qkv/qv)
    params: tuple[str, ...] = ("weight", "bias")


def _regex(template: str, tail: bool, params: tuple[str, ...] = ("weight", "bias")) -> re.Pattern:
    s = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", f"(?P<p>{'|'.join(params)})")
    return re.compile(s + (r"(?P<rest>\..+)" if tail else ""))


class Sizes(SimpleNamespace):
    """Structure sizes read from config.json (attribute access; 0 = unknown)."""


@dataclass
class TableKeymap:
    name: str
    renames: list[Rename]
    merges: list[Merge]
    tp_rules: list[tuple[str, str]]            # (mm regex, column|row|glu)
    module_schemas: Callable[[Sizes], list[ModuleSchema]]
    sizes_from_config: Callable[[dict], Sizes]
    divisibility: Callable[[Sizes], list[tuple[str, int, str]]]
    layout_fields: dict[str, str]              # ParallelConfig pp field -> Sizes attribute with the layer count
    aliases: list[tuple[str, str]] = field(default_factory=list)   # (new-style prefix, legacy prefix)
    folder_prefix: str = ""                    # e.g. "thinker.": the HF folder holds more than the mm checkpoint
    OUTPUT_LAYER: str = "text_decoder.output_layer.weight"
    WORD_EMBEDDINGS: str = "text_decoder.embedding.word_embeddings.weight"

    def __post_init__(self):
        self._ren = [(_regex(r.hf, True), r.mm) for r in self.renames]
        self._ren_inv = [(_regex(r.mm, True), r.hf) for r in self.renames]
        self._merge_hf = [[_regex(p, False, m.params) for p in m.parts] for m in self.merges]
        self._merge_mm = [_regex(m.mm, False, m.params) for m in self.merges]
        self._tp = [(re.compile(p), k) for p, k in self.tp_rules]
        self.Sizes = SimpleNamespace(from_config=self.sizes_from_config)

    # ------------------------------------------------------------------ interface
    def modules(self, sizes) -> list[ModuleSchema]:
        return self.module_schemas(sizes)

    def tp_divisibility(self, sizes) -> list[tuple[str, int, str]]:
        return self.divisibility(sizes)

    def sizes_from_layout(self, parallel) -> Sizes:
        s = Sizes(heads=0, kv_heads=0, head_dim=0, vit_heads=0, vit_dim=0, audio_heads=0, audio_dim=0, tie=False)
        for pp_field, attr in self.layout_fields.items():
            v = getattr(parallel, pp_field)
            setattr(s, attr, sum(flat(v)) if v is not None else 0)
        return s

    def tp_rule(self, mm_key: str) -> Optional[str]:
        for p, kind in self._tp:
            if p.fullmatch(mm_key):
                return kind
        return None

    def is_mm_hf_key(self, key: str) -> bool:
        return key.startswith(self.folder_prefix) if self.folder_prefix else True

    def normalize_hf_keys(self, sd: dict) -> tuple[dict, bool]:
        """Folder (or model) names -> legacy names without the folder prefix; (sd, had new-style names)."""
        out, new = {}, False
        for k, v in sd.items():
            if self.folder_prefix and k.startswith(self.folder_prefix):
                k = k[len(self.folder_prefix):]
            for a, b in self.aliases:
                if k.startswith(a):
                    k, new = b + k[len(a):], True
                    break
            out[k] = v
        return out, new

    def denormalize_hf_key(self, k: str) -> str:
        for a, b in self.aliases:
            if k.startswith(b):
                return a + k[len(b):]
        return k

    def to_folder_key(self, k: str, new_style: bool) -> str:
        return self.folder_prefix + (self.denormalize_hf_key(k) if new_style else k)

    def model_keys_to_hf(self, sd: dict) -> dict:
        return self.normalize_hf_keys(sd)[0]

    def hf_key_to_model_key(self, k: str) -> str:
        return self.denormalize_hf_key(k)

    # ------------------------------------------------------------------ conversions
    def hf_to_mm(self, hf: dict, sizes, pp_size: int) -> dict:
        hf, _ = self.normalize_hf_keys(hf)
        out: dict = {}
        buckets: dict[tuple, dict[int, torch.Tensor]] = {}
        for key, t in hf.items():
            for mi, pats in enumerate(self._merge_hf):
                hit = next(((pi, m) for pi, p in enumerate(pats) if (m := p.fullmatch(key))), None)
                if hit is not None:
                    pi, m = hit
                    gd = m.groupdict()
                    buckets.setdefault((mi, gd.get("i"), gd.get("p")), {})[pi] = t
                    break
            else:
                out[self._rename(key, self._ren, "HF")] = t
        for (mi, i, p), parts in buckets.items():
            mg = self.merges[mi]
            if len(parts) != len(mg.parts):
                missing = [mg.parts[j].format(i=i, p=p) for j in range(len(mg.parts)) if j not in parts]
                raise ConvertError(f"{self.name}: HF weights {missing} are missing (needed to build "
                                   f"{mg.mm.format(i=i, p=p)})")
            out[mg.mm.format(i=i, p=p)] = self._merge(mg, [parts[j] for j in range(len(mg.parts))], sizes)
        if sizes.tie and pp_size > 1 and self.OUTPUT_LAYER not in out and self.WORD_EMBEDDINGS in out:
            out[self.OUTPUT_LAYER] = out[self.WORD_EMBEDDINGS]
        return out

    def mm_to_hf(self, mm: dict, sizes) -> dict:
        """-> legacy HF names without the folder prefix (output_layer kept as lm_head)."""
        out = {}
        for key, t in mm.items():
            for mi, pat in enumerate(self._merge_mm):
                if m := pat.fullmatch(key):
                    mg = self.merges[mi]
                    gd = m.groupdict()
                    for part, x in zip(mg.parts, self._split(mg, t, sizes)):
                        out[part.format(i=gd.get("i"), p=gd.get("p"))] = x
                    break
            else:
                out[self._rename(key, self._ren_inv, "mm")] = t
        return out

    # ------------------------------------------------------------------ helpers
    def _rename(self, key: str, table, what: str) -> str:
        for p, tpl in table:
            if m := p.fullmatch(key):
                gd = m.groupdict()
                return tpl.format(i=gd.get("i")) + gd["rest"]
        raise ConvertError(f"{what} weight {key!r} is not known to the {self.name} keymap")

    def _merge(self, mg: Merge, ts: list[torch.Tensor], sizes) -> torch.Tensor:
        if mg.kind == "glu":
            return cat_rows(ts)
        if mg.kind == "qkv":
            return interleave_qkv(*ts, groups=mg.groups(sizes))
        if mg.kind == "qv":
            q, v = ts
            return interleave_qkv(q, torch.zeros_like(q), v, groups=mg.groups(sizes))
        if mg.kind == "perhead":
            (t,) = ts
            return interleave_qkv(*torch.chunk(t, 3, dim=0), groups=mg.groups(sizes))
        raise ValueError(mg.kind)

    def _split(self, mg: Merge, t: torch.Tensor, sizes) -> list[torch.Tensor]:
        if mg.kind == "glu":
            return [x.contiguous() for x in torch.chunk(t, len(mg.parts), dim=0)]
        g = mg.groups(sizes)
        if mg.kind in ("qkv", "qv"):
            rows = mg.rows(sizes) if mg.rows else (t.shape[0] // g // 3,) * 3
            q, k, v = (x.contiguous() for x in deinterleave_qkv(t, g, rows))
            return [q, k, v] if mg.kind == "qkv" else [q, v]
        if mg.kind == "perhead":
            r = t.shape[0] // g // 3
            return [torch.cat(deinterleave_qkv(t, g, (r, r, r)), dim=0)]
        raise ValueError(mg.kind)
