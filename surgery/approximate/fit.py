"""Best structured approximations of given attention matrices (MOHAWK Table 3, Bick et al. 2024, arXiv 2408.10189).

For a batch of causal matrices ``P (N, L, L)`` (teacher attention, rows are queries), each family's
best approximation ``M`` in Frobenius norm, fitted per matrix with free (input-independent)
generators, the way the paper's Table 3 measures how expressive a family is:

* ``toeplitz``: ``M[l, s] = k[l - s]``; the optimum is closed-form (each diagonal's mean), no rank;
* ``low_rank``: ``M = tril(Q K^T)``, ``Q, K (L, r)`` (linear attention without a feature map; Katharopoulos
  et al. 2020, arXiv 2006.16236);
* ``ssd``: ``M = tril(Q K^T) * exp(segsum(log_a))``, one log-decay per position (Mamba-2 / discrete Mamba-2);
* ``semiseparable``: ``M[l, s] = sum_n Q_l[n] K_s[n] exp(sum_{s<k<=l} log_a_k[n])``, a log-decay per position
  and state dimension (diagonal transitions, GLA / Mamba-1; Yang et al. 2023, arXiv 2312.06635).

The families nest (low_rank is ssd with ``log_a = 0``; ssd is semiseparable with the decay shared over
``n``), so each is warm-started at the previous family's optimum: a truncated SVD of ``P`` for low_rank,
then ``log_a = 0``, then the shared decay broadcast. Projected Adam (``log_a`` clamped to ``<= 0``)
then only improves on the smaller family, so the distances found respect the nesting. Decays are
kept within ``[LOG_A_FLOOR, 0]`` (a per-token decay of at least exp(-5)). Every matrix of
the batch has its own parameters; the summed loss keeps their gradients independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.ssd_reference import ssd_matrix

FAMILIES = ("toeplitz", "low_rank", "ssd", "semiseparable")
RANKED = ("low_rank", "ssd", "semiseparable")
FIT_CHUNK = 16  # chunk of the fits' semiseparable matrix
DECAY_LR_SCALE = 0.1  # the log-decays' learning rate relative to the factors'
LOG_A_FLOOR = -5.0  # decay floor exp(-5) ~ 0.0067 per token in the fits (keeps semiseparable_fast finite)


@dataclass
class Fit:
    """One family's fit of ``P (N, L, L)``: distances ``(N,)`` and the generators (for warm starts)."""

    family: str
    rank: int | None
    distance: torch.Tensor  # (N,) ||M - P||_F
    Q: torch.Tensor | None = None  # (N, L, r)
    K: torch.Tensor | None = None  # (N, L, r)
    log_a: torch.Tensor | None = None  # (N, L) ssd, (N, L, r) semiseparable


def frobenius(M: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``||M - P||_F`` per matrix: (N, L, L) x2 -> (N,)."""
    return torch.linalg.matrix_norm(M - P, ord="fro")


def fit_toeplitz(P: torch.Tensor) -> Fit:
    """The closed-form best causal Toeplitz matrix: each sub-diagonal replaced by its mean."""
    N, L, _ = P.shape
    lag = torch.arange(L, device=P.device)[:, None] - torch.arange(L, device=P.device)[None, :]  # (L, L)
    causal = lag >= 0
    index = lag.clamp(min=0).flatten()  # (L*L,)
    sums = P.new_zeros(N, L).index_add_(1, index, (P * causal).reshape(N, -1))  # (N, L): sum of each diagonal
    means = sums / torch.arange(L, 0, -1, device=P.device, dtype=P.dtype)  # diagonal j has L - j entries
    M = means[:, lag.clamp(min=0)] * causal  # (N, L, L)
    return Fit("toeplitz", None, frobenius(M, P))


def matrix(family: str, Q: torch.Tensor, K: torch.Tensor, log_a: torch.Tensor | None) -> torch.Tensor:
    """The family's ``M (N, L, L)`` from its generators."""
    L = Q.shape[1]
    if family == "low_rank":
        return torch.einsum("nlr,nsr->nls", Q, K).tril()
    if family == "ssd":  # one head: (N, L, 1) decay, (N, L, 1, r) factors
        return ssd_matrix(log_a[..., None], K[:, :, None], Q[:, :, None])[:, 0]
    if family == "semiseparable":
        return semiseparable_fast(log_a, K, Q)
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def semiseparable_fast(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int = FIT_CHUNK) -> torch.Tensor:
    """``M (N, L, L)`` of one diagonal-decay head by chunk blocks, each a matmul (for the fits).

    log_a (N, L, r) in ``[LOG_A_FLOOR, 0]``, B / C (N, L, r). Block ``(i, j)``:
    ``(C_i e^{cum_i - G_i0}) diag(e^{G_i0 - G_j1}) (B_j e^{G_j1 - cum_j})^T`` with ``G_i0`` / ``G_j1`` the
    log-decay at the start of chunk i / end of chunk j (every exponent <= 0 for j < i); on the diagonal
    the reference is the chunk start, so ``B``'s factor grows to at most ``e^{-chunk * LOG_A_FLOOR}``
    (e^80 for the defaults, within float32). :func:`surgery.ops.structured.gla_matrix` is the general,
    always-stable reference this is tested against.
    """
    N, L, r = log_a.shape
    pad = (-L) % chunk
    if pad:
        zeros = log_a.new_zeros(N, pad, r)
        log_a, B, C = (torch.cat([t, zeros], 1) for t in (log_a, B, C))
    c = log_a.shape[1] // chunk
    a = log_a.reshape(N, c, chunk, r)
    cum = torch.cumsum(a, 2)  # (N, c, Q, r): within-chunk log-decay up to each token
    total = cum[:, :, -1]  # (N, c, r)
    G1 = torch.cumsum(total, 1)  # (N, c, r): at the end of each chunk
    G0 = G1 - total  # at the start
    Cin = C.reshape(N, c, chunk, r) * torch.exp(cum)  # (N, c, Q, r): e^{cum_l - G_i0}
    Bout = B.reshape(N, c, chunk, r) * torch.exp(total[:, :, None] - cum)  # e^{G_j1 - cum_s}
    before = torch.ones(c, c, dtype=torch.bool, device=log_a.device).tril(-1)  # j < i
    between = torch.exp((G0[:, :, None] - G1[:, None, :]).masked_fill(~before[None, :, :, None], float("-inf")))
    X = (Cin[:, :, :, None, :] * between[:, :, None]).permute(0, 3, 1, 2, 4).reshape(N, c, c * chunk, r)  # (N, cj, L, r)
    off = torch.matmul(X, Bout.transpose(-1, -2))  # (N, cj, L, Q): rows (i, l), columns s of chunk j
    M = off.permute(0, 2, 1, 3).reshape(N, c, chunk, c, chunk)  # (N, ci, Q, cj, Q), a copy
    Bdiag = B.reshape(N, c, chunk, r) * torch.exp(-cum)  # e^{G_i0 - cum_s} <= e^{-Q * floor}
    diag = torch.matmul(Cin, Bdiag.transpose(-1, -2)).tril()  # (N, c, Q, Q)
    torch.diagonal(M, dim1=1, dim2=3).add_(diag.permute(0, 2, 3, 1))  # the blocks i == j
    return M.reshape(N, c * chunk, c * chunk)[:, :L, :L]


def svd_init(P: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, K (N, L, r)`` with ``Q K^T`` the best rank-``r`` approximation of ``P`` (before the causal mask)."""
    U, S, Vh = torch.linalg.svd(P)
    root = S[:, :rank].sqrt()[:, None, :]  # (N, 1, r)
    return U[:, :, :rank] * root, Vh[:, :rank, :].transpose(1, 2) * root


def fit_gradient(family: str, P: torch.Tensor, rank: int, start: Fit | None, steps: int, lr: float,
                 decay_lr_scale: float = DECAY_LR_SCALE) -> Fit:
    """Projected Adam on ``||M - P||_F^2`` from ``start`` (the nested family's fit; None: SVD)."""
    N, L, _ = P.shape
    if start is None or start.Q is None:
        Q0, K0 = svd_init(P, rank)
    else:
        Q0, K0 = start.Q, start.K
    Q, K = Q0.clone().requires_grad_(), K0.clone().requires_grad_()
    params = [Q, K]
    log_a = None
    if family == "ssd":
        log_a = torch.zeros(N, L, dtype=P.dtype, device=P.device, requires_grad=True)
    elif family == "semiseparable":
        shared = start.log_a if start is not None and start.log_a is not None else torch.zeros(N, L, dtype=P.dtype, device=P.device)
        log_a = shared[..., None].expand(N, L, rank).clone().requires_grad_()
    if log_a is not None:
        params.append(log_a)
    best = frobenius(matrix(family, Q, K, log_a), P).detach()
    best_state = [p.detach().clone() for p in params]
    groups = [{"params": [Q, K], "lr": lr}]
    if log_a is not None:  # Adam moves every log-decay by ~lr at once, and a decay compounds over L tokens
        groups.append({"params": [log_a], "lr": lr * decay_lr_scale})
    opt = torch.optim.Adam(groups)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        d = frobenius(matrix(family, Q, K, log_a), P)  # (N,)
        d.pow(2).sum().backward()
        with torch.no_grad():
            better = d.detach() < best  # keep each matrix's best iterate (Adam is not monotone)
            best = torch.where(better, d.detach(), best)
            for kept, p in zip(best_state, params):
                kept[better] = p[better]
        opt.step()
        if log_a is not None:
            with torch.no_grad():
                log_a.clamp_(min=LOG_A_FLOOR, max=0.0)
    with torch.no_grad():  # the iterate after the last step
        final = frobenius(matrix(family, Q, K, log_a), P)
        better = final < best
        best = torch.where(better, final, best)
        for kept, p in zip(best_state, params):
            kept[better] = p[better]
    return Fit(family, rank, best, best_state[0], best_state[1], best_state[2] if log_a is not None else None)


def fit_all(P: torch.Tensor, ranks: list[int], families: tuple[str, ...] = FAMILIES, steps: int = 200,
            lr: float = 1e-2) -> list[Fit]:
    """Every family at every rank (Toeplitz once), each ranked family warm-started from the one it contains."""
    fits: list[Fit] = []
    if "toeplitz" in families:
        fits.append(fit_toeplitz(P))
    for rank in ranks:
        previous: Fit | None = None
        for family in RANKED:
            needed = family in families or any(f in families for f in RANKED[RANKED.index(family) + 1 :])
            if not needed:
                continue
            fit = fit_gradient(family, P, rank, previous, steps, lr)
            if family in families:
                fits.append(fit)
            previous = fit
    return fits
