"""The fused gather + RoPE Triton kernel equals the torch path. It runs in Triton's interpreter
on CPU tensors (TRITON_INTERPRET=1, set before triton is imported, hence a subprocess), so
the check runs in every cell that ships a recent Triton; the GPU cells run it compiled."""

from __future__ import annotations

import os
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from triton_interp import run_interpreted, skip_without_an_interpreter

from dymu.expand_rope import fused_available

CODE = textwrap.dedent(
    """
    import torch
    from dymu.expand_rope import expand_rope
    from dymu.rope import apply_rope, half_tables, rope_cos_sin
    from dymu.vtu import Remerger
    torch.manual_seed(0)
    B, Nu, N, H, hd = 2, 5, 9, 3, 8  # 3 heads: the kernel's head block (4) must mask one
    idx = torch.randint(0, Nu, (B, N))
    x = torch.randn(B, Nu, H, hd)
    positions = torch.arange(N)[None].expand(B, N) + torch.tensor([[3], [40]])
    remerge = Remerger(idx, Nu, torch.float32)
    cos, sin = rope_cos_sin(positions, hd, 10000.0, torch.float32)
    want = apply_rope(remerge.expand(x), cos, sin).transpose(1, 2)
    got = expand_rope(x, remerge.flat, N, *half_tables(cos, sin))
    assert got.shape == want.shape == (B, H, N, hd) and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert torch.equal(expand_rope(x, remerge.flat, N, None, None), remerge.expand(x).transpose(1, 2))
    half_out = expand_rope(x.half(), remerge.flat, N, *half_tables(cos, sin))
    assert half_out.dtype == torch.float16 and torch.allclose(half_out.float(), want, atol=1e-2)
    # into the first N positions of a longer decode buffer (strided view): the same values, nothing else written
    buffer = torch.full((B, H, N + 6, hd), 7.0)
    into = expand_rope(x, remerge.flat, N, *half_tables(cos, sin), out=buffer[:, :, :N])
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:, :, :N], got)
    assert bool((buffer[:, :, N:] == 7.0).all())
    try:
        expand_rope(x, remerge.flat, N, None, None, out=buffer[:, :, :N - 1])
        raise SystemExit("a wrong-shaped out was accepted")
    except ValueError:
        pass
    # the graph decode's use: one new token per row (flat = the rows, N = 1)
    one = torch.randn(B, 1, H, hd)
    cos1, sin1 = rope_cos_sin(torch.tensor([[7], [300]]), hd, 10000.0, torch.float32)
    got1 = expand_rope(one, torch.arange(B), 1, *half_tables(cos1, sin1))
    assert torch.allclose(got1, apply_rope(one, cos1, sin1).transpose(1, 2), atol=1e-5)
    print("kernel ok")
    """
)


def test_triton_kernel_matches_the_torch_path_in_the_interpreter() -> None:
    run_interpreted(CODE, "kernel ok")


def test_cpu_tensors_take_the_torch_path() -> None:
    assert not fused_available(torch.zeros(1), 128)


def test_the_kernel_needs_an_even_power_of_two_half_head_and_triton(monkeypatch) -> None:
    """What `fused_available` decides for a CUDA tensor (a stand-in here): the kernel's head block is
    a power-of-two half head, and Triton must import."""
    pytest.importorskip("triton")
    cuda = SimpleNamespace(is_cuda=True)
    assert fused_available(cuda, 128) and fused_available(cuda, 64) and fused_available(cuda, 2)
    assert not fused_available(cuda, 96)  # half 48
    assert not fused_available(cuda, 80)  # half 40
    assert not fused_available(cuda, 12)  # half 6
    assert not fused_available(cuda, 9)  # odd
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert not fused_available(cuda, 128)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="in-process run for the mutation session (TRITON_INTERPRET=1 set before triton is imported)")  # fmt: skip
def test_triton_kernel_in_process_under_the_interpreter() -> None:
    """The same check in this process, so a tool that traces this process (mutmut, through
    scripts/mutation.py, which sets TRITON_INTERPRET=1 for the vtu group) sees `expand_rope` run."""
    skip_without_an_interpreter()
    exec(compile(CODE, "expand_rope_check", "exec"), {})  # our own constant code
