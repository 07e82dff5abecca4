"""cgd under torch.distributed on the CPU (gloo, 2 processes): DistributedDataParallel training gives the same
parameters as one process on the whole batch, for every optimizer mode. DDP averages the gradients before the
step, so each rank's optimizer sees the full-batch gradient and steps identically; these tests check that
nothing in cgd (state, the induced metric's global norm, the block layout) breaks that."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cgd

STEPS = 6
MODES = {
    "CGD": lambda p: cgd.CGD(p, lr=1e-2),
    "CGD centered power 0.4": lambda p: cgd.CGD(p, lr=1e-2, power=0.4, moment="centered", bias_correction=False,
                                                m2_init=1.0),
    "Ballistic": lambda p: cgd.Ballistic(p, lr=1e-3),
    "FullCGD full": lambda p: cgd.FullCGD(p, lr=1e-2),
    "FullCGD block": lambda p: cgd.FullCGD(p, lr=1e-2, metric="block", block_size=4),
    "FullCGD kron": lambda p: cgd.FullCGD(p, lr=1e-2, metric="kron", refresh_every=2),
    "InducedMetric rms": lambda p: cgd.InducedMetric(p, lr=1e-2, gamma="rms", xi=0.01),
    "InducedMetric sgd": lambda p: cgd.InducedMetric(p, lr=1e-2, xi=0.1),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def _train(make, rank: int | None, world: int) -> list[torch.Tensor]:
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if rank is not None else model
    opt = make(list(model.parameters()))
    for step in range(STEPS):
        x, y = _data(step)
        if rank is not None:  # each rank its contiguous share of the batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: _train(make, rank, world) for name, make in MODES.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = str(tmp_path_factory.mktemp("ddp") / "params.pt")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    return torch.load(out)


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_matches_one_process(ddp_results, mode):
    expected = _train(MODES[mode], None, 1)
    for got, want in zip(ddp_results[mode], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
