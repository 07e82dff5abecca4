"""Splitting a model's parameters the way matrix optimizers are meant to be used, and stepping two optimizers as one.

Muon (and the Kronecker/eigenbasis metrics) are built for a network's hidden matrices; embeddings, the output
head, norms and biases go to a diagonal optimizer (AdamW, ``cgd.AdamW``, ``cgd.CGD``). :func:`split_parameters`
makes that split; :class:`Combined` steps the two optimizers as one ``torch.optim.Optimizer``, so LR schedulers,
``zero_grad``, checkpoints and ``GradScaler`` see a single optimizer.
"""

from __future__ import annotations

from typing import Any

import torch


def split_parameters(model: torch.nn.Module, head: torch.nn.Module | None = None
                     ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(matrices, others) of the model's trainable parameters, each listed once (a tied weight once), in
    ``model.parameters()`` order.

    matrices: parameters with two or more dimensions (linear weights, conv kernels) of any module but an
    ``nn.Embedding`` and the output head. others: everything else (embeddings, the head, norms, biases, scalars).
    The head is ``head`` when given, else the model's last ``nn.Linear`` (in registration order): a GPT's
    ``lm_head``, a ResNet's ``fc``. A weight tied between an embedding and the head is an embedding.
    """
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        head = linears[-1] if linears else None
    excluded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    matrices, others = [], []
    for p in model.parameters():  # deduplicated by torch: a tied weight appears once
        if not p.requires_grad:
            continue
        (matrices if p.dim() >= 2 and id(p) not in excluded else others).append(p)
    return matrices, others


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped as one.

    ``param_groups`` is every child's groups in order (the same dicts, so a scheduler's change of ``lr`` reaches
    the child), ``step`` steps each child (a closure is evaluated once, by the first), ``zero_grad`` clears all,
    and ``state_dict()`` / ``load_state_dict()`` hold one entry per child. Under ``torch.amp.GradScaler`` the
    gradients are unscaled before ``step``, whatever the children support (``_step_supports_amp_scaling`` is
    False here). ``add_param_group`` belongs to a child: call it on that one.
    """

    _step_supports_amp_scaling = False

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        if not optimizers:
            raise ValueError("cgd: Combined needs at least one optimizer")
        seen: dict[int, int] = {}
        for k, opt in enumerate(optimizers):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"cgd: Combined's argument {k} is a {type(opt).__name__}, not a torch.optim.Optimizer")
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(f"cgd: a parameter of shape {tuple(p.shape)} is in optimizer {seen[id(p)]} "
                                         f"and optimizer {k}; Combined needs disjoint parameters")
                    seen[id(p)] = k
        self.optimizers = list(optimizers)
        # torch.optim.Optimizer's own bookkeeping (hooks, defaults) without its parameter handling: the children
        # own the parameters.
        self.defaults: dict[str, Any] = {}
        self._optimizer_step_pre_hooks: dict[int, Any] = {}
        self._optimizer_step_post_hooks: dict[int, Any] = {}
        self._optimizer_state_dict_pre_hooks: dict[int, Any] = {}
        self._optimizer_state_dict_post_hooks: dict[int, Any] = {}
        self._optimizer_load_state_dict_pre_hooks: dict[int, Any] = {}
        self._optimizer_load_state_dict_post_hooks: dict[int, Any] = {}
        self._zero_grad_profile_name = "Optimizer.zero_grad#Combined.zero_grad"

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self.optimizers for group in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        raise AttributeError("cgd: Combined's param_groups are its optimizers'; change those")

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        merged: dict[Any, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("cgd: Combined's state is its optimizers'; load it with load_state_dict")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            have = len(saved) if isinstance(saved, list) else "no"
            raise ValueError(f"cgd: the state dict holds {have} optimizers' states but this Combined has "
                             f"{len(self.optimizers)}; nothing was loaded")
        # All or nothing: a child that refuses its part puts back the ones loaded before it.
        before = [opt.state_dict() for opt in self.optimizers]
        loaded = 0
        try:
            for opt, sd in zip(self.optimizers, saved):
                opt.load_state_dict(sd)
                loaded += 1
        except Exception:
            for opt, sd in zip(self.optimizers[:loaded], before):
                opt.load_state_dict(sd)
            raise

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("cgd: add the group to one of Combined's optimizers (Combined.optimizers[k])")

    def __repr__(self) -> str:
        return "Combined(\n" + ",\n".join("  " + repr(opt).replace("\n", "\n  ") for opt in self.optimizers) + "\n)"
