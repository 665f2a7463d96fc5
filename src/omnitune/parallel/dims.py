"""Parallel dimensions: world = pp x dp x cp x tp, plus an expert dimension carved out of dp x cp.

One :class:`ParallelDims` is resolved from the flags before launch (:meth:`ParallelDims.from_args`),
checked against the model (:meth:`validate`, every rule names its flag and the fix), described by
``--dry-run`` (:meth:`describe`), and in each rank builds its meshes once (:meth:`build`).

Meshes (all over the same ranks, rank = ((pp * dp + d) * cp + c) * tp + t):

- ``mesh``: dims ("pp", "dp", "cp", "tp"), every one present (size 1 allowed). Plus the flattened
  1-D ``mesh["dp_cp"]``: FSDP2 shards the (non-expert) parameters over it, as torchtitan does (a
  context-parallel rank holds other tokens of the same samples, so its gradients are summed with
  the data-parallel ones).
- ``ep_mesh`` (only when ep > 1): dims ("pp", "dp_cp_mod_ep", "ep", "tp") over the same ranks: the
  experts of each MoE layer are split over "ep" and FSDP-sharded over "dp_cp_mod_ep".

Data: the ranks of one (pp, dp) coordinate read the same samples (cp splits their sequence, tp
their weights), so the sampler, streaming shards, loss counts and the checkpoint's data position use
``dp_rank`` / ``dp`` -- never the global rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from omnitune.config.errors import ConfigError

CP_ALGOS = ("ulysses_cp_algo",)


@dataclass
class ParallelDims:
    world: int
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    cp_algo: str = "ulysses_cp_algo"
    #: --hetero-parallel: model.json encoder sections run data-parallel over TP (parallel/hetero.py)
    hetero_dp: tuple = ()
    # set by build()
    mesh: object = field(default=None, repr=False)
    ep_mesh: object = field(default=None, repr=False)
    rank: int = 0

    # ------------------------------------------------------------------ sizes
    @property
    def dp(self) -> int:
        return self.world // (self.pp * self.cp * self.tp)

    @property
    def dp_cp(self) -> int:
        """Ranks FSDP2 shards a non-expert parameter over (and averages its gradient over)."""
        return self.dp * self.cp

    def coords(self, rank: int) -> dict[str, int]:
        t = rank % self.tp
        c = (rank // self.tp) % self.cp
        d = (rank // (self.tp * self.cp)) % self.dp
        p = rank // (self.tp * self.cp * self.dp)
        return {"pp": p, "dp": d, "cp": c, "tp": t}

    @property
    def dp_rank(self) -> int:
        return self.coords(self.rank)["dp"]

    @property
    def cp_rank(self) -> int:
        return self.coords(self.rank)["cp"]

    @property
    def tp_rank(self) -> int:
        return self.coords(self.rank)["tp"]

    def groups(self, dim: str) -> list[list[int]]:
        """The rank lists that form one group of ``dim`` ("tp", "cp", "dp", "pp", "dp_cp", "ep")."""
        out: dict[tuple, list[int]] = {}
        for r in range(self.world):
            c = self.coords(r)
            if dim == "dp_cp":
                key = (c["pp"], c["tp"])
            elif dim == "ep":
                key = (c["pp"], c["tp"], (c["dp"] * self.cp + c["cp"]) // self.ep)
            else:
                key = tuple(v for k, v in c.items() if k != dim)
            out.setdefault(key, []).append(r)
        return list(out.values())

    # ------------------------------------------------------------------ flags
    @classmethod
    def from_args(cls, args, world: int) -> "ParallelDims":
        return cls(world=world, tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
                   ep=args.expert_model_parallel_size, pp=args.pipeline_model_parallel_size,
                   cp_algo=args.context_parallel_algo)

    def check_world(self) -> None:
        """Rules that need only the sizes (no model)."""
        for flag, v in (("--tensor-model-parallel-size", self.tp), ("--context-parallel-size", self.cp),
                        ("--expert-model-parallel-size", self.ep), ("--pipeline-model-parallel-size", self.pp)):
            if v < 1:
                raise ConfigError(f"{flag} {v}: must be >= 1")
        if self.cp > 1 and self.cp_algo not in CP_ALGOS:
            raise ConfigError(f"--context-parallel-algo {self.cp_algo}: only {', '.join(CP_ALGOS)} is implemented "
                              f"(all-to-all over heads); use --context-parallel-algo ulysses_cp_algo")
        if self.pp > 1 and (self.cp > 1 or self.ep > 1):
            raise ConfigError(f"--pipeline-model-parallel-size {self.pp} with "
                              + ("--context-parallel-size" if self.cp > 1 else "--expert-model-parallel-size")
                              + " > 1 is not implemented in this version; use PP with DP and TP, or set PP 1")
        prod = self.pp * self.cp * self.tp
        if self.world % prod:
            raise ConfigError(f"world size {self.world} (nproc_per_node x nnodes) is not divisible by "
                              f"--tensor-model-parallel-size {self.tp} x --context-parallel-size {self.cp} x "
                              f"--pipeline-model-parallel-size {self.pp} = {prod}; change the sizes or the number "
                              f"of processes")
        if self.ep > 1:
            if self.dp_cp % self.ep:
                raise ConfigError(f"--expert-model-parallel-size {self.ep} must divide data-parallel x context-parallel "
                                  f"= {self.dp} x {self.cp} = {self.dp_cp} (experts are spread over those ranks); "
                                  f"use a divisor of {self.dp_cp}")
            if self.tp > 1:
                raise ConfigError(f"--expert-model-parallel-size {self.ep} with --tensor-model-parallel-size {self.tp}: "
                                  f"experts are not tensor-parallel in this version; use TP 1 with EP (EP replaces "
                                  f"TP for the experts) or EP 1")

    def check_batch(self, micro: int, global_batch: int | None, seq_length: int) -> int:
        """Returns the gradient-accumulation steps; global batch = micro x grad-acc x dp."""
        gbs = global_batch or micro * self.dp
        if gbs % (micro * self.dp):
            raise ConfigError(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size {micro} x "
                              f"data-parallel size {self.dp} (= world {self.world} / (TP {self.tp} x CP {self.cp} x "
                              f"PP {self.pp})); e.g. --global-batch-size {micro * self.dp * max(1, gbs // (micro * self.dp))}")
        if self.cp > 1 and seq_length < self.cp:
            raise ConfigError(f"--seq-length {seq_length} is shorter than --context-parallel-size {self.cp}: every "
                              f"context-parallel rank needs at least one token; raise --seq-length")
        return gbs // (micro * self.dp)

    def check_model(self, sizes: dict[str, int]) -> None:
        """Rules against the model's sizes: ``sizes`` from ``family.parallel_sizes(config)``, keys
        heads, kv_heads, vocab, experts (MoE), vision_heads, audio_heads (where the model has them)."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)
        tp, cp = self.tp, self.cp
        if "kv_heads" in sizes:
            need(sizes["kv_heads"] % tp == 0,
                 f"--tensor-model-parallel-size {tp}: the text decoder's {sizes['kv_heads']} key/value heads "
                 f"(num_key_value_heads) are not divisible by it; use a TP size dividing {sizes['kv_heads']}")
        if "heads" in sizes:
            need(sizes["heads"] % (tp * cp) == 0,
                 f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} = {tp * cp} does not divide the "
                 f"{sizes['heads']} attention heads (each TP x CP rank takes whole heads in attention); choose sizes "
                 f"whose product divides {sizes['heads']}")
            if cp > 1 and "kv_heads" in sizes:
                kv = sizes["kv_heads"] // tp
                need(kv % cp == 0 or cp % kv == 0,
                     f"--context-parallel-size {cp}: the {kv} key/value heads per TP rank can be neither split over "
                     f"nor repeated across {cp} context-parallel ranks; use a CP size that divides or is a multiple "
                     f"of {kv}")
        for key, what, section in (("vision_heads", "vision encoder", "image_encoder"),
                                   ("audio_heads", "audio encoder", "audio_encoder")):
            if key in sizes and section not in self.hetero_dp:   # hetero: that encoder is not split
                need(sizes[key] % tp == 0,
                     f"--tensor-model-parallel-size {tp}: the {what}'s {sizes[key]} attention heads are not divisible "
                     f"by it; use a TP size dividing {sizes[key]}")
        if "vocab" in sizes:
            need(sizes["vocab"] % tp == 0,
                 f"--tensor-model-parallel-size {tp}: the vocabulary ({sizes['vocab']}) is not divisible by it "
                 f"(embedding and lm_head are split by vocabulary rows); use a TP size dividing {sizes['vocab']}")
        if self.ep > 1:
            need("experts" in sizes,
                 f"--expert-model-parallel-size {self.ep}: this model has no MoE experts; use "
                 f"--expert-model-parallel-size 1")
            need(sizes["experts"] % self.ep == 0,
                 f"--expert-model-parallel-size {self.ep}: the {sizes.get('experts')} experts per layer are not "
                 f"divisible by it; use a divisor of {sizes.get('experts')}")

    # ------------------------------------------------------------------ meshes
    def build(self, device_type: str) -> "ParallelDims":
        """Create the meshes (collective: every rank calls it once)."""
        from torch.distributed.device_mesh import init_device_mesh

        self.rank = dist.get_rank()
        self.mesh = init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp),
                                     mesh_dim_names=("pp", "dp", "cp", "tp"))
        self.mesh["dp", "cp"]._flatten("dp_cp")
        if self.hetero_dp:   # FSDP2 of the data-parallel encoders (parallel/hetero.py)
            self.mesh["dp", "cp", "tp"]._flatten("dp_cp_tp")
        if self.ep > 1:
            self.ep_mesh = init_device_mesh(device_type, (self.pp, self.dp_cp // self.ep, self.ep, self.tp),
                                            mesh_dim_names=("pp", "dp_cp_mod_ep", "ep", "tp"))
        return self

    def group(self, dim: str):
        """The process group of ``dim`` this rank belongs to."""
        if dim == "ep":
            return self.ep_mesh["ep"].get_group()
        return self.mesh[dim].get_group()

    # ------------------------------------------------------------------ report
    def describe(self) -> list[str]:
        lines = [f"parallel   : world {self.world} = PP {self.pp} x DP {self.dp} x CP {self.cp} x TP {self.tp}"
                 + (f"; EP {self.ep} (experts over DP x CP)" if self.ep > 1 else "")
                 + (f"; CP algo {self.cp_algo}" if self.cp > 1 else "")
                 + f"; FSDP2 shards over DP x CP = {self.dp_cp}"]
        for dim, size in (("tp", self.tp), ("cp", self.cp), ("dp", self.dp), ("ep", self.ep)):
            if size > 1:
                gs = self.groups(dim)
                shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in gs[:8])
                lines.append(f"  {dim} groups : {shown}" + (f" ... ({len(gs)} groups)" if len(gs) > 8 else ""))
        return lines
