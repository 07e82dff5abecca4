"""Training tasks shared by the benchmark scripts. Data comes from local files or packages only, never the network.

- ``digits``: an MLP classifier on scikit-learn's bundled 8x8 digits (1797 images), seconds on a CPU.
- ``shakespeare``: a character-level GPT (4 layers, 4 heads, 128 wide by default) on a text file such as
  TinyShakespeare, as in the induced-metric paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Task:
    name: str
    make_model: Callable[[], torch.nn.Module]
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (inputs, targets), same for everyone
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]  # held-out metrics
    clip: float | None = None  # gradient-norm clipping, as the model's usual training scripts do
    train_set: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, targets), where a task draws its own


# ---- digits ----

def digits(device: str | torch.device, seed: int = 0, batch_size: int = 64, hidden: int = 128) -> Task:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, 10),
        ).to(device)

    order = torch.Generator().manual_seed(seed + 1)
    epoch_perm: list[torch.Tensor] = []

    def batch(step: int):
        per_epoch = len(x_train) // batch_size
        epoch, i = divmod(step, per_epoch)
        while len(epoch_perm) <= epoch:
            epoch_perm.append(torch.randperm(len(x_train), generator=order).to(device))
        idx = epoch_perm[epoch][i * batch_size:(i + 1) * batch_size]
        return x_train[idx], y_train[idx]

    def loss(model, xb, yb):
        return F.cross_entropy(model(xb), yb)

    @torch.no_grad()
    def evaluate(model):
        logits = model(x_test)
        return {"test_loss": F.cross_entropy(logits, y_test).item(),
                "test_acc": (logits.argmax(1) == y_test).float().mean().item()}

    return Task("digits", make_model, batch, loss, evaluate, train_set=(x_train, y_train))


# ---- character-level GPT ----

class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharGPT(torch.nn.Module):
    def __init__(self, vocab: int, block: int, layers: int = 4, heads: int = 4, width: int = 128) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(block, width)
        self.blocks = torch.nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def shakespeare(path: str, device: str | torch.device, seed: int = 0, batch_size: int = 32, block: int = 64,
                layers: int = 4, heads: int = 4, width: int = 128, eval_batches: int = 8) -> Task:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        return CharGPT(len(chars), block, layers, heads, width).to(device)

    def sample(source: torch.Tensor, gen: torch.Generator):
        starts = torch.randint(len(source) - block - 1, (batch_size,), generator=gen)
        x = torch.stack([source[s:s + block] for s in starts])
        y = torch.stack([source[s + 1:s + block + 1] for s in starts])
        return x.to(device), y.to(device)

    def batch(step: int):
        return sample(train, torch.Generator().manual_seed(seed * 1_000_003 + step))

    def loss(model, xb, yb):
        logits = model(xb)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), yb.view(-1))

    @torch.no_grad()
    def evaluate(model):
        gen = torch.Generator().manual_seed(12345)
        losses = [loss(model, *sample(val, gen)).item() for _ in range(eval_batches)]
        mean = sum(losses) / len(losses)
        return {"val_loss": mean, "val_ppl": math.exp(mean)}

    return Task("shakespeare", make_model, batch, loss, evaluate, clip=1.0)  # GPT scripts clip at norm 1


# ---- the loop ----

@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    optimizer_seconds: float = 0.0
    diverged: bool = False


def warmup_cosine(steps: int, warmup: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor of GPT training scripts: linear warmup over the first `warmup` of the steps, then
    a cosine from 1 down to `floor` at the last step."""
    ramp = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        done = (step - ramp) / max(1, steps - 1 - ramp)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    return factor


def train(task: Task, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer], steps: int,
          eval_every: int = 0, sync: Callable[[], None] = lambda: None, schedule: bool = False,
          progress: str | None = None) -> History:
    """Trains a fresh model (make_optimizer gets the model, so it can split its parameters); records the training
    loss every step and held-out metrics every eval_every steps. `sync` (torch.cuda.synchronize on a GPU) makes
    the optimizer timing honest. `schedule`: warmup_cosine on every parameter group's lr. The task's `clip`, if
    set, clips the gradient norm before each step (outside the optimizer's timing). `progress`: a tqdm bar with
    that label and the running training loss."""
    model = task.make_model()
    opt = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps)) if schedule else None
    h = History()
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=progress, leave=False, mininterval=2.0, dynamic_ncols=True)
    running = None
    start = time.perf_counter()
    for step in range(steps):
        x, y = task.batch(step)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, x, y)
        value = loss.item()
        if not math.isfinite(value):  # stop before a NaN gradient reaches any optimizer
            h.diverged = True
            break
        loss.backward()
        if task.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.clip)
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        h.optimizer_seconds += time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        if bar is not None:
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        h.steps.append(step + 1)
        h.train_loss.append(value)
        h.seconds.append(time.perf_counter() - start)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            h.evals.append((step + 1, task.evaluate(model)))
            model.train()
    if bar is not None:
        bar.close()
    if not h.evals and not h.diverged:
        h.evals.append((len(h.steps), task.evaluate(model)))
    return h
