"""Choosing the next token from next-token logits: small pure functions over (B, V) tensors.

Every function takes per-row settings as (B,) tensors (or plain numbers, broadcast to every
row), so one batch can mix requests with different temperatures, top-k and top-p. Randomness
enters only through ``uniform`` (B,): one U[0, 1) draw per row from that row's own seeded
``torch.Generator``. A row's tokens therefore depend on its seed alone, not on which other
requests share its batch, and every tensor-parallel rank given the same seed and logits picks
the same token.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _per_row(value: float | int | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A setting as a (B, 1) tensor on the logits' device."""
    t = torch.as_tensor(value, device=logits.device)
    return t.reshape(-1, 1) if t.ndim else t.expand(logits.shape[0]).reshape(-1, 1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: argmax over the vocabulary, (B, V) -> (B,)."""
    return logits.argmax(dim=-1)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): a seen token's logit is divided by ``penalty`` when
    positive and multiplied by it when negative, so ``penalty > 1`` always makes it less likely.

    ``seen`` (B, V) is True for tokens already in the row's prompt or output.
    """
    p = _per_row(penalty, logits).to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """softmax(logits / T): T < 1 sharpens the distribution, T > 1 flattens it. T must be > 0."""
    return logits / _per_row(temperature, logits).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep each row's ``k`` largest logits (ties with the k-th are kept); k = 0 keeps all."""
    k_rows = _per_row(k, logits).long()  # (B, 1)
    k_max = min(int(k_rows.max()), logits.shape[-1])
    if k_max <= 0:
        return logits
    top = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
    kth = top.gather(-1, (k_rows.clamp(1, k_max) - 1))  # (B, 1)
    kth = torch.where(k_rows > 0, kth, torch.full_like(kth, NEG_INF))
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass is >= p. A token is dropped when the mass of the tokens ranked above it
    already reaches p, so the most likely token always stays; p >= 1 keeps all.
    """
    p_rows = _per_row(p, logits).to(torch.float32)
    p_rows = torch.where(p_rows >= 1.0, torch.full_like(p_rows, float("inf")), p_rows)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p_rows
    drop_sorted[:, 0] = False  # even where p underflows float32 to 0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def sample(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(logits) by inverting its CDF at ``uniform`` (B,).

    The token is the first index whose cumulative probability exceeds u * total; tokens
    filtered to -inf have probability 0 and can never be that index. The CDF is float64, so
    rounding in a 50k-token cumulative sum cannot move a boundary. A row whose distribution
    is not finite (the model produced NaN or infinite logits) gets its most likely token.
    """
    probs = logits.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = uniform.to(cdf.device, cdf.dtype).reshape(-1, 1) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    finite = torch.isfinite(cdf[:, -1]) & (cdf[:, -1] > 0)
    return torch.where(finite, drawn, greedy(logits.nan_to_num(nan=NEG_INF)))


def select_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """The next token of each row: greedy where temperature == 0, otherwise
    temperature -> top-k -> top-p -> a draw at ``uniform``. All settings are (B,) tensors.

    The logits are shifted to a maximum of 0 before the temperature divides them, so any
    temperature > 0 leaves them finite (or -inf): the most likely token keeps probability > 0.
    """
    chosen = greedy(logits)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return chosen
    rows = sampled_rows.nonzero().squeeze(-1)
    x = filtered_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows])
    chosen[rows] = sample(x, uniform[rows])
    return chosen


def filtered_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The logits a sampled row draws from (temperature -> top-k -> top-p; every temperature > 0):
    softmax of them is the distribution ``select_tokens`` samples, which speculative decoding's
    rejection sampling must reproduce."""
    x = logits.float()
    x = apply_temperature(x - x.amax(dim=-1, keepdim=True), temperature)
    if bool((top_k > 0).any()):
        x = top_k_filter(x, top_k)
    if bool((top_p < 1).any()):
        x = top_p_filter(x, top_p)
    return x


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private random stream for one sequence, so its samples depend on its seed alone."""
    return torch.Generator(device=device).manual_seed(seed)


def draw_uniforms(generators: list[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) number per row, each from that row's generator: (B,)."""
    return torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
