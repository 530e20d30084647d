"""Fast-VTU core on a small Llama decoder: identity mapping equals stock, duplicates (T4)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from dymu import vtu as vtu_module
from dymu.compat.shims import cache_tensors, rope_theta
from dymu.options import Options
from dymu.vtu import Remerger, vtu_prefill


def small_llama(layers: int = 2) -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
    )
    return LlamaModel(cfg).eval()


def prefill(model: LlamaModel, merged, idx, deterministic: bool = False):
    return vtu_prefill(
        model, merged, idx, rope_theta(model.config), options=Options(deterministic_remerge=deterministic)
    )


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Reference M·e: row (b, j) is x[b, idx[b, j]], written as a plain loop."""
    return torch.stack([torch.stack([x[b, int(i)] for i in row]) for b, row in enumerate(idx)])


def test_t1_remerge_of_expand_is_identity() -> None:
    x = torch.randn(2, 5, 3, 4)
    idx = torch.tensor([[0, 1, 1, 2, 3, 3, 4], [0, 0, 1, 2, 2, 3, 4]])
    flat = x.reshape(2, 5, 12)
    for deterministic in (False, True):
        remerge = Remerger(idx, 5, flat.dtype, deterministic)
        torch.testing.assert_close(remerge(remerge.expand(flat)), flat)
        torch.testing.assert_close(remerge.expand(flat), gather_rows(flat, idx))
        torch.testing.assert_close(remerge.expand(x), gather_rows(x, idx))  # any trailing shape


def test_identity_mapping_equals_stock_llama_and_its_cache() -> None:
    model = small_llama()
    embeds = torch.randn(2, 12, 64)
    idx = torch.arange(12)[None].repeat(2, 1)
    out = prefill(model, embeds, idx)
    with torch.no_grad():
        stock = model(inputs_embeds=embeds, use_cache=True)
    torch.testing.assert_close(out.hidden, stock.last_hidden_state, rtol=1e-4, atol=1e-5)
    for i in range(2):
        k, v = (t[i] for t in cache_tensors(stock.past_key_values))
        torch.testing.assert_close(out.keys[i], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.values[i], v, rtol=1e-4, atol=1e-5)


def test_t4_duplicate_image_tokens_match_full_model_on_text_positions() -> None:
    """One decoder layer: text rows see exactly the K/V the full model sees (exact up to float error)."""
    model = small_llama(layers=1)
    text_before, text_after, groups, group = 3, 4, 3, 5
    merged = torch.randn(1, text_before + groups + text_after, 64)
    image_idx = torch.arange(groups).repeat_interleave(group) + text_before
    idx = torch.cat([torch.arange(text_before), image_idx, torch.arange(text_after) + text_before + groups])[
        None
    ]
    full_embeds = gather_rows(merged, idx)
    out = prefill(model, merged, idx)
    with torch.no_grad():
        full = model(inputs_embeds=full_embeds).last_hidden_state
    text_virtual = torch.cat(
        [torch.arange(text_before), torch.arange(text_after) + text_before + groups * group]
    )
    text_merged = torch.cat([torch.arange(text_before), torch.arange(text_after) + text_before + groups])
    torch.testing.assert_close(out.hidden[0, text_merged], full[0, text_virtual], rtol=1e-4, atol=1e-5)
    assert out.keys[0].shape[2] == idx.shape[1], "cache holds the full virtual length"


@pytest.mark.parametrize("deterministic", [False, True])
def test_padded_batch_equals_single_rows(deterministic: bool) -> None:
    model = small_llama()
    rows = [
        (torch.randn(1, 6, 64), torch.tensor([[0, 1, 1, 2, 3, 4, 4, 5]])),
        (torch.randn(1, 4, 64), torch.tensor([[0, 1, 1, 1, 2, 3, 3, 3]])),
    ]
    merged = torch.zeros(2, 6, 64)
    merged[0], merged[1, :4] = rows[0][0][0], rows[1][0][0]
    idx = torch.cat([r[1] for r in rows])
    batched = prefill(model, merged, idx, deterministic)
    for b, (emb, row_idx) in enumerate(rows):
        single = prefill(model, emb, row_idx, deterministic)
        n_u = emb.shape[1]
        torch.testing.assert_close(batched.hidden[b, :n_u], single.hidden[0], rtol=1e-4, atol=1e-5)


def test_packed_rows_equal_padded_rows() -> None:
    """Packed merged rows (1, T, D) with global indices give each sample the padded layout's
    hidden rows, keys and values: the row-wise layers never see another sample's rows."""
    model = small_llama()
    rows = [torch.randn(6, 64), torch.randn(3, 64), torch.randn(5, 64)]
    local = [torch.tensor([0, 1, 1, 2, 3, 4, 4, 5]), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2]),
             torch.tensor([0, 1, 2, 2, 3, 3, 4, 4])]  # fmt: skip
    padded = torch.zeros(3, 6, 64)
    for b, r in enumerate(rows):
        padded[b, : len(r)] = r
    packed = torch.cat(rows)[None]
    starts = [0, 6, 9]
    plain = prefill(model, padded, torch.stack(local))
    out = prefill(model, packed, torch.stack([i + s for i, s in zip(local, starts, strict=True)]))
    assert out.hidden.shape == (1, 14, 64)
    for b, r in enumerate(rows):
        got = out.hidden[0, starts[b] : starts[b] + len(r)]
        torch.testing.assert_close(got, plain.hidden[b, : len(r)], rtol=1e-5, atol=1e-5)
    for got, want in zip(out.keys + out.values, plain.keys + plain.values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"^the deterministic remerge needs padded rows \(B, N_u, D\), not packed ones$"
    ):
        prefill(model, packed, torch.stack(local), deterministic=True)


def naive_group_mean(y: torch.Tensor, idx: torch.Tensor, n_u: int) -> torch.Tensor:
    """Reference P·y: row (b, u) is the plain mean of the y[b, j] with idx[b, j] == u (0 if none)."""
    out = torch.zeros(y.shape[0], n_u, y.shape[2], dtype=torch.float64)
    for b in range(y.shape[0]):
        for u in range(n_u):
            members = [y[b, j].double() for j in range(y.shape[1]) if int(idx[b, j]) == u]
            if members:
                out[b, u] = torch.stack(members).mean(0)
    return out


@pytest.mark.parametrize("deterministic", [False, True], ids=["index-add", "assignment-bmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remerge_is_the_plain_mean_of_differing_members(deterministic: bool, dtype: torch.dtype) -> None:
    """Each remerge path (index_add_ sums, the deterministic assignment bmm) against a plain loop,
    on virtual rows that differ within each group, groups of 1-3 members, an empty group and rows
    of another batch entry in between: a first-member, sum or wrong-row remerge cannot pass."""
    idx = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 4], [0, 0, 1, 3, 3, 1, 4, 4]])  # row 1: group 2 empty
    y = torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    remerge = Remerger(idx, 5, dtype, deterministic)
    assert (remerge.assign is not None) == deterministic, "the option picks the path under test"
    assert Remerger(idx, 5, dtype).assign is None, "index_add_ sums by default"
    got = remerge(y)
    want = naive_group_mean(y, idx, 5)
    assert got.dtype == dtype and got.shape == (2, 5, 6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert not torch.allclose(want[0, 2], y[0, 3].double(), atol=0.1), "members must differ"


def test_vtu_prefill_takes_the_remerge_path_its_options_name() -> None:
    """Both remerge paths through the whole prefill agree, on a mapping with real groups."""
    model = small_llama()
    merged = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, 5], [0, 1, 2, 2, 2, 3, 4, 4, 5]])
    plain, fixed = prefill(model, merged, idx, False), prefill(model, merged, idx, True)
    torch.testing.assert_close(plain.hidden, fixed.hidden, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain.keys + plain.values, fixed.keys + fixed.values, strict=True):
        assert a.shape == (2, 2, 9, 16)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_vtu_prefill_builds_the_assignment_matrix_only_when_asked(monkeypatch, deterministic: bool) -> None:
    """`deterministic_remerge` must reach the remerger (on a CPU both paths give the same numbers,
    so only the path taken tells them apart), with the activations' dtype for the matrix."""
    built = []
    real = vtu_module.assignment

    def spy(index, num_groups, dtype):
        built.append(dtype)
        return real(index, num_groups, dtype)

    monkeypatch.setattr(vtu_module, "assignment", spy)
    model = small_llama().to(torch.float64)
    merged = torch.randn(1, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    prefill(model, merged, torch.tensor([[0, 1, 1, 2, 3, 3]]), deterministic)
    assert built == ([torch.float64] if deterministic else [])


def test_vtu_prefill_keeps_the_models_dtype() -> None:
    """In bfloat16 every output stays bfloat16: RoPE tables made in float32 must be cast back, or
    the keys (and the cache built from them) silently become float32."""
    model = small_llama().to(torch.bfloat16)
    merged = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = prefill(model, merged, torch.tensor([[0, 1, 1, 2, 3, 3]]))
    assert out.hidden.dtype == torch.bfloat16
    assert {t.dtype for t in out.keys + out.values} == {torch.bfloat16}


def test_cpu_prefill_never_calls_the_triton_kernel(monkeypatch) -> None:
    """Off-GPU the fused path is never taken, even with `fused_rope` on (the default)."""

    def kernel(*args, **kwargs):
        raise AssertionError("expand_rope called for CPU tensors")

    monkeypatch.setattr(vtu_module, "expand_rope", kernel)
    model = small_llama()
    merged, idx = torch.randn(1, 4, 64), torch.tensor([[0, 1, 1, 2, 3]])
    out = prefill(model, merged, idx)
    assert out.keys[0].shape == (1, 2, 5, 16)
