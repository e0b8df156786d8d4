"""Task-loss weighting, kept apart from the model: one small interface for every method.

A ``Weighting`` is an ``nn.Module`` (so ``.to(device)``, ``state_dict`` and ``load_state_dict``
work). The trainer calls, each step::

    total = weighting.backward(losses, shared_params)   # fills .grad; returns the detached total
    optimizer.step()                                    # over model + weighting.parameters()

and ``weighting.end_epoch()`` after each epoch (DWA uses it). ``combine(losses)`` returns the
weighted scalar without a backward pass (for evaluation and logging). Gradient methods (GradNorm,
PCGrad) need ``shared_params``: the parameters every task reaches (``model.shared_parameters()``,
or for GradNorm ``model.last_shared_parameters()``).

Under ``torch.distributed`` (DDP), ``backward`` averages over ranks what DDP does not see: the
gradients of the weighting's own parameters, PCGrad's projection correction, GradNorm's weight
update and DWA's epoch losses, so every rank keeps the same weights. Call ``backward`` on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmdata.errors import ConfigError
from mmdata.tasks import Task, TaskList

WEIGHTINGS = ("equal", "static", "uncertainty", "dwa", "gradnorm", "pcgrad")
OPTIONS = {"static": ("weights",), "dwa": ("temperature",), "gradnorm": ("alpha", "lr"), "pcgrad": ("seed",)}


@dataclass(frozen=True)
class WeightingConfig:
    """A weighting method and its options; an option left null takes the method's default."""

    SHORTHAND: ClassVar[str] = "name"  # `weighting: dwa` in a config means {name: dwa}

    name: str = "equal"  # one of WEIGHTINGS
    weights: dict[str, float] | None = None  # static: {task: weight}, unnamed tasks weigh 1
    temperature: float | None = None  # dwa: softmax temperature over loss ratios (2.0)
    alpha: float | None = None  # gradnorm: restoring force (1.5)
    lr: float | None = None  # gradnorm: learning rate of the weights (0.025)
    seed: int | None = None  # pcgrad: seed of the order in which task gradients are projected (0)

    def __post_init__(self) -> None:
        if self.name not in WEIGHTINGS:
            raise ConfigError(f"weighting.name must be one of {list(WEIGHTINGS)}, got {self.name!r}")
        foreign = [k for k in self.options() if k not in OPTIONS.get(self.name, ())]
        if foreign:
            owners = {k: m for m, keys in OPTIONS.items() for k in keys}
            raise ConfigError(f"weighting.{foreign[0]} is an option of {owners[foreign[0]]!r}, not of "
                              f"{self.name!r}; remove it or set weighting.name: {owners[foreign[0]]}")

    def options(self) -> dict[str, Any]:
        """The options set, as ``make_weighting`` takes them."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


class Weighting(nn.Module):
    """Equal weighting (sum of task losses); the base of every other method."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)

    def weights(self) -> dict[str, float]:
        """Current weight of each task (for logging)."""
        return {t: 1.0 for t in self.tasks}

    def combine(self, losses: dict[str, torch.Tensor], shared_params=None) -> torch.Tensor:
        """The weighted total of the task losses present in ``losses`` (a scalar tensor)."""
        w = self.weights()
        return sum(w[t] * loss for t, loss in self._present(losses))

    def backward(self, losses: dict[str, torch.Tensor], shared_params=None) -> torch.Tensor:
        """Backpropagate the weighted total into ``.grad``; return it detached."""
        total = self.combine(losses, shared_params)
        total.backward()
        self._average_own_grads()
        return total.detach()

    def _average_own_grads(self) -> None:
        """Average the grads of this module's parameters over ranks (DDP only wraps the model)."""
        for p in self.parameters():
            if p.grad is not None:
                _rank_mean_(p.grad)

    def end_epoch(self, epoch_losses: dict[str, float] | None = None) -> None:
        """Hook called after each training epoch; no-op unless the method tracks loss history."""

    def _present(self, losses: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise ConfigError(f"losses for unknown task(s) {sorted(unknown)}; weighting tasks are {self.tasks}")
        present = [(t, losses[t]) for t in self.tasks if t in losses]
        if not present:
            raise ConfigError("no task losses to combine; the batch has none of the tasks' labels")
        return present


class StaticWeighting(Weighting):
    """Fixed, given weights per task (missing tasks weigh 1)."""

    def __init__(self, tasks: Sequence[str], weights: dict[str, float] | None = None):
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(tasks)
        if unknown:
            raise ConfigError(f"static weights name unknown task(s) {sorted(unknown)}; tasks are {list(tasks)}")
        bad = {t: w for t, w in weights.items() if not (isinstance(w, (int, float)) and w >= 0)}
        if bad:
            raise ConfigError(f"static weights must be non-negative numbers, got {bad}")
        self.register_buffer("w", torch.tensor([float(weights.get(t, 1.0)) for t in tasks]))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.w.tolist()))

    def combine(self, losses, shared_params=None):
        return sum(self.w[self.tasks.index(t)] * loss for t, loss in self._present(losses))


class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

    With a learnable s_t = log sigma_t^2 per task: total = sum_t c_t exp(-s_t) L_t + s_t / 2, where
    c_t = 1/2 for regression and 1 for classification. At the optimum exp(-s_t) = 1 / (2 c_t L_t):
    the noisier task (larger loss) weighs less. Optimise ``parameters()`` with the model.
    """

    def __init__(self, tasks: Sequence[str], task_types: dict[str, str] | None = None):
        super().__init__(tasks)
        types = task_types or {}
        self.register_buffer("c", torch.tensor([0.5 if types.get(t) == "regression" else 1.0 for t in tasks]))
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, (self.c * torch.exp(-self.log_vars.detach())).tolist()))

    def combine(self, losses, shared_params=None):
        total = 0.0
        for t, loss in self._present(losses):
            i = self.tasks.index(t)
            total = total + self.c[i] * torch.exp(-self.log_vars[i]) * loss + 0.5 * self.log_vars[i]
        return total


class DWA(Weighting):
    """Dynamic weight average (Liu, Johns & Davison 2019).

    w_t(e) = T * exp(r_t / temp) / sum_k exp(r_k / temp), with r_t = L_t(e-1) / L_t(e-2) the ratio of
    the task's mean training loss over the last two epochs; weights are 1 for the first two epochs.
    ``combine`` accumulates the epoch's losses on the device (no sync); ``end_epoch`` updates the weights.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        if temperature <= 0:
            raise ConfigError(f"dwa temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        T = len(tasks)
        self.register_buffer("w", torch.ones(T))
        self.register_buffer("history", torch.zeros(2, T))  # mean losses of epochs e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(T))  # this epoch's loss sums
        self.register_buffer("counts", torch.zeros(T))

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.w.tolist()))

    def combine(self, losses, shared_params=None):
        present = self._present(losses)
        if self.training and torch.is_grad_enabled():
            for t, loss in present:
                i = self.tasks.index(t)
                self.running[i] += loss.detach().float()
                self.counts[i] += 1
        return sum(self.w[self.tasks.index(t)] * loss for t, loss in present)

    def end_epoch(self, epoch_losses: dict[str, float] | None = None) -> None:
        """Close an epoch with its mean task losses (given, or accumulated by ``combine``)."""
        _rank_mean_(self.running)
        _rank_mean_(self.counts)
        means = self.running / self.counts.clamp_min(1)
        if epoch_losses:  # given means win; tasks they leave out keep the accumulated ones
            given = [t in epoch_losses for t in self.tasks]
            values = torch.tensor([float(epoch_losses.get(t, 0.0)) for t in self.tasks], device=self.w.device)
            means = torch.where(torch.tensor(given, device=self.w.device), _rank_mean_(values), means)
        self.history[0] = self.history[1]
        self.history[1] = means
        self.epochs_seen += 1
        self.running.zero_()
        self.counts.zero_()
        if int(self.epochs_seen) >= 2:
            r = self.history[1] / self.history[0].clamp_min(1e-12)
            self.w.copy_(len(self.tasks) * torch.softmax(r / self.temperature, dim=0))


def _rank_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` in place over torch.distributed ranks (no-op when not initialised); return it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _task_grads(losses: list[torch.Tensor], params: list[nn.Parameter]) -> torch.Tensor:
    """Flattened gradient of each loss w.r.t. params: (T, P); unused params give zeros."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


class GradNorm(Weighting):
    """GradNorm (Chen et al. 2018): learn task weights so gradient norms on the shared layer track
    each task's relative training rate.

    With G_t = ||grad_W w_t L_t|| and r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0)), the weights take a
    gradient step (rate ``lr``) on sum_t |G_t - mean(G) r_t^alpha| (target held constant), then are
    clipped positive and renormalised to sum to the number of tasks. The weights are updated inside
    ``backward`` by this rule, not by the model's optimizer.
    """

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025):
        super().__init__(tasks)
        self.alpha, self.lr = float(alpha), float(lr)
        T = len(tasks)
        self.register_buffer("w", torch.ones(T))
        self.register_buffer("initial", torch.zeros(T))  # L_t(0); 0 = not seen yet

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self.w.tolist()))

    def combine(self, losses, shared_params=None):
        return sum(self.w[self.tasks.index(t)] * loss for t, loss in self._present(losses))

    def backward(self, losses, shared_params=None):
        if shared_params is None:
            raise ConfigError("GradNorm needs shared_params: pass model.last_shared_parameters()")
        params = [p for p in shared_params if p.requires_grad]
        present = self._present(losses)
        idx = torch.tensor([self.tasks.index(t) for t, _ in present], device=self.w.device)
        L = torch.stack([loss.detach().float() for _, loss in present])  # (T',)
        first = self.initial[idx] == 0
        self.initial[idx] = torch.where(first, L.clamp_min(1e-12), self.initial[idx])
        norms = _task_grads([loss for _, loss in present], params).norm(dim=1)  # (T',)
        w = self.w[idx]
        G = w * norms  # (T',)
        ratio = L / self.initial[idx]
        target = G.mean() * (ratio / ratio.mean()) ** self.alpha  # held constant
        total = self.combine(losses)
        total.backward()
        grad_w = _rank_mean_(torch.sign(G - target) * norms)  # d/dw_t of |w_t n_t - target_t|
        new = (w - self.lr * grad_w).clamp_min(1e-4)
        self.w[idx] = new
        self.w.mul_(len(self.tasks) / self.w.sum())
        return total.detach()


class PCGrad(Weighting):
    """Projecting conflicting gradients (Yu et al. 2020) on the shared parameters.

    Each task's gradient g_i is projected, against the other tasks in random order, onto the normal
    plane of every g_j it conflicts with (g_i . g_j < 0); the shared parameters receive the sum of the
    projected gradients, the task-specific ones their plain gradients. Order from a seeded Generator.
    """

    def __init__(self, tasks: Sequence[str], seed: int = 0):
        super().__init__(tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Projected per-task gradients (T, P) of grads (T, P)."""
        out = grads.clone()
        T = grads.shape[0]
        for i in range(T):
            for j in torch.randperm(T, generator=self.generator).tolist():
                if j == i:
                    continue
                dot = out[i] @ grads[j]
                coef = torch.where(dot < 0, dot / grads[j].square().sum().clamp_min(1e-20), 0.0)
                out[i] = out[i] - coef * grads[j]
        return out

    def backward(self, losses, shared_params=None):
        if shared_params is None:
            raise ConfigError("PCGrad needs shared_params: pass model.shared_parameters()")
        params = [p for p in shared_params if p.requires_grad]
        present = [loss for _, loss in self._present(losses)]
        grads = _task_grads(present, params)  # (T, P)
        total = self.combine(losses)
        total.backward()  # task-specific params get their plain gradients; shared get sum(grads)
        correction = _rank_mean_(self.project(grads).sum(0) - grads.sum(0))  # (P,), as DDP averages
        offset = 0
        for p in params:
            n = p.numel()
            delta = correction[offset:offset + n].view_as(p)
            p.grad = delta.clone() if p.grad is None else p.grad + delta
            offset += n
        return total.detach()

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["generator_state"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator_state", None)
        if gen is not None:
            self.generator.set_state(gen)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def make_weighting(name: str, tasks: TaskList | Iterable[Task] | Iterable[str], **opts) -> Weighting:
    """Build the weighting method ``name`` (one of WEIGHTINGS) for ``tasks``; opts go to its constructor."""
    items = list(tasks)
    names = [t.name if isinstance(t, Task) else str(t) for t in items]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"weighting needs distinct task names, got {names}")
    classes = {"equal": Weighting, "static": StaticWeighting, "uncertainty": UncertaintyWeighting,
               "dwa": DWA, "gradnorm": GradNorm, "pcgrad": PCGrad}
    if name not in classes:
        raise ConfigError(f"weighting must be one of {list(WEIGHTINGS)}, got {name!r}")
    if name == "uncertainty" and "task_types" not in opts:
        opts["task_types"] = {t.name: t.type for t in items if isinstance(t, Task)}
    try:
        return classes[name](names, **opts)
    except TypeError as e:
        raise ConfigError(f"bad option for weighting {name!r}: {e}") from None
