"""Activation memory of tensor parallelism with and without sequence parallel (parallel/tp.py).

Runs itself under torchrun (``--nproc`` ranks = TP size, gloo, CPU). For each setting (TP without
SP, TP with SP) one training forward + backward of the family's "bench" model on one text sample
of ``--seq`` tokens (plus one image, so the vision tower runs); the bytes of the tensors autograd
saves for backward are counted per rank with ``torch.autograd.graph.saved_tensors_hooks``
(deduplicated by storage; a DTensor counts its local shard), split into the decoder layers and
everything else (embedding, vision, final norm, loss). CPU has no allocator statistics, so the
saved-activation bytes are the measure; step time is printed for information (2 shared cores).

    .venv/bin/python bench/tp_sp_memory.py [--family qwen2_vl] [--seq 2048] [--nproc 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class SavedBytes:
    """Bytes of the distinct storages autograd saves, bucketed by whether a decoder layer runs."""

    def __init__(self, layers):
        self.in_layer = 0
        self.seen: dict[str, set] = {"layers": set(), "other": set()}
        self.bytes = {"layers": 0, "other": 0}
        for layer in layers:
            layer.register_forward_pre_hook(lambda *a: self._enter())
            layer.register_forward_hook(lambda *a: self._leave())

    def _enter(self):
        self.in_layer += 1

    def _leave(self):
        self.in_layer -= 1

    @staticmethod
    def _plain(t):
        from torch.distributed.tensor import DTensor

        while True:
            if isinstance(t, DTensor):
                t = t._local_tensor
            elif hasattr(t, "elem") and isinstance(getattr(t, "elem"), torch.Tensor):  # AsyncCollectiveTensor
                t = t.elem
            else:
                return t

    def pack(self, t):
        p = self._plain(t)
        try:
            st = p.untyped_storage()
            key, nbytes = (st.data_ptr(), st.nbytes()), st.nbytes()
        except (RuntimeError, NotImplementedError):
            key, nbytes = (id(p),), p.numel() * p.element_size()
        bucket = "layers" if self.in_layer else "other"
        if key not in self.seen["layers"] and key not in self.seen["other"]:
            self.seen[bucket].add(key)
            self.bytes[bucket] += nbytes
        return t

    def unpack(self, t):
        return t


def _worker(args) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "tests"))
    from test_tp import make_batch

    from omnitune.config.model import ModelJson
    from omnitune.models.registry import get_family
    from omnitune.parallel.dims import ParallelDims
    from omnitune.parallel.fsdp import apply_fsdp
    from omnitune.parallel.mesh import init_distributed
    from omnitune.parallel.tp import apply_tp
    from omnitune.train.model import TrainModel

    torch.set_num_threads(1)
    d = init_distributed()
    dims = ParallelDims(world=d.world_size, tp=d.world_size).build("cpu")
    fam = get_family(args.family)
    rows = []
    for sp in (False, True):
        torch.manual_seed(0)
        hf = fam.model_class()._from_config(fam.tiny_config(args.size), dtype=torch.float32)
        hf.config.use_cache = False
        batch = make_batch(fam, hf, seed=0, n=1)
        # one long sample: repeat the text after the image up to --seq tokens, all trained
        extra = args.seq - batch["input_ids"].shape[1]
        if extra > 0:
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(100, 5000, (1, extra), generator=g)
            batch["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
            batch["labels"] = torch.cat([batch["labels"], ids], 1)
            batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
            if "mm_token_type_ids" in batch:
                batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"],
                                                        torch.zeros_like(ids, dtype=torch.int32)], 1)
        tm = TrainModel(hf, fam, ModelJson(model_id=fam.model_ids[0]))
        apply_tp(tm, fam, dims.mesh["tp"], sequence_parallel=sp)
        apply_fsdp(tm, fam.fsdp_units(hf), dims.mesh["dp_cp"], False)
        counter = SavedBytes(list(hf.model.language_model.layers))
        times = []
        for it in range(args.repeat + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if it == 0:
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                    loss, n, aux = tm(batch)
            else:
                loss, n, aux = tm(batch)
            (loss / n + aux).backward()
            tm.zero_grad(set_to_none=True)
            dist.barrier()
            if it:
                times.append(time.perf_counter() - t0)
        rows.append((sp, counter.bytes["layers"], counter.bytes["other"], min(times), float(loss.detach() / n)))
    if d.rank == 0:
        t = fam.text_config(hf.config)
        print(f"{args.family} size {args.size}: {t.num_hidden_layers} layers, hidden {t.hidden_size}, seq "
              f"{batch['input_ids'].shape[1]}, TP {d.world_size}; saved activation bytes per rank")
        print(f"{'sequence_parallel':>18} {'decoder layers':>15} {'other':>12} {'total':>12} {'step s':>8} "
              f"{'loss':>10}")
        for sp, lay, oth, dt, lo in rows:
            print(f"{str(sp):>18} {lay / 2**20:12.2f} MiB {oth / 2**20:8.2f} MiB {(lay + oth) / 2**20:8.2f} MiB "
                  f"{dt:8.3f} {lo:10.6f}")
        base, spl = rows[0][1], rows[1][1]
        print(f"decoder-layer saved activations with SP: {spl / base:.3f} x without")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="qwen2_vl")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="timed steps per setting")
    args = ap.parse_args()
    if "RANK" in os.environ:
        return _worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
           str(port), __file__, *sys.argv[1:]]
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
