"""Shared fixtures: the devices to test on, and a small model with deterministic data."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The tests import cgd as installed (./run.sh test installs a wheel; by hand: pip install, or PYTHONPATH=python);
# only the reference implementations beside the tests come from here.
sys.path.insert(0, os.path.dirname(__file__))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import cgd

    where = f"cgd {cgd.__version__} from {os.path.dirname(cgd.__file__)} ({cgd.BUILD_INFO.get('torch')} build)"
    if torch.cuda.is_available():
        return [where, f"CUDA device: {torch.cuda.get_device_name()}"]
    return [where, "no CUDA device: CUDA tests are skipped (the CUDA kernels are still compiled and linked)"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def make_mlp(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    return model.to(device=device, dtype=dtype)


def batches(n_steps: int, seed: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A fixed regression stream: (x, y) per step, the same for every optimizer under test."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g)
    for _ in range(n_steps):
        x = torch.randn(64, 6, generator=g)
        y = torch.sin(x @ w) + 0.1 * torch.randn(64, 3, generator=g)
        yield x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def train_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


# The GPU host's check (benchmarks/gpu_check.sh) sets CGD_REQUIRE_CUDA=1: there a skip is a path that did not run,
# so it is reported as a failure that names the test. Exempt: the skips that only a machine with a GPU takes.
SKIPS_EXPECTED_WITH_A_GPU = ("a CUDA device is present",)


def pytest_sessionstart(session):
    if os.environ.get("CGD_REQUIRE_CUDA") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("CGD_REQUIRE_CUDA=1 but torch sees no CUDA device, so not one cuda case would even "
                                "be collected")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if os.environ.get("CGD_REQUIRE_CUDA") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(expected in reason for expected in SKIPS_EXPECTED_WITH_A_GPU):
            report.outcome = "failed"
            report.longrepr = f"CGD_REQUIRE_CUDA=1: {item.nodeid} was skipped, so it did not run ({reason})"
    return report
