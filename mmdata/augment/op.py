"""Op: the base of every augmentation; per-sample params drawn from a given torch.Generator."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

Params = dict[str, Any]  # tensors, or nested dicts of tensors


class Op(nn.Module):
    """An augmentation split into ``make_params`` (random, per sample) and ``apply`` (deterministic).

    Params are drawn on the generator's device and moved to the data's device, so a CPU generator gives
    the same params, hence the same result (within float tolerance), on CPU and CUDA. A CUDA generator
    avoids the host-to-device copy of large params (audio noise). No op synchronises host and device,
    except a CUDA generator with CPU data: that device-to-host copy blocks (see ``to_device``).
    """

    def make_params(self, x: Any, generator: torch.Generator | None) -> Params:
        """Draw per-sample params (in eval mode: the deterministic ones, no generator needed)."""
        raise NotImplementedError

    def apply(self, x: Any, params: Params) -> Any:
        raise NotImplementedError

    def forward(self, x: Any, generator: torch.Generator | None = None, params: Params | None = None,
                return_params: bool = False):
        """Draw params (unless given) and apply them; with ``return_params`` return (out, params)."""
        if params is None:
            if self.training:
                generator = need_generator(generator, type(self).__name__)
            params = self.make_params(x, generator)
        out = self.apply(x, params)
        return (out, params) if return_params else out


def sometimes_uniform(op: Op, generator: torch.Generator | None, n: int, p: float, low: float, high: float,
                      device: torch.device) -> torch.Tensor:
    """(n,) per-sample values: with probability ``p`` uniform in [low, high), else 0; always 0 in eval mode."""
    if not op.training:
        return torch.zeros(n, device=device)
    on = bernoulli(generator, (n,), p, device=device)
    return torch.where(on, uniform(generator, (n,), low, high, device=device), 0.0)


def need_generator(generator: torch.Generator | None, who: str) -> torch.Generator:
    if generator is None:
        raise ConfigError(f"{who}: random augmentation needs generator=torch.Generator(); "
                          "pass one seeded from (seed, epoch), or call .eval() for deterministic transforms")
    return generator


def uniform(generator: torch.Generator, shape: tuple[int, ...], low: float | torch.Tensor = 0.0,
            high: float | torch.Tensor = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """U[low, high) of ``shape`` drawn on the generator's device, returned on ``device``."""
    u = torch.rand(shape, generator=generator, device=generator.device)
    if device is not None:
        u = to_device(u, device)
    return low + (high - low) * u


def bernoulli(generator: torch.Generator, shape: tuple[int, ...], p: float,
              device: torch.device | None = None) -> torch.Tensor:
    """Bool tensor of ``shape``, True with probability p."""
    return uniform(generator, shape, device=device) < p


def normal(generator: torch.Generator, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    z = torch.randn(shape, generator=generator, device=generator.device)
    return to_device(z, device) if device is not None else z


def copy_is_async_safe(src: torch.device, dst: torch.device) -> bool:
    """Whether a ``non_blocking`` copy from ``src`` to ``dst`` is safe without a later synchronise.

    Only host-to-device: the host's view of a non_blocking device-to-host copy may be read before the
    copy lands (garbage, with no error); a device-to-device copy is ordered on the stream anyway.
    """
    return src.type == "cpu" and dst.type != "cpu"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: asynchronous host-to-device, blocking device-to-host."""
    device = torch.device(device)
    return t.to(device, non_blocking=copy_is_async_safe(t.device, device))


def params_to(params: Params, device: torch.device) -> Params:
    """Move a (nested) params dict to ``device``; used to replay CPU params on CUDA."""
    out: Params = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = params_to(v, device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out
