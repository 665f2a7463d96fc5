"""The training loop of the MindSpore back-end: the PyTorch path's data, loss and schedule, one process.

Shared with the PyTorch back-end, unchanged: flag parsing and checks (config/train.py), data.json /
model.json (config/), the data pipeline (datasets, templates, media, collator, the resumable
sampler), the loss types and their token weights (train/loss.py), the learning-rate schedule
(train/optim.py), the Megatron-style log lines and metrics.jsonl (train/metrics.py).

Specific here: the model class and forward of transformers 4.57.6 (families.py), one functional
step (``torch.autograd.value_and_grad`` over the whole global batch: the loss is
``sum_i w_i * l_i`` exactly as the PyTorch step sums its micro-batch backwards), torch's gradient
clipping and AdamW written out (optim.py), the epoch order of torch's generator (randperm.py) and
the portable checkpoints (ckpt.py).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from omnitune.backends.mindspore.patches import scalar
from omnitune.config.errors import ConfigError

#: flags of the PyTorch back-end that this one refuses (name -> why), when set away from their default
_UNSUPPORTED = {
    "tensor_model_parallel_size": "tensor parallelism", "pipeline_model_parallel_size": "pipeline parallelism",
    "context_parallel_size": "context parallelism", "expert_model_parallel_size": "expert parallelism",
    "virtual_pipeline_model_parallel_size": "virtual pipeline stages", "hetero_parallel": "hetero parallelism",
    "init_model_with_meta_device": "meta-device init", "lora_target_modules": "LoRA", "token_budget": "--token-budget",
    "bf16": "bf16 (MindSpore's CPU kernels: train fp32)", "eval_interval": "validation during training",
    "load_base_model": "LoRA", "ref_model": "DPO", "tensorboard_dir": "TensorBoard", "wandb_project": "W&B",
}
DEFAULTS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
            "expert_model_parallel_size": 1}


def check_args(args) -> None:
    for name, what in _UNSUPPORTED.items():
        v = getattr(args, name, None)
        if v in (None, False, DEFAULTS.get(name, None)) or (name == "virtual_pipeline_model_parallel_size" and v == 1):
            continue
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag}: {what} is not available on the MindSpore back-end (one process, fp32: "
                          f"data, loss, AdamW and checkpoints of the PyTorch path); remove {flag} or train with "
                          f"the PyTorch back-end (no --backend mindspore)")


class Trainer:
    def __init__(self, argv: list[str]):
        import torch

        from omnitune.backends.mindspore import ckpt as ms_ckpt
        from omnitune.backends.mindspore.families import adapter_for, load_model
        from omnitune.backends.mindspore.folders import hf4_view
        from omnitune.backends.mindspore.optim import AdamW
        from omnitune.backends.mindspore.processor import MediaProcessor
        from omnitune.config.data import load_data_config, unsupported_features
        from omnitune.config.model import load_model_json, unsupported_settings
        from omnitune.config.train import parse_train_args, resolve_loss_type
        from omnitune.data import Collator, build_datasets
        from omnitune.models.registry import family_for_model_id

        args, _ignored, self.dry_run = parse_train_args(argv)
        check_args(args)
        self.args = a = args
        world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
        if world != 1:
            raise ConfigError(f"WORLD_SIZE={world}: the MindSpore back-end runs one process (MindSpore's "
                              f"collectives need Ascend/GPU communication libraries, not present on CPU); start "
                              f"it without torchrun/msrun, or use the PyTorch back-end for data parallelism")
        self.data_cfg = load_data_config(a.mm_data)
        for p in unsupported_features(self.data_cfg):
            raise ConfigError(f"{a.mm_data}: {p}")
        bp = self.data_cfg.dataset_param.basic_parameters
        if bp.streaming or bp.packing or self.data_cfg.dataset_param.attr.ranking:
            what = "streaming" if bp.streaming else "packing" if bp.packing else "attr.ranking (DPO pairs)"
            raise ConfigError(f"{a.mm_data}: {what} is not available on the MindSpore back-end; remove it or use "
                              f"the PyTorch back-end")
        self.model_cfg = load_model_json(a.mm_model)
        for p in unsupported_settings(self.model_cfg):
            raise ConfigError(f"{a.mm_model}: {p}")
        self.loss_type = resolve_loss_type(a, self.model_cfg, a.mm_model)
        self.family = family_for_model_id(self.model_cfg.model_id)
        hf_dir = (self.model_cfg.init_from_hf_path
                  or self.data_cfg.dataset_param.preprocess_parameters.model_name_or_path)
        self.resume_dir = None
        if a.load:
            lp = Path(a.load)
            if (lp / ms_ckpt.LATEST).is_file():
                self.resume_dir = ms_ckpt.resolve(lp)
            elif (lp / "config.json").is_file():
                hf_dir = hf_dir or str(lp)
                if Path(hf_dir).resolve() != lp.resolve():
                    raise ConfigError(f"--load {a.load}: another HF folder than the original one ({hf_dir}); the "
                                      f"MindSpore back-end starts from the original folder or resumes a save dir")
            else:
                raise ConfigError(f"--load {a.load}: neither an HF folder nor a training save dir "
                                  f"({ms_ckpt.LATEST}); mm-convert layouts load on the PyTorch back-end")
        if not hf_dir or not (Path(hf_dir) / "config.json").is_file():
            raise ConfigError(f"the original HF folder (model.json init_from_hf_path or data.json "
                              f"preprocess_parameters.model_name_or_path) has no config.json: {hf_dir}")
        self.hf_dir = str(Path(hf_dir).resolve())
        view = hf4_view(hf_dir)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(view, trust_remote_code=False)
        self.adapter = adapter_for(self.family.name)
        self.log(f"backend    : mindspore (mindnlp torch layer), transformers {__import__('transformers').__version__}, "
                 f"{self.family.name}, one process, fp32")
        if self.dry_run:
            return

        processor = MediaProcessor(view)
        self.dataset, _ = build_datasets(self.data_cfg, processor, a.seq_length, seed=a.seed)
        self.collate = Collator(processor.tokenizer.pad_token_id,
                                use_audio_in_video=self.data_cfg.dataset_param.preprocess_parameters.use_audio_in_video)
        self.model = load_model(self.adapter, view, config)
        frozen = {n for n, m in self.model_cfg.modules().items() if m.freeze}
        self.trainable = self._freeze(frozen)
        if not self.trainable and not a.enable_dummy_optimizer:
            raise ConfigError("every parameter is frozen (model.json freeze flags): nothing to train. "
                              "Unfreeze a module or pass --enable-dummy-optimizer.")
        self.optimizer = AdamW(self.trainable, a.lr, a.weight_decay, (a.adam_beta1, a.adam_beta2), a.adam_eps)
        self.gbs = a.global_batch_size or a.micro_batch_size
        if self.gbs % a.micro_batch_size:
            raise ConfigError(f"--global-batch-size {self.gbs} must be a multiple of --micro-batch-size "
                              f"{a.micro_batch_size}")
        self.grad_acc = self.gbs // a.micro_batch_size
        self.iteration = self.consumed = 0
        if self.resume_dir is not None:
            self._resume(self.resume_dir)
        from omnitune.backends.mindspore.sampler import TorchOrderSampler
        dl = self.data_cfg.dataloader_param
        self.sampler = TorchOrderSampler(len(self.dataset), a.micro_batch_size, self.gbs, 0, 1, shuffle=dl.shuffle,
                                         seed=a.seed, drop_last=dl.drop_last, consumed_samples=self.consumed)
        torch.manual_seed(a.seed)

    # ------------------------------------------------------------------ model
    def _freeze(self, frozen: set[str]) -> list:
        """model.json freeze flags through the family's module groups (PyTorch-path paths)."""
        ad = self.adapter
        groups = self.family.module_groups()
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            ot = ad.to_omnitune(name)
            group = None
            for g in groups:
                if any(ot.startswith(path + ".") for path in g.paths) and \
                        not any(ot.startswith(ex + ".") for ex in g.exclude):
                    group = g.name
            if group in frozen:
                p.requires_grad_(False)
            else:
                out.append((ot, p))
        return out

    def model_tensors(self) -> dict:
        """Every model tensor once under the PyTorch path's names (a tied alias left out)."""
        seen, out = set(), {}
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            key = id(t)
            if key in seen or not self._persistent(name):
                continue
            seen.add(key)
            out[self.adapter.to_omnitune(name)] = t.detach().numpy()
        return out

    def _persistent(self, name: str) -> bool:
        if "." not in name:
            mod, leaf = self.model, name
        else:
            path, leaf = name.rsplit(".", 1)
            mod = self.model.get_submodule(path)
        return leaf not in getattr(mod, "_non_persistent_buffers_set", set())

    def _resume(self, ckpt: Path) -> None:
        import torch

        from omnitune.backends.mindspore import ckpt as ms_ckpt

        meta, model_t, optim_t = ms_ckpt.read_state(ckpt)
        params = dict(self.model.named_parameters())
        mine = self.model_tensors()
        missing = sorted(set(mine) - set(model_t))
        if missing:
            raise ConfigError(f"--load {ckpt}: lacks {len(missing)} model tensor(s), e.g. {missing[:3]}; it was "
                              f"saved from another model")
        bufs = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, t in list(params.items()) + list(bufs.items()):
                key = self.adapter.to_omnitune(name)
                if key not in model_t:
                    continue
                v = model_t[key]
                if tuple(v.shape) != tuple(t.shape):
                    raise ConfigError(f"--load {ckpt}: {key} has shape {tuple(v.shape)}, this model's is "
                                      f"{tuple(t.shape)}")
                t.copy_(torch.tensor(v, dtype=t.dtype))
        if not self.args.no_load_optim:
            if not meta.get("has_optim", False):
                raise ConfigError(f"--load {ckpt}: the checkpoint holds no optimizer state; add --no-load-optim")
            try:
                self.optimizer.load_state_tensors(optim_t, str(ckpt))
            except ValueError as e:
                raise ConfigError(f"--load {e}") from None
        self.iteration = int(meta.get("iteration", 0))
        self.consumed = int(meta.get("consumed_samples", 0))
        self.log(f"resumed from {ckpt} at iteration {self.iteration} ({self.consumed} samples consumed; "
                 f"written by the {meta.get('backend', 'pytorch')} back-end)")

    # ------------------------------------------------------------------ step
    def train_step(self, micro_batches: list[dict]) -> dict:
        import torch

        from omnitune.backends.mindspore.optim import clip_grad_norm
        from omnitune.train.loss import local_counts, token_losses, token_weights

        counts = local_counts([mb["labels"] for mb in micro_batches])
        n_micro = len(micro_batches)
        for mb in micro_batches:
            mb["loss_weights"] = token_weights(mb["labels"], self.loss_type, micro_batches=n_micro,
                                               global_tokens=scalar(counts[0]), global_samples=scalar(counts[1]))
        lm_head = self.model.lm_head
        ad = self.adapter

        def loss_fn():
            total = None
            for mb in micro_batches:
                hidden = ad.forward_hidden(self.model, mb)
                part, _ = token_losses(hidden, lm_head, mb["labels"], mb["loss_weights"])
                total = part if total is None else total + part
            return total

        params = [p for _, p in self.trainable]
        if params:
            loss, raw = torch.autograd.value_and_grad(loss_fn, params, attach_grads=False)()
            raw = [torch.tensor(g, device=p.device) for g, p in zip(raw, params)]   # MindSpore -> torch layer
            grads, norm = clip_grad_norm(list(raw), self.args.clip_grad)
            self.optimizer.step(grads)
        else:
            with torch.no_grad():
                loss, norm, raw = loss_fn(), 0.0, []
        tokens = sum(scalar(mb["attention_mask"].sum()) for mb in micro_batches)
        return {"loss": scalar(loss), "tokens": tokens, "grad_norm": norm, "grads": list(raw)}

    # ------------------------------------------------------------------ loop
    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def batches(self):
        """The sampler's micro-batches, each tensor re-made from NumPy (patches.py, gap 4)."""
        from omnitune.backends.mindspore.patches import fresh

        for idx in self.sampler:
            yield fresh(self.collate([self.dataset[i] for i in idx]))

    def fit(self, grads_out: str | None = None) -> list[float]:
        from omnitune.train.metrics import Logger
        from omnitune.train.optim import lr_at

        a = self.args
        stop_at = a.train_iters
        if a.exit_interval:
            stop_at = min(stop_at, (self.iteration // a.exit_interval + 1) * a.exit_interval)
        logger = Logger(True, a.train_iters, log_tps=a.log_tps,
                        metrics_file=Path(a.save) / "metrics.jsonl" if a.save else None,
                        start_iteration=self.iteration, progress_bar=False)
        it = self.batches()
        losses = []
        try:
            while self.iteration < stop_at:
                lr = lr_at(self.iteration, lr=a.lr, min_lr=a.min_lr, warmup=a.warmup_iters, total=a.train_iters,
                           style=a.lr_decay_style)
                self.optimizer.lr = lr
                t0 = time.perf_counter()
                stats = self.train_step([next(it) for _ in range(self.grad_acc)])
                dt = time.perf_counter() - t0
                self.iteration += 1
                self.consumed += self.gbs
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at iteration {self.iteration}")
                if grads_out:   # parity tests: the encoders' gradient sums of this step
                    self._write_grads(grads_out, stats["grads"])
                stats.pop("grads")
                losses.append(stats["loss"])
                logger.step(self.iteration, self.consumed, dt, lr, self.gbs, stats,
                            show=self.iteration % a.log_interval == 0)
                if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                    self.save()
            if a.save and (not a.save_interval or self.iteration % a.save_interval != 0):
                self.save()
            import resource
            logger.finish(self.iteration, [{"rank": 0, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                            * 1024}])
        finally:
            logger.close()
        return losses

    def _write_grads(self, path: str, grads: list) -> None:
        """Append {name: [sum, sum of |g|]} of this step's gradients (before clipping), a JSON line."""
        rec = {name: [float(g.numpy().sum(dtype="float64")), float(abs(g.numpy()).sum(dtype="float64"))]
               for (name, _), g in zip(self.trainable, grads)}
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": self.iteration, "grads": rec}) + "\n")

    def save(self) -> None:
        from omnitune.backends.mindspore import ckpt as ms_ckpt

        a = self.args
        state = {"consumed_samples": self.consumed, "train_iters": a.train_iters, "global_batch_size": self.gbs,
                 "seed": a.seed, "model_id": self.model_cfg.model_id, "hf_dir": self.hf_dir, "optim_format": "flat",
                 "scheduler": {"lr": a.lr, "min_lr": a.min_lr, "warmup_iters": a.warmup_iters,
                               "decay_style": a.lr_decay_style, "num_steps": self.iteration}}
        optim = None if a.no_save_optim else {k: v.numpy() for k, v in self.optimizer.state_tensors().items()}
        path = ms_ckpt.save(a.save, self.iteration, self.model_tensors(), optim, state)
        self.log(f"saved checkpoint {path}")
