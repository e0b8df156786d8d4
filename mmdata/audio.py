"""Audio sample arrays: the one resampler of the build and the loader (numpy and soxr, no torch)."""

from __future__ import annotations

import numpy as np


def resample(y: np.ndarray, rate: int, target: int) -> np.ndarray:
    """(N, C) at ``rate`` -> (ceil(N * target / rate), C) at ``target``: soxr's high quality, each channel on its
    own (what ``librosa.resample`` does by default, without its first call's second of lazy imports)."""
    import soxr

    n = -(-y.shape[0] * target // rate)
    out = np.empty((n, y.shape[1]), dtype=np.float32)
    for c in range(y.shape[1]):
        z = soxr.resample(np.ascontiguousarray(y[:, c]), rate, target, quality="soxr_hq")[:n]
        out[:len(z), c] = z
        out[len(z):, c] = 0.0
    return out
