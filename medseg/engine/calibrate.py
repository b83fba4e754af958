"""Temperature scaling (Guo et al. 2017) fitted on out-of-fold predictions, and expected calibration error.

One scalar ``T`` divides the logits before the softmax: it changes confidence, never the argmax, so Dice
stays the same while probabilities (and the uncertainty maps shown to users) become honest. The fit
minimises the negative log-likelihood over sampled pixels with a bounded 1-D search over ``log T``.

Inputs are log-probabilities: for one model ``softmax(log p / T) == softmax(z / T)`` (the log-sum-exp
shift cancels), so the out-of-fold probability maps are enough — no logits need to be stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar


@dataclass(frozen=True)
class Calibration:
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    pixels: int

    def to_json(self) -> dict[str, float | int | str]:
        return {"temperature": self.temperature, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "nll_before": self.nll_before, "nll_after": self.nll_after, "pixels": self.pixels,
                "fitted_on": "out-of-fold predictions (pixels sampled from every case)"}


def sample_pixels(probs: np.ndarray, target: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` random pixels of one case: log-probabilities ``(m, K)`` float32 and labels ``(m,)`` int64.
    ``probs`` is ``(K, *spatial)``, ``target`` ``(*spatial)``."""
    k = probs.shape[0]
    flat_p = probs.reshape(k, -1)
    flat_t = target.reshape(-1)
    idx = rng.choice(flat_t.size, size=min(n, flat_t.size), replace=False)
    logp = np.log(np.clip(flat_p[:, idx].T.astype(np.float32), 1e-8, 1.0))
    return logp, flat_t[idx].astype(np.int64)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| averaged over equal-width confidence bins, weighted by their pixel counts.
    ``probs (N, K)``, ``labels (N,)``."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * (correct[sel].mean() - conf[sel].mean()).abs()
    return float(ece)


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> Calibration:
    """Temperature minimising the NLL of ``labels (N,)`` under ``softmax(log_probs (N, K) / T)``."""
    z = torch.as_tensor(log_probs, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / float(np.exp(log_t)), y))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    return Calibration(
        temperature=t, nll_before=nll(0.0), nll_after=float(res.fun),
        ece_before=expected_calibration_error(torch.softmax(z, 1), y),
        ece_after=expected_calibration_error(torch.softmax(z / t, 1), y),
        pixels=int(y.numel()),
    )
