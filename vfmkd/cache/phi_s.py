"""PHI-S standardisation of a teacher's features (Ranzinger et al., "PHI-S: Distribution Balancing for
Label-Free Multi-Teacher Distillation", arXiv 2410.01680).

With the features' mean ``mu`` and covariance ``Sigma = U diag(lambda) U^T`` (over the valid cells of
every cached image), PHI-S maps a channel vector ``x`` (C,) to

    ``y = (1 / alpha) * H @ U^T @ (x - mu)``,  ``alpha = sqrt(mean(lambda))``

where ``H`` is a normalised Hadamard matrix (entries +-1/sqrt(C), orthogonal). ``U^T`` decorrelates the
channels; ``H`` then spreads the variance of every principal direction equally over all C outputs, so
every output dimension has variance exactly ``mean(lambda) / alpha^2 = 1`` and, unlike PCA whitening,
the map is a rotation times ONE scalar: distances keep their geometry and nothing is blown up along
tiny-variance directions. Every teacher so standardised has the same per-dimension variance, which is
what lets several teachers' losses contribute comparably. The inverse is ``x = alpha * U @ H^T @ y + mu``.

Hadamard matrices of order C: Sylvester's (powers of two, ``scipy.linalg.hadamard``) times Paley's
construction I (order q + 1, q a prime = 3 mod 4) cover C = 2^k (q + 1): 384 = 12 x 32, 768 = 12 x 64,
1280 = 20 x 64, 1536 = 12 x 128... Other C (odd ones have none) get an orthogonal matrix built by
Givens rotations that equalise the rotated covariance's diagonal (Schur-Horn), the same property
for that covariance.

Cache layout: ``stats/<name>/phi_s_rotation`` (C, C) float32 (= H @ U^T) and the attribute
``phi_s_alpha`` of ``stats/<name>`` (the mean is ``stats/<name>/mean``), written by
:func:`store_phi_s` once every image is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import h5py
import numpy as np
import torch
from scipy.linalg import hadamard

from vfmkd.core.feature_spec import FeatureSpec

ROTATION = "phi_s_rotation"
ALPHA = "phi_s_alpha"


@dataclass(frozen=True)
class PhiS:
    """One feature's PHI-S transform: ``mean`` (C,), ``rotation`` (C, C) orthogonal (H @ U^T), ``alpha``
    (scalar > 0). :meth:`apply` / :meth:`invert` act on (B, C, h, w) maps (or (C,) vectors via [None, :, None,
    None])."""

    mean: torch.Tensor
    rotation: torch.Tensor
    alpha: float

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w) standardised: every channel of the cached data has variance 1."""
        m, r = self.mean.to(x.device, torch.float32), self.rotation.to(x.device, torch.float32)
        return torch.einsum("dc,bchw->bdhw", r, x.float() - m.view(1, -1, 1, 1)) / self.alpha

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`apply`: (B, C, h, w) standardised -> teacher features."""
        m, r = self.mean.to(y.device, torch.float32), self.rotation.to(y.device, torch.float32)
        return torch.einsum("dc,bdhw->bchw", r, y.float() * self.alpha) + m.view(1, -1, 1, 1)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def paley_hadamard(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4) (entries +-1)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
    jacobsthal = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + np.eye(q + 1, dtype=np.int64)


def hadamard_matrix(n: int) -> Optional[np.ndarray]:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``) from Sylvester x Paley, or None
    when these constructions do not give one."""
    power = n & -n  # the largest power of two dividing n
    rest = n // power
    if rest == 1:
        return hadamard(n)
    # rest * 2^j = q + 1 for a prime q = 3 mod 4 and some j <= log2(power)
    for j in range(power.bit_length()):
        order = rest << j
        if order % 4 == 0 and _is_prime(order - 1):
            return np.kron(paley_hadamard(order - 1), hadamard(power >> j))
    return None


def equalising_rotation(eigenvalues: np.ndarray) -> np.ndarray:
    """An orthogonal (C, C) ``R`` with ``diag(R diag(eigenvalues) R^T)`` all equal to their mean, for any C:
    Givens rotations, each setting one diagonal entry to the mean (C - 1 of them)."""
    c = len(eigenvalues)
    d, r, target = np.array(eigenvalues, np.float64), np.eye(c), float(np.mean(eigenvalues))
    cov = np.diag(d)
    for _ in range(c - 1):
        diag = np.diag(cov)
        i, j = int(np.argmax(diag)), int(np.argmin(diag))
        if diag[i] - diag[j] <= 1e-12 * max(abs(target), 1e-30):
            break
        # rotate (i, j) by theta so the new cov[j, j] == target: a c^2 + b s^2 + 2 o c s == target
        a, b, o = cov[j, j], cov[i, i], cov[i, j]
        theta = _solve_angle(a, b, o, target)
        g = np.eye(c)
        g[[j, j, i, i], [j, i, j, i]] = np.cos(theta), np.sin(theta), -np.sin(theta), np.cos(theta)
        cov, r = g @ cov @ g.T, g @ r
    return r


def _solve_angle(a: float, b: float, o: float, target: float) -> float:
    """theta in [0, pi/2] with a cos^2 + b sin^2 + 2 o cos sin == target (a <= target <= b: bisection)."""
    lo, hi = 0.0, np.pi / 2

    def f(t: float) -> float:
        return a * np.cos(t) ** 2 + b * np.sin(t) ** 2 + 2 * o * np.cos(t) * np.sin(t) - target

    sign_lo = f(lo) <= 0
    for _ in range(80):
        mid = (lo + hi) / 2
        if (f(mid) <= 0) == sign_lo:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def phi_s_from_moments(mean: np.ndarray, covariance: np.ndarray) -> PhiS:
    """The PHI-S transform of features with ``mean`` (C,) and ``covariance`` (C, C) (float64)."""
    cov = (covariance + covariance.T) / 2
    eigenvalues, u = np.linalg.eigh(cov)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    c = len(mean)
    h = hadamard_matrix(c)
    rotation = (h / np.sqrt(c)) if h is not None else equalising_rotation(eigenvalues)
    alpha = float(np.sqrt(max(eigenvalues.mean(), 1e-12)))
    return PhiS(torch.from_numpy(np.asarray(mean, np.float32)),
                torch.from_numpy((rotation @ u.T).astype(np.float32)), alpha)


class CovarianceSum:
    """Running sums over feature vectors (float64, in the order added: deterministic): ``add((n, C))``;
    :meth:`moments` -> (mean (C,), population covariance (C, C))."""

    def __init__(self, channels: int) -> None:
        self.n, self.total, self.outer = 0, np.zeros(channels), np.zeros((channels, channels))

    def add(self, vectors: np.ndarray) -> None:
        v = np.asarray(vectors, np.float64)
        self.n += v.shape[0]
        self.total += v.sum(axis=0)
        self.outer += v.T @ v

    def moments(self) -> tuple:
        mean = self.total / max(self.n, 1)
        return mean, self.outer / max(self.n, 1) - np.outer(mean, mean)


def valid_vectors(fmap: torch.Tensor | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(C, h, w) map -> (rows * cols, C) vectors of its valid top-left cells."""
    arr = fmap.float().numpy() if isinstance(fmap, torch.Tensor) else np.asarray(fmap, np.float32)
    return arr[:, :rows, :cols].reshape(arr.shape[0], -1).T


# PHI-S needs a covariance, not every image: a fixed, evenly spaced sample keeps finishing a cache (and
# indexing a sharded one) as fast at a million images as at a thousand; 256 images give >= 10^4 cells per
# channel at any cached size.
PHI_S_SAMPLE_IMAGES = 256


def sample_indices(n: int, limit: int = PHI_S_SAMPLE_IMAGES) -> np.ndarray:
    """Evenly spaced image indices (all when ``n <= limit``): deterministic, so a resumed cache agrees."""
    return np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def store_phi_s(f: h5py.File, specs: Sequence[FeatureSpec], decoded_block, block: int = 16) -> Dict[str, PhiS]:
    """Compute and store every feature's PHI-S transform over the valid cells of (a sample of at most
    ``PHI_S_SAMPLE_IMAGES``) images of ``f``. ``decoded_block(name, start, stop)`` -> ((n, C, h, w) float
    features as the reader returns them, rows (n,), cols (n,)): the caller's codec. Returns {name: PhiS}."""
    out = {}
    picked = sample_indices(len(f["done"]))
    runs = np.split(picked, np.flatnonzero(np.diff(picked) != 1) + 1)  # contiguous runs, read in blocks
    for s in specs:
        acc = CovarianceSum(s.channels)
        for run in runs:
            for start in range(int(run[0]), int(run[-1]) + 1, block):
                feats, rows, cols = decoded_block(s.name, start, min(start + block, int(run[-1]) + 1))
                for i in range(feats.shape[0]):
                    acc.add(valid_vectors(feats[i], int(rows[i]), int(cols[i])))
        phi = phi_s_from_moments(*acc.moments())
        g = f[f"stats/{s.name}"]
        if ROTATION in g:
            del g[ROTATION]
        g.create_dataset(ROTATION, data=phi.rotation.numpy())
        g.attrs[ALPHA] = phi.alpha
        out[s.name] = phi
    f.flush()
    return out


def read_phi_s(group: h5py.Group) -> Optional[PhiS]:
    """The stored transform of a ``stats/<name>`` group, None when the cache has none (older or unfinished)."""
    if ROTATION not in group or ALPHA not in group.attrs:
        return None
    mean = group["mean"][:]
    if not np.isfinite(mean).all():
        return None
    return PhiS(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(group[ROTATION][:].astype(np.float32)),
                float(group.attrs[ALPHA]))
