"""The sparsity statistics under real 2-process gloo groups: replica-consistent tau, DDP equivalence."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from sparsedist.models import WideResNet
from sparsedist.sparsity import ActivationSparsity
from sparsedist.sparsity.threshold import float_to_bits
from tests.distributed import run_gloo

pytestmark = pytest.mark.slow

KEEP_RATIOS = [0.4, 0.3, 0.2, 0.1, 0.1, 0.05]
DDP_CASES = [("layer", 1.0), ("layer", 0.2), ("network", 1.0), ("network", 0.2)]
DDP_STEPS = 3


def tiny_model(sparsity: ActivationSparsity) -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(depth=10, widen_factor=1, make_site=sparsity.new_site)


def batch(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def tau_and_rho_after_every_step(rank: int, world_size: int) -> list[tuple[int, float]]:
    sparsity = ActivationSparsity("network", keep_ratio=1.0)
    model = tiny_model(sparsity)
    trajectory = []
    for step, keep_ratio in enumerate(KEEP_RATIOS):
        images, _ = batch(4 + 2 * rank, seed=1000 * rank + step)  # different data and batch size per rank
        model(images).square().mean().backward()
        sparsity.finish_step()
        sparsity.set_keep_ratio(keep_ratio)
        trajectory.append((float_to_bits(sparsity.threshold), sparsity.keep_ratio))
    return trajectory


def test_every_replica_holds_the_bitwise_identical_tau_and_rho_after_every_step():
    first, second = run_gloo(tau_and_rho_after_every_step, 2)
    assert first == second
    taus = [tau for tau, _ in first]
    assert all(tau > 0 for tau in taus) and len(set(taus)) == len(taus)


def train_three_steps(scope: str, keep_ratio: float, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """SGD on this rank's share of every global batch (the whole batch when world_size is 1)."""
    sparsity = ActivationSparsity(scope, keep_ratio=keep_ratio)
    model = tiny_model(sparsity)
    trained = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(DDP_STEPS):
        images, labels = batch(8, seed=step)
        share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
        optimizer.zero_grad()
        F.cross_entropy(trained(images[share]), labels[share]).backward()
        optimizer.step()
        stats = sparsity.finish_step()
    assert keep_ratio == 1.0 or stats.realized_keep < 0.3  # the sparse cases really ran sparse
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def ddp_parameters_for_every_case(rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    return [train_three_steps(scope, keep_ratio, rank, world_size) for scope, keep_ratio in DDP_CASES]


def test_two_ddp_replicas_end_with_the_parameters_of_one_process_on_the_concatenated_batches():
    replicated = run_gloo(ddp_parameters_for_every_case, 2)[0]
    for (scope, keep_ratio), parameters in zip(DDP_CASES, replicated):
        single = train_three_steps(scope, keep_ratio)
        for name, value in single.items():
            torch.testing.assert_close(parameters[name], value, rtol=1e-5, atol=1e-7, msg=f"{scope} {keep_ratio} {name}")
