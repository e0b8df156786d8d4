"""Image ops on (B,3,H,W): fused crop+flip resampling, colour jitter, grayscale, blur, normalise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import ImageConfig
from .op import Op, Params, bernoulli, to_device, uniform

_GRAY = (0.299, 0.587, 0.114)
CPU_CHUNK = 8  # samples per chunk when the image chain runs on the CPU
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken as already in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) luma, as one weighted channel sum (no host-to-device copy)."""
    w = torch.stack([torch.full((), c, dtype=x.dtype, device=x.device) for c in _GRAY])
    return torch.einsum("c,bchw->bhw", w, x).unsqueeze(1)


class ResizedCropFlip(Op):
    """Random resized crop and horizontal flip, per sample, fused into one ``grid_sample``.

    Params: ``box`` (B,4) = centre x, centre y, width, height in input pixels; ``flip`` (B,) bool.
    Eval mode: the centred box of the output's aspect ratio covering ``eval_crop`` of each side.
    An input larger than twice the output is first resized with antialiasing, so small outputs
    do not alias; the box is in normalised coordinates and is unaffected by that.
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.size = cfg.size
        self.scale, self.ratio, self.hflip_p, self.eval_crop = cfg.scale, cfg.ratio, cfg.hflip_p, cfg.eval_crop

    def make_params(self, x: torch.Tensor, generator: torch.Generator | None) -> Params:
        B, _, H, W = x.shape
        dev = x.device
        if not self.training:
            aspect = self.size[1] / self.size[0]
            w, h = (H * aspect, float(H)) if W / H > aspect else (float(W), W / aspect)
            box = torch.stack([torch.full((B,), v, device=dev) for v in (W / 2, H / 2, w * self.eval_crop,
                                                                           h * self.eval_crop)], 1)
            return {"box": box, "flip": torch.zeros(B, dtype=torch.bool, device=dev)}
        area = H * W * uniform(generator, (B,), *self.scale, device=dev)
        log_r = uniform(generator, (B,), math.log(self.ratio[0]), math.log(self.ratio[1]), device=dev)
        w = torch.sqrt(area * log_r.exp()).clamp(max=W)
        h = torch.sqrt(area / log_r.exp()).clamp(max=H)
        cx = w / 2 + uniform(generator, (B,), device=dev) * (W - w)
        cy = h / 2 + uniform(generator, (B,), device=dev) * (H - h)
        flip = bernoulli(generator, (B,), self.hflip_p, device=dev)
        return {"box": torch.stack([cx, cy, w, h], 1), "flip": flip}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x = to_float(x)  # (B,3,H,W) in [0, 1]
        B, C, H, W = x.shape
        oh, ow = self.size
        if H > 2 * oh or W > 2 * ow:
            x = F.interpolate(x, size=(min(H, 2 * oh), min(W, 2 * ow)), mode="bilinear", antialias=True,
                              align_corners=False)
        box = params["box"].to(x.dtype)
        cx, cy, w, h = box.unbind(1)
        sign = 1.0 - 2.0 * params["flip"].to(x.dtype)
        theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)  # output [-1,1] -> input [-1,1]
        theta[:, 0, 0] = sign * w / W
        theta[:, 0, 2] = 2 * cx / W - 1
        theta[:, 1, 1] = h / H
        theta[:, 1, 2] = 2 * cy / H - 1
        grid = F.affine_grid(theta, [B, C, oh, ow], align_corners=False)  # (B,oh,ow,2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class ColorJitter(Op):
    """Brightness, contrast, saturation and hue factors per sample, applied with probability p.

    Params: ``brightness``, ``contrast``, ``saturation`` (B,) multiplicative factors, ``hue`` (B,) in turns;
    a sample not jittered gets the identity (1, 1, 1, 0). Works on float images in [0, 1].
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.b, self.c, self.s, self.h, self.p = cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.jitter_p
        yiq = torch.tensor(_YIQ, dtype=torch.float64)
        self.register_buffer("yiq", yiq.float(), persistent=False)
        self.register_buffer("yiq_inv", torch.linalg.inv(yiq).float(), persistent=False)

    def make_params(self, x: torch.Tensor, generator: torch.Generator | None) -> Params:
        B, dev = x.shape[0], x.device
        if not self.training:
            one = torch.ones(B, device=dev)
            return {"brightness": one, "contrast": one, "saturation": one, "hue": torch.zeros(B, device=dev)}
        on = bernoulli(generator, (B,), self.p, device=dev)
        out = {}
        for name, r in (("brightness", self.b), ("contrast", self.c), ("saturation", self.s)):
            out[name] = torch.where(on, uniform(generator, (B,), 1 - r, 1 + r, device=dev), 1.0)
        out["hue"] = torch.where(on, uniform(generator, (B,), -self.h, self.h, device=dev), 0.0)
        return out

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # each step writes one fresh (B,3,H,W) tensor and clamps it in place: few passes over memory
        view = (-1, 1, 1, 1)
        x = to_float(x)
        if self.b > 0:
            x = (x * params["brightness"].view(view)).clamp_(0, 1)
        if self.c > 0:
            mean = _gray(x).mean((-1, -2), keepdim=True)  # (B,1,1,1)
            x = torch.lerp(mean.expand_as(x), x, params["contrast"].view(view)).clamp_(0, 1)
        if self.s > 0:
            x = torch.lerp(_gray(x).expand_as(x), x, params["saturation"].view(view)).clamp_(0, 1)
        if self.h > 0:
            angle = params["hue"] * (2 * math.pi)
            cos, sin = angle.cos(), angle.sin()
            rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)  # (B,3,3) rotation of (I, Q)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            yiq, yiq_inv = (to_device(t, x.device) for t in (self.yiq, self.yiq_inv))
            m = yiq_inv @ rot @ yiq  # (B,3,3) in RGB
            x = torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)
        return x


class RandomGrayscale(Op):
    """Turn a sample to grayscale (3 equal channels) with probability p. Params: ``gray`` (B,) bool."""

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.p = cfg.grayscale_p

    def make_params(self, x: torch.Tensor, generator: torch.Generator | None) -> Params:
        if not self.training:
            return {"gray": torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)}
        return {"gray": bernoulli(generator, (x.shape[0],), self.p, device=x.device)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x = to_float(x)
        return torch.where(params["gray"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


class GaussianBlur(Op):
    """Separable gaussian blur with a per-sample sigma, applied with probability p.

    Params: ``sigma`` (B,) in pixels, ``blur`` (B,) bool. One grouped convolution per axis for the batch.
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.k, self.sigma, self.p = cfg.blur_kernel, cfg.blur_sigma, cfg.blur_p

    def make_params(self, x: torch.Tensor, generator: torch.Generator | None) -> Params:
        B, dev = x.shape[0], x.device
        if not self.training:
            return {"sigma": torch.full((B,), self.sigma[0], device=dev),
                    "blur": torch.zeros(B, dtype=torch.bool, device=dev)}
        return {"sigma": uniform(generator, (B,), *self.sigma, device=dev),
                "blur": bernoulli(generator, (B,), self.p, device=dev)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x = to_float(x)
        B, C, H, W = x.shape
        r = self.k // 2
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)  # (k,)
        sigma = params["sigma"].to(x.dtype).view(B, 1)
        kern = torch.exp(-(t**2) / (2 * sigma**2))
        kern = (kern / kern.sum(1, keepdim=True)).unsqueeze(1).expand(B, C, self.k).reshape(B * C, self.k)
        y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")
        y = F.conv2d(y, kern.view(B * C, 1, 1, self.k), groups=B * C)
        y = F.conv2d(y, kern.view(B * C, 1, self.k, 1), groups=B * C).view(B, C, H, W)
        return torch.where(params["blur"].view(-1, 1, 1, 1), y, x)


class Normalize(Op):
    """(x - mean) / std per channel; deterministic (no params)."""

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def make_params(self, x, generator=None) -> Params:
        return {}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        mean, std = to_device(self.mean, x.device), to_device(self.std, x.device)
        return (to_float(x) - mean).div_(std)


class ImageAugment(Op):
    """The image chain: uint8 (B,3,H,W) -> float32 normalised (B,3,H',W').

    Train: crop+flip, jitter, grayscale, blur, normalise. Eval: centre crop/resize and normalise only.
    Params: {op name: that op's params}.
    """

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.crop = ResizedCropFlip(cfg)
        self.jitter = ColorJitter(cfg)
        self.gray = RandomGrayscale(cfg)
        self.blur = GaussianBlur(cfg)
        self.norm = Normalize(cfg)
        # ops that can never fire are left out of the chain (a config-level choice, not a data-dependent one)
        probs = {"jitter": cfg.jitter_p, "gray": cfg.grayscale_p, "blur": cfg.blur_p}
        self.random_ops = tuple(name for name, p in probs.items() if p > 0)

    def make_params(self, x: torch.Tensor, generator: torch.Generator | None) -> Params:
        params = {"crop": self.crop.make_params(x, generator)}
        if self.training:
            like = x[:, :0]  # (B,0,H,W): batch size and device, no data
            for name in self.random_ops:
                params[name] = getattr(self, name).make_params(like, generator)
        return params

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        B = x.shape[0]
        if x.device.type == "cpu" and B > CPU_CHUNK:  # CPU: chunks that stay in cache (several times faster)
            return torch.cat([self._chain(x[i:i + CPU_CHUNK], _rows(params, slice(i, i + CPU_CHUNK)))
                              for i in range(0, B, CPU_CHUNK)])
        return self._chain(x, params)

    def _chain(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x = self.crop.apply(x, params["crop"])
        for name in self.random_ops:
            if name in params:
                x = getattr(self, name).apply(x, params[name])
        return self.norm.apply(x, {})


def _rows(params: Params, rows: slice) -> Params:
    """The params of a slice of the batch (every param tensor is batch-first)."""
    return {k: _rows(v, rows) if isinstance(v, dict) else v[rows] for k, v in params.items()}
