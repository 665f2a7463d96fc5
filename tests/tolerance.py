"""Float comparisons that hold on any CPU.

fp32 results computed in a different order (FSDP2 reduce-scatter vs one process, another ISA's
GEMM blocking: AVX2 vs AVX-512) differ by a few ulps *of the largest terms summed*, not of each
element: a gradient entry that is a near-cancelling sum of large terms can be off by 1e-6 while it
is itself 1e-7. So the absolute part of the tolerance is scaled to the tensor's magnitude
(``scale x max|want|``), and the reference is computed in float64 where a test can afford it.
"""
from __future__ import annotations

import torch


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4, scale: float = 1e-4,
                        msg: str = "") -> None:
    """|got - want| <= rel * |want| + scale * max|want| elementwise (fp32 vs fp64 reference: fine)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{msg}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol = scale * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rel, atol=atol, msg=lambda m: f"{msg}: {m} (atol {atol:.3g})")
