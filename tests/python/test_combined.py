"""cgd.split_parameters and cgd.Combined: the split Muon-style optimizers expect, and two optimizers stepped as
one torch.optim.Optimizer (schedulers, checkpoints, GradScaler)."""

from __future__ import annotations

import warnings

import pytest
import torch

import cgd


class TinyGPT(torch.nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.block = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.GELU(),
                                         torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def test_split_puts_hidden_matrices_apart_from_embeddings_head_norms_and_biases():
    torch.manual_seed(0)
    model = TinyGPT()
    matrices, others = cgd.split_parameters(model)
    assert [id(p) for p in matrices] == [id(model.block[1].weight), id(model.block[3].weight)]
    assert {id(p) for p in others} == {id(model.embed.weight), id(model.block[0].weight), id(model.block[0].bias),
                                       id(model.block[1].bias), id(model.block[3].bias), id(model.head.weight)}
    tied = TinyGPT(tied=True)
    matrices, others = cgd.split_parameters(tied)
    assert len(matrices) == 2 and sum(p is tied.embed.weight for p in others) == 1  # once, as an embedding
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 10))
    matrices, others = cgd.split_parameters(conv)
    assert [id(p) for p in matrices] == [id(conv[0].weight)]  # the classifier is the head
    matrices, _ = cgd.split_parameters(conv, head=conv[0])
    assert [id(p) for p in matrices] == [id(conv[3].weight)]


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 11, (4, 5), generator=gen), torch.randint(0, 11, (4, 5), generator=gen))
            for _ in range(n)]


def make(seed=0, diagonal=cgd.AdamW):
    torch.manual_seed(seed)
    model = TinyGPT()
    matrices, others = cgd.split_parameters(model)
    return model, cgd.Combined(cgd.Muon(matrices, lr=0.02), diagonal(others, lr=1e-2))


def train(model, opt, data, scheduler=None, scaler=None):
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if scheduler is not None:
            scheduler.step()


def test_combined_steps_exactly_as_its_optimizers_do_separately():
    a, combined = make()
    b, _ = make()
    matrices, others = cgd.split_parameters(b)
    muon, adamw = cgd.Muon(matrices, lr=0.02), cgd.AdamW(others, lr=1e-2)
    data = batches(5)
    train(a, combined, data)
    for x, y in data:
        muon.zero_grad()
        adamw.zero_grad()
        torch.nn.functional.cross_entropy(b(x).flatten(0, 1), y.flatten()).backward()
        muon.step()
        adamw.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert len(combined.param_groups) == 2 and len(combined.state) == len(list(a.parameters()))


def test_a_scheduler_drives_both_optimizers_and_a_resume_is_bit_identical(tmp_path):
    data = batches(8)
    a, opt_a = make()
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        train(a, opt_a, data, sched_a)
    assert [g["lr"] for g in opt_a.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)

    b, opt_b = make()
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=8)
    train(b, opt_b, data[:3], sched_b)
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()},
               tmp_path / "ckpt.pt")
    c, opt_c = make(seed=5)
    sched_c = torch.optim.lr_scheduler.CosineAnnealingLR(opt_c, T_max=8)
    saved = torch.load(tmp_path / "ckpt.pt")
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    train(c, opt_c, data[3:], sched_c)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_grad_scaler_unscales_before_the_children_step():
    """With SGD beside Muon (Muon and AdamW would not notice a scaled gradient), a missed unscale moves the
    parameters 1024 times too far."""
    a, opt_a = make(diagonal=cgd.SGD)
    b, opt_b = make(diagonal=cgd.SGD)
    data = batches(3)
    train(a, opt_a, data)
    train(b, opt_b, data, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_errors_name_the_problem():
    model = TinyGPT()
    matrices, others = cgd.split_parameters(model)
    with pytest.raises(ValueError, match="in optimizer 0 and optimizer 1"):
        cgd.Combined(cgd.Muon(matrices), cgd.AdamW(matrices + others))
    combined = cgd.Combined(cgd.Muon(matrices), cgd.AdamW(others))
    with pytest.raises(NotImplementedError, match="add the group to one of Combined's optimizers"):
        combined.add_param_group({"params": []})
    with pytest.raises(ValueError, match="holds 1 optimizers' states but this Combined has 2"):
        combined.load_state_dict({"optimizers": [combined.optimizers[0].state_dict()]})
    with pytest.raises(TypeError, match="argument 0 is a list"):
        cgd.Combined(matrices)
