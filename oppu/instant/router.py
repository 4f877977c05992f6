"""Forward-only affinities: a ridge regression from a user's probe features to the gradient ranking.

The gradient affinity (oppu.instant.grad) costs a forward and a backward of the user's probe items
plus an inner product of the gradient with every bank module (on the tiny base ~2 GFLOP, 1/33 of
training that user's module). The router learns that ranking once per bank, on non-test users, from
features one forward gives:

    phi(user) = mean over the probe's target tokens t of  e_t h_t^T          [H x H]
    e_t = W_head^T (softmax(logits_t) - onehot(target_t))                   the output error, in hidden space
    h_t = the final (normed) hidden state that predicts target t

i.e. the loss gradient of a linear map on top of the last hidden state: what the user's items ask the
base's output to move towards. Standardized features -> affinities by kernel ridge regression (linear
kernel), its penalty chosen by cross-validation over the training users (mean agreement of the top-k
sets); stored in primal form (a [H*H, K] matrix), so a user costs one forward and a matrix-vector
product.

    router = fit_router(F, A, top_ks=(4, 8, 16))      # F [n, H*H] features, A [n, K] gradient affinities
    with RouterScorer(model, tok, router, max_len=384) as sc:
        aff = sc.affinities(probe_examples)           # [K]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from oppu.engine import encode
from oppu.engine.batching import collate, length_chunks
from oppu.engine.train import decoder_and_head

PENALTIES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)    # ridge penalty / feature dimension


def probe_features(model, tok, examples: Sequence, max_len: int, tokens_per_forward: int = 1024) -> np.ndarray:
    """phi = mean_t e_t h_t^T (module docstring) over the examples' target tokens, flattened [H * H]
    float64; zeros when there is no target token. One forward of the plain base, no gradient."""
    decoder, head = decoder_and_head(model)
    hid = head.weight.shape[1]
    acc, n = torch.zeros(hid, hid, dtype=torch.float64), 0
    enc = encode(tok, examples, max_len)
    with torch.inference_mode():
        for chunk in length_chunks(enc, tokens_per_forward):
            b = collate([enc[i] for i in chunk], tok.pad_token_id)
            dev = head.weight.device
            h = decoder(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                        use_cache=False).last_hidden_state
            lab = b["labels"].to(dev)
            r, c = (lab[:, 1:] != -100).nonzero(as_tuple=True)
            if not len(r):
                continue
            hs = h[r, c]                                                     # [M, H]
            p = head(hs).float().softmax(-1)
            p[torch.arange(len(r), device=dev), lab[r, c + 1]] -= 1.0       # softmax - onehot
            e = p @ head.weight.float()                                      # [M, H]
            acc += (e.T @ hs.float()).double().cpu()
            n += len(r)
    return (acc / max(n, 1)).flatten().numpy()


@dataclasses.dataclass
class Router:
    mu: np.ndarray                       # [D] feature means of the training users
    sd: np.ndarray                       # [D] their standard deviations (floored)
    w: np.ndarray                        # [D, K] primal ridge weights
    mean: np.ndarray                     # [K] mean affinity of the training users
    penalty: float                       # chosen ridge penalty / D
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:  # the standardization folded in: predict is one matrix-vector product
        self._w = self.w / self.sd[:, None]
        self._b = self.mean - (self.mu / self.sd) @ self.w

    def predict(self, phi: np.ndarray) -> np.ndarray:
        """[K] predicted affinities of one user's features [D]: ((phi - mu) / sd) @ w + mean."""
        if phi.shape != self.mu.shape:
            raise ValueError(f"router features have {phi.shape[0]} dims, the router was fitted on {self.mu.shape[0]}")
        return phi @ self._w + self._b

    def save(self, path: Path) -> None:
        np.savez(path, mu=self.mu, sd=self.sd, w=self.w, mean=self.mean, penalty=self.penalty)

    @classmethod
    def load(cls, path: Path, info: dict | None = None) -> "Router":
        z = np.load(path)
        return cls(z["mu"], z["sd"], z["w"], z["mean"], float(z["penalty"]), dict(info or {}))


def topk_agreement(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Mean over rows of |top-k(pred) & top-k(true)| / k (ties: lower index first)."""
    k = min(k, true.shape[1])
    top = lambda m: np.argsort(-m, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top(pred), top(true))]))


def _standardize(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = f.mean(0), f.std(0)
    return mu, np.maximum(sd, 1e-6 * max(float(sd.mean()), 1e-30))


def _dual(z: np.ndarray, a: np.ndarray, lam: float) -> np.ndarray:
    return np.linalg.solve(z @ z.T + lam * np.eye(len(z)), a)


def fit_router(feats: np.ndarray, aff: np.ndarray, top_ks: Sequence[int], folds: int = 4,
               penalties: Sequence[float] = PENALTIES) -> Router:
    """Kernel ridge from features [n, D] to affinities [n, K]; the penalty (times D) with the best mean
    top-k agreement over `folds` contiguous folds of the n users (k over top_ks below K) wins."""
    n, d = feats.shape
    if n < max(folds, 2) or aff.shape[0] != n:
        raise ValueError(f"the router needs at least {max(folds, 2)} training users with features and affinities, "
                         f"got {n} and {aff.shape[0]}")
    ks = [k for k in top_ks if k < aff.shape[1]] or [1]
    table = {}
    for pen in penalties:
        score = []
        for hold in np.array_split(np.arange(n), folds):
            fit = np.setdiff1d(np.arange(n), hold)
            mu, sd = _standardize(feats[fit])
            z, zq = (feats[fit] - mu) / sd, (feats[hold] - mu) / sd
            m = aff[fit].mean(0)
            pred = (zq @ z.T) @ _dual(z, aff[fit] - m, pen * d) + m
            score.append(np.mean([topk_agreement(pred, aff[hold], k) for k in ks]))
        table[pen] = float(np.mean(score))
    best = max(penalties, key=lambda p: (table[p], -p))
    mu, sd = _standardize(feats)
    z, m = (feats - mu) / sd, aff.mean(0)
    w = z.T @ _dual(z, aff - m, best * d)
    return Router(mu, sd, w, m, best, {"users": n, "cv_top_k_agreement": {str(p): round(v, 4) for p, v in table.items()},
                                       "agreement": round(table[best], 4), "top_ks": ks})


class RouterScorer:
    """The bank's router applied to a user's probe examples (GradScorer's interface, forward only)."""

    def __init__(self, model, tok, router: Router, max_len: int, tokens_per_forward: int = 1024) -> None:
        self.model, self.tok, self.router = model, tok, router
        self.max_len, self.tokens_per_forward = max_len, tokens_per_forward

    def __enter__(self) -> "RouterScorer":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def affinities(self, examples: Sequence) -> np.ndarray:
        """[K] predicted affinities (zeros, as GradScorer gives, when the examples have no target token)."""
        phi = probe_features(self.model, self.tok, examples, self.max_len, self.tokens_per_forward)
        return self.router.predict(phi) if phi.any() else np.zeros(self.router.w.shape[1])
