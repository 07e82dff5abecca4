"""cgd under torch.distributed on the CPU (gloo, 2 processes).

- DistributedDataParallel gives the same parameters as one process on the whole batch, for every optimizer
  mode: DDP averages the gradients before the step, so each rank's optimizer sees the full-batch gradient.
- FSDP2 (fully_shard, DTensor parameters sharded on dim 0): the elementwise optimizers step their local shards
  and the induced metric all-reduces its norm (and the loss, for the log embedding); FullCGD gathers the full
  gradients and steps replicated state. Every mode equals one process.
- A NaN gradient in one rank's shard: every rank raises NonFiniteGradientError naming the parameter.
- torch.distributed.checkpoint: a checkpoint saved by 2 FSDP2 ranks loads into 1 plain process, which then
  continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import os

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
    "FullCGD eigenbasis": lambda p: cgd.FullCGD(p, lr=1e-2, metric="eigenbasis", refresh_every=2),
    "FullCGD window": lambda p: cgd.FullCGD(p, lr=1e-2, solver="window", window=3),
    "InducedMetric rms": lambda p: cgd.InducedMetric(p, lr=1e-2, gamma="rms", xi=0.01),
    "InducedMetric sgd": lambda p: cgd.InducedMetric(p, lr=1e-2, xi=0.1),
    # The two weight matrices (5 x 6, 3 x 5); the biases keep their values. Float32 Newton-Schulz, so the
    # one-process comparison is not at bfloat16's resolution.
    "Muon": lambda p: cgd.Muon([q for q in p if q.dim() == 2], lr=1e-2, ns_precision="float32"),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


FSDP_MODES = ("CGD", "CGD centered power 0.4", "Ballistic", "InducedMetric rms", "InducedMetric sgd",
              "InducedMetric log", "FullCGD full", "FullCGD block", "FullCGD kron", "FullCGD eigenbasis",
              "FullCGD window", "Muon")
MODES["InducedMetric log"] = lambda p: cgd.InducedMetric(p, lr=1e-2, xi=0.1, embedding="log")
CHECKPOINTED = ("CGD", "InducedMetric rms", "FullCGD kron", "FullCGD eigenbasis", "Muon")


def _steps(model, net, opt, rank: int | None, world: int, steps: range) -> None:
    for step in steps:
        x, y = _data(step)
        if rank is not None:  # each rank its contiguous share of the batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        if not isinstance(opt, cgd.InducedMetric):
            opt.step()
            continue
        if rank is not None and net is not model:
            # DDP: the log embedding needs the global loss, which only the user's loop knows to average (under
            # FSDP2 cgd averages it itself, over the parameters' shard group).
            loss = loss.detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        opt.step(loss=loss)


def _full(model) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def _train(make, rank: int | None, world: int, wrap: str = "ddp") -> list[torch.Tensor]:
    model = _model()
    net = model
    if rank is not None and wrap == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif rank is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    opt = make(list(model.parameters()))
    _steps(model, net, opt, rank, world, range(STEPS))
    return _full(model)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # A file store, not TCP: no port to pick (a free port can be taken again before rank 0 binds it) and no store
    # server thread in rank 0 that its exit can tear down while rank 1 still talks to it (that aborted a run with
    # "terminate called without an active exception" now and then on a loaded machine).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.fsdp import fully_shard

        results = {("ddp", name): _train(make, rank, world) for name, make in MODES.items()}
        results.update({("fsdp", name): _train(MODES[name], rank, world, "fsdp") for name in FSDP_MODES})
        for mode in CHECKPOINTED:  # a checkpoint after half the steps, saved by both ranks
            model = _model()
            fully_shard(model)
            opt = MODES[mode](list(model.parameters()))
            _steps(model, model, opt, rank, world, range(STEPS // 2))
            model_sd, opt_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=os.path.join(os.path.dirname(out), mode))
        # A NaN in rank 0's shard alone: every rank raises alike, naming the parameter.
        model = _model()
        fully_shard(model)
        opt = cgd.CGD(list(model.parameters()), lr=1e-2)
        x, y = _data(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if rank == 0:
            model[0].weight.grad.to_local().view(-1)[0] = float("nan")
        try:
            opt.step()
            raised = ""
        except cgd.NonFiniteGradientError as error:
            raised = str(error)
        with open(f"{out}.nan{rank}", "w") as f:
            f.write(raised)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # neither rank tears its process group down while the other still uses it
        # Past the barrier everything the tests read is on disk: this rank's work is complete.
        open(f"{out}.done{rank}", "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    folder = tmp_path_factory.mktemp("ddp")
    out, store = str(folder / "params.pt"), str(folder / "store")
    try:
        mp.start_processes(_worker, args=(2, store, out), nprocs=2, join=True, start_method="spawn")
    except mp.ProcessExitedException:
        # gloo's threads now and then abort a process while it is torn down ("terminate called without an active
        # exception", SIGABRT) on a loaded machine, after both ranks passed the final barrier and wrote
        # everything: that exit is not the code under test. A rank that failed before then has no marker.
        if not all(os.path.exists(f"{out}.done{rank}") for rank in range(2)):
            raise
    results = torch.load(out)
    results["dir"] = os.path.dirname(out)
    return results


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_matches_one_process(ddp_results, mode):
    expected = _train(MODES[mode], None, 1)
    for got, want in zip(ddp_results[("ddp", mode)], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp2_matches_one_process(ddp_results, mode):
    expected = _train(MODES[mode], None, 1)
    for got, want in zip(ddp_results[("fsdp", mode)], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fsdp2_a_nan_in_one_shard_raises_on_every_rank(ddp_results):
    out = os.path.join(ddp_results["dir"], "params.pt")
    for rank in range(2):
        with open(f"{out}.nan{rank}") as f:
            assert "gradient of param_groups[0]['params'][0] (shape (5, 6))" in f.read(), rank


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_checkpoint_from_two_ranks_continues_in_one(ddp_results, mode):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model()
    opt = MODES[mode](list(model.parameters()))
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=os.path.join(ddp_results["dir"], mode))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _steps(model, model, opt, None, 1, range(STEPS // 2, STEPS))
    expected = _train(MODES[mode], None, 1)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
