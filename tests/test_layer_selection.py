"""The CPU selection of layer scope (numpy partition of the keys, masked output by integer multiply)
against plain references: a stable sort of the order keys, and torch.where."""

from __future__ import annotations

import pytest
import torch

from sparsedist.sparsity.layer import key_dtype, keep_where, order_keys, top_k_mask, top_k_per_sample


def sorted_top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable descending sort of each sample's order keys keeps the first k (ties to the lower index)."""
    flat = x.reshape(len(x), -1)
    order = order_keys(flat.contiguous()).sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, order, True).view(x.shape)


def maps(seed: int):
    """relu(randn) maps (the fast path: no negative floats), signed maps, tie-heavy bf16/fp16 maps,
    float64, odd shapes, channels_last, and special values (-0.0, NaN of both signs, infinities)."""
    generator = torch.Generator().manual_seed(seed)
    yield torch.relu(torch.randn(4, 8, 6, 6, generator=generator))
    yield torch.randn(3, 5, 7, 3, generator=generator)
    yield (torch.relu(torch.randn(3, 16, 9, 7, generator=generator)) * 4).round().bfloat16()
    yield (torch.randn(3, 6, 5, 5, generator=generator) * 3).round().half()
    yield torch.randn(2, 3, 5, 5, generator=generator).double()
    yield torch.relu(torch.randn(5, 6, 7, 7, generator=generator)).to(memory_format=torch.channels_last)
    yield (torch.relu(torch.randn(3, 4, 5, 5, generator=generator)) * 2).round().to(memory_format=torch.channels_last)
    special = torch.relu(torch.randn(3, 4, 5, 5, generator=generator))
    special[0, :2] = -0.0
    special[1, 1, :2] = float("nan")
    special[1, 2, 0] = -float("nan")
    special[2, 0, 0] = float("inf")
    special[2, 0, 1] = -float("inf")
    yield special
    yield torch.zeros(2, 3, 4, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_selection_keeps_what_a_stable_sort_of_the_keys_keeps(seed):
    for x in maps(seed):
        n = x[0].numel()
        for k in sorted({1, 2, n // 10 or 1, n // 2, n - 1, n}):
            expected = sorted_top_k_mask(x, k)
            for workspace in (None, torch.empty(2 * x.numel(), dtype=key_dtype(x.dtype))):
                ours = top_k_mask(x, k, workspace)
                assert torch.equal(ours, expected), (x.dtype, x.shape, k)
                assert ours.stride() == x.stride()  # the mask keeps the map's memory format


def test_cpu_selection_on_wrn_site_shapes_with_ties_in_some_rows():
    # A WRN-28-4 site's size; one row holds the k-th largest value several times, one holds many zeros only.
    x = torch.relu(torch.randn(6, 64, 16, 16, generator=torch.Generator().manual_seed(3)))
    k = int(0.1 * x[0].numel())
    x[1].view(-1)[[5, 900, 7000]] = x[1].flatten().topk(k).values[-1]
    x[2].view(-1)[100:] = 0.0
    assert torch.equal(top_k_mask(x, k), sorted_top_k_mask(x, k))
    assert torch.equal(top_k_mask(x, k).sum(dim=(1, 2, 3)), torch.full((6,), k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_masked_output_and_gradient_are_bitwise_those_of_where(dtype, channels_last):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, 6, generator=generator).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    upstream = torch.randn(3, 4, 5, 6, generator=generator).to(dtype)
    upstream[1, 0, 0, :3] = torch.tensor([float("nan"), -float("inf"), -0.0]).to(dtype)
    if channels_last:
        x, upstream = x.to(memory_format=torch.channels_last), upstream.to(memory_format=torch.channels_last)
    keep_ratio = 0.3
    kept = top_k_mask(x, int(keep_ratio * x[0].numel()))
    ours_in, reference_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, reference = top_k_per_sample(ours_in, keep_ratio), keep_where(reference_in, kept)
    ours.backward(upstream)
    reference.backward(upstream)
    bits = key_dtype(dtype)
    assert torch.equal(ours.detach().view(bits), reference.detach().view(bits))  # NaN and signed zeros too
    assert ours.stride() == reference.stride()
    assert torch.equal(ours_in.grad.view(bits), reference_in.grad.view(bits))


def test_cpu_masked_output_is_twice_differentiable_as_where_is():
    x = torch.relu(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))).requires_grad_()
    second_orders = []
    for select in (top_k_per_sample, lambda x, rho: keep_where(x, top_k_mask(x, int(rho * x[0].numel())))):
        (grad,) = torch.autograd.grad(select(x, 0.25).pow(3).sum(), x, create_graph=True)
        second_orders.append(torch.autograd.grad(grad.sum(), x)[0])
    assert torch.equal(*second_orders) and second_orders[0].count_nonzero() == 2 * 12
