"""AdamW with torch's exact update, and torch's gradient-norm clipping, on mindnlp's torch layer.

``torch.optim.AdamW.step`` fails there (``addcdiv`` has no CPU kernel). This is the update of
torch's AdamW (the foreach path the PyTorch back-end uses, train/optim.py), operation for operation::

    step += 1
    p     *= 1 - lr * weight_decay
    m     += (1 - beta1) * (g - m)                    # lerp(m, g, 1 - beta1), weight < 0.5
    v      = v * beta2 + (1 - beta2) * g * g          # addcmul
    denom  = sqrt(v) / sqrt(1 - beta2 ** step) + eps
    p     += (-lr / (1 - beta1 ** step)) * m / denom  # addcdiv

Parameter groups as the PyTorch back-end builds them: weight decay on tensors of 2 or more
dimensions, none on biases and norm weights. State per parameter: ``exp_avg``, ``exp_avg_sq``,
``step`` (a float32 scalar, as torch keeps it), saved under torch's flat names.
"""
from __future__ import annotations

import math


class AdamW:
    def __init__(self, named_params: list[tuple[str, object]], lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float):
        import torch

        self.params = named_params           # [(PyTorch-path name, parameter)]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.state = {name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                             "step": torch.zeros((), dtype=torch.float32)} for name, p in named_params}

    def step(self, grads: list) -> None:
        import torch

        b1, b2 = self.betas
        with torch.no_grad():
            for (name, p), g in zip(self.params, grads):
                st = self.state[name]
                st["step"] = st["step"] + 1
                n = float(st["step"].numpy())
                wd = self.weight_decay if p.ndim >= 2 else 0.0
                w = p * (1 - self.lr * wd) if wd else p
                m = st["exp_avg"] + (1 - b1) * (g - st["exp_avg"])
                v = st["exp_avg_sq"] * b2 + (1 - b2) * g * g
                denom = torch.sqrt(v) / math.sqrt(1 - b2 ** n) + self.eps
                p.copy_(w + (-self.lr / (1 - b1 ** n)) * m / denom)
                st["exp_avg"], st["exp_avg_sq"] = m, v

    # ------------------------------------------------------------------ checkpoint (torch's flat names)
    def state_tensors(self) -> dict:
        return {f"state.{name}.{k}": v for name, st in self.state.items() for k, v in st.items()}

    def load_state_tensors(self, flat: dict, source: str) -> None:
        import torch

        missing = [f"state.{n}.{k}" for n, st in self.state.items() for k in st if f"state.{n}.{k}" not in flat]
        if missing:
            raise ValueError(f"{source}: the optimizer state lacks {len(missing)} tensor(s), e.g. {missing[:3]}; "
                             f"resume with --no-load-optim")
        for name, st in self.state.items():
            for k in st:
                v = flat[f"state.{name}.{k}"]
                st[k] = torch.tensor(v, dtype=torch.float32).reshape(tuple(st[k].shape))


def clip_grad_norm(grads: list, max_norm: float) -> tuple[list, float]:
    """torch.nn.utils.clip_grad_norm_ (2-norm, foreach): (clipped grads, total norm before clipping)."""
    import torch

    # (mindtorch's vector_norm needs a dim: the 2-norm written out)
    norms = torch.stack([torch.sqrt((g * g).sum()) for g in grads])
    total = torch.sqrt((norms * norms).sum())
    if max_norm and max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [g * coef for g in grads]
    from omnitune.backends.mindspore.patches import scalar
    return grads, scalar(total)
