"""FLOP counting: exact counts of linear layers and attention, module-path keys."""

from __future__ import annotations

import pytest
import torch

from cachec.runtime.flops import count_flops, relative_module_flops


class _Block(torch.nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU())

    def forward(self, x):  # x: (B, L, dim)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


def test_linear_flops_exact():
    lin = torch.nn.Linear(7, 5)
    x = torch.randn(3, 7)
    with torch.no_grad():
        y, total, per_module = count_flops(lin, x)
    assert torch.equal(y, lin(x))
    assert total == 2 * 7 * 5 * 3  # FLOPs, not MACs; the bias add is not counted
    assert per_module == {"Global": total, "Linear": total}
    assert relative_module_flops(per_module) == {"": total}


def test_attention_counted_under_math_backend_and_module_paths():
    block = _Block()
    b, n, d, h = 2, 6, 8, 2
    with torch.no_grad():
        _, total, per_module = count_flops(block, torch.randn(b, n, d))
    attention = 4 * b * h * n * n * (d // h)  # Q·Kᵀ and P·V
    qkv, out = 2 * b * n * d * 3 * d, 2 * b * n * d * d
    assert attention > 0
    assert total == qkv + out + attention
    rel = relative_module_flops(per_module, root=block)
    assert rel == {"": total, "qkv": qkv, "out": out, "out.0": out}
    assert relative_module_flops(per_module, root="_Block") == rel


def test_relative_module_flops_with_two_roots():
    a, b = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2))

    def both(x):
        return b(a(x))

    with torch.no_grad():
        _, total, per_module = count_flops(both, torch.randn(1, 4))
    assert total == 2 * 16 + 2 * 8
    with pytest.raises(ValueError, match="cannot infer"):
        relative_module_flops(per_module)
    assert relative_module_flops(per_module, root=b) == {"": 16, "0": 16}
    with pytest.raises(ValueError, match="not among"):
        relative_module_flops(per_module, root="Conv2d")
