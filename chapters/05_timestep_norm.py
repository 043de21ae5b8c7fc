# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Timestep normalization
#
# Every Megalodon layer starts by normalising its input, and the model ends with one more
# normalisation before the output head. A language model reads left to right, so this
# normalisation has a hard constraint: the output at step $t$ may depend on the tokens
# $x_1, \dots, x_t$ and on nothing later. This chapter builds **TimestepNorm**
# (Megalodon §3.2, eq. (4); official [`TimestepNorm`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/timestep_norm.py#L67-L131)): a group normalisation
# whose mean and variance at step $t$ are accumulated over all steps $\le t$.
#
# The plan:
#
# 1. show that normalising over the sequence leaks the future;
# 2. define the cumulative statistics and compute them from their definition (slow, float64);
# 3. update them one step at a time with the Welford/Chan merge (the sequential reference);
# 4. see why the obvious shortcut, cumulative sums of $x$ and $x^2$, is numerically broken;
# 5. compute them for all steps at once with cumulative sums that cannot cancel (the fast form);
# 6. carry the statistics from one call to the next (streaming) and skip padding;
# 7. wrap it in the `TimestepNorm` module that chapter 07 builds the model on.

# %%
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from megalodon_lite.notebook import (describe_run, pick, pick_device, require_cuda, save_figure, seed_everything,
                                     time_call)

seed_everything(0)
device = pick_device()
describe_run(device)
B = 2                                       # batch rows
L = pick(smoke=256, full=65_536)            # steps for the fast form
L_REF = pick(smoke=128, full=1_024)         # steps for the slow references (Python loops)
D, G = pick(smoke=(64, 4), full=(1024, 32)) # channels and groups (G = 32 for D = 1024, as in mega200M)
print(f"B={B} L={L} L_REF={L_REF} D={D} G={G}")

# %% [markdown]
# ## 1. Normalising over the sequence leaks the future
#
# Group normalisation splits the $D$ channels into $G$ groups of $D/G$ and normalises each group
# with its own mean and variance. Applied to a sequence the usual way (`nn.GroupNorm` on a
# `(B, D, L)` tensor, or a LayerNorm over `(L, D)`), those statistics are taken over the group's
# channels **and over every step of the sequence**. The output at step 0 then depends on the
# last token. We check it: change only the last token and look at the first output.

# %%
x_leak = torch.randn(1, L_REF, D, dtype=torch.float64)
x_leak_future = x_leak.clone()
x_leak_future[:, -1] += 10.0                      # touch only the last step

def group_norm_over_sequence(x: torch.Tensor, groups: int) -> torch.Tensor:
    """nn.GroupNorm applied to a (B, L, D) sequence: statistics over all L steps of each group."""
    return F.group_norm(x.transpose(1, 2), groups).transpose(1, 2)

# G groups, and G = 1: one group of all D channels, i.e. a LayerNorm over the whole (L, D) sequence
for name, groups in ((f"GroupNorm (G={G})", G), ("LayerNorm over (L, D)", 1)):
    first_step_change = (group_norm_over_sequence(x_leak_future, groups)[:, 0]
                         - group_norm_over_sequence(x_leak, groups)[:, 0]).abs().max().item()
    print(f"{name} over the sequence: first output moved by {first_step_change:.3e} "
          "when only the last token changed")
    assert first_step_change > 1e-3

# %% [markdown]
# A per-token LayerNorm (statistics over the $D$ channels of one step) has no such leak, but its
# statistics come from that one step alone. TimestepNorm keeps group statistics accumulated over
# time, and only looks back.
#
# ## 2. Cumulative group statistics
#
# Write $x_{i,c}$ for channel $c$ of step $i$, and let a group hold $n = D/G$ channels. At step
# $t$ the group's statistics cover the $t\,n$ numbers $x_{i,c}$ with $i \le t$ and $c$ in the
# group (population statistics, dividing by the count):
#
# $$\mu_t = \frac{1}{t\,n}\sum_{i\le t}\sum_{c} x_{i,c}, \qquad
#   \sigma^2_t = \frac{1}{t\,n}\sum_{i\le t}\sum_{c} (x_{i,c}-\mu_t)^2,$$
#
# and the output is $y_{t,c} = (x_{t,c}-\mu_t)\,/\sqrt{\sigma^2_t+\epsilon}\cdot\gamma_c+\beta_c$.
# Every step contributes the same number of channels, so it is enough to know each step's own
# group mean $m_i$ and variance $v_i$ (over the group's $n$ channels). Splitting each squared
# deviation as $(x_{i,c}-m_i) + (m_i-\mu_t)$ (the law of total variance):
#
# $$\mu_t = \frac{1}{t}\sum_{i\le t} m_i, \qquad
#   \sigma^2_t = \frac{1}{t}\sum_{i\le t} v_i + \frac{1}{t}\sum_{i\le t}(m_i-\mu_t)^2 .$$
#
# The first piece of library code computes the per-step moments $m_t, v_t$, in float32 even for
# bfloat16 input (float64 stays float64), with a two-pass variance inside the group.

# %% tags=["export:timestep_norm"]
"""TimestepNorm: group normalisation with causal, cumulative statistics (Megalodon §3.2, eq. (4)).

Official module: https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/timestep_norm.py#L67-L131

At step t each group of channels is normalised with the mean and (population) variance of
that group over all real steps <= t, so nothing after t is ever read. The statistics are
carried in a :class:`TimestepNormState` from one call to the next, so a sequence fed in pieces
gives the same output as one call over the whole.

- :func:`timestep_norm_reference`: the sequential Welford/Chan recurrence, one step at a time.
- :func:`timestep_norm`: the same numbers for all steps at once, from cumulative sums.
- :class:`TimestepNorm`: the module (weight and bias stored as 0, applied as ``weight + 1``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.backend import check_backend, use_triton


class TimestepNormState(NamedTuple):
    """Running statistics of every (batch row, group) after the last real step.

    count: (B,) int64, real (non-padding) steps seen so far.
    mean:  (B, G) running group mean M_t (float32; float64 when the input is float64).
    var:   (B, G) running population variance S_t (same dtype as ``mean``).
    """

    count: Tensor
    mean: Tensor
    var: Tensor


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for 16-bit and float32 input, else float64."""
    return torch.promote_types(dtype, torch.float32)


def group_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and population variance of each step's groups of channels.

    Args:
        x: (B, L, D) floating tensor, D divisible by ``num_groups``.
        num_groups: G, the number of groups of D/G consecutive channels.

    Returns:
        (m, v), each (B, L, G) in :func:`statistics_dtype` of ``x``: m_t and v_t of Megalodon §3.2.
    """
    batch, length, channels = x.shape
    grouped = x.reshape(batch, length, num_groups, channels // num_groups).to(statistics_dtype(x.dtype))
    mean = grouped.mean(dim=-1)
    var = (grouped - mean.unsqueeze(-1)).square().mean(dim=-1)
    return mean, var


# %% [markdown]
# The slowest possible check is the definition itself: for every $t$, slice the first $t$ steps
# and take the mean and variance of all their numbers in a group. That costs $O(L^2)$ but leaves
# no room for a mistake, and the decomposition into $m_i, v_i$ must agree with it.

# %%
def cumulative_stats_by_definition(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_t, sigma^2_t (B, L, G) straight from the definition: all numbers of steps <= t in a group."""
    batch, length, channels = x.shape
    grouped = x.double().reshape(batch, length, groups, channels // groups)
    means, variances = [], []
    for t in range(length):
        seen = grouped[:, : t + 1].transpose(1, 2).reshape(batch, groups, -1)   # (B, G, (t+1)·n)
        means.append(seen.mean(-1))
        variances.append(seen.var(-1, unbiased=False))
    return torch.stack(means, 1), torch.stack(variances, 1)

x_small = torch.randn(B, L_REF, D, dtype=torch.float64) * 2 + 0.5
mu_def, var_def = cumulative_stats_by_definition(x_small, G)
m_small, v_small = group_moments(x_small, G)
steps = torch.arange(1, L_REF + 1, dtype=torch.float64)[None, :, None]
mu_total = m_small.cumsum(1) / steps
var_total = v_small.cumsum(1) / steps + torch.stack(
    [(m_small[:, : t + 1] - mu_total[:, t : t + 1]).square().mean(1) for t in range(L_REF)], 1)
print("law of total variance, max |error|:",
      f"mean {(mu_total - mu_def).abs().max().item():.1e}, var {(var_total - var_def).abs().max().item():.1e}")
assert torch.allclose(mu_total, mu_def, rtol=0, atol=1e-12)   # float64: ~1e-16 per operation
assert torch.allclose(var_total, var_def, rtol=0, atol=1e-12)

# %% [markdown]
# ## 3. One step at a time: the Welford/Chan merge
#
# Keep a running state $(c, M, S)$ per group: the number of steps seen, their mean $\mu$ and
# variance $\sigma^2$. Adding one step with moments $(m, v)$ is a merge of two sets of numbers
# (Chan, Golub and LeVeque's pairwise update) where the new set has weight $w = 1/c'$:
#
# $$c' = c + 1,\quad w = \tfrac{1}{c'},\quad M' = M + w\,(m - M),\quad
#   S' = (1-w)\,S + w\,v + w(1-w)\,(m - M)^2 .$$
#
# The last term is the spread between the old mean and the new step's mean. Every quantity
# stays on the scale of the data: the state holds a mean and a variance, never a raw sum.
# A padded step is a merge with weight $w = 0$, which leaves the state exactly as it was.
#
# The initial state is the official one: $c = 0$, $M = 0$, $S = 1$ (the code's
# [`prior_count = 0`, `prior_mean = 0`, `prior_logv = 0`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/timestep_norm.py#L94-L100), [expanded per row](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/timestep_norm.py#L116-L121)). With $c = 0$ the first real step has $w = 1$, so the prior is forgotten at
# once. The output uses the state **after** merging step $t$, so step $t$ sees itself:
# $y_t = (x_t - M_t)\cdot\mathrm{rsqrt}(S_t + \epsilon)\cdot(\gamma + 1) + \beta$, with
# $\gamma, \beta$ stored as 0 and $\epsilon = 10^{-5}$. Padded steps output 0, as the
# [official kernel](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/ops/timestep_norm_kernel.cu#L656-L661) writes.

# %% tags=["export:timestep_norm"]
def initial_timestep_norm_state(batch_size: int, num_groups: int, device: torch.device | str | None = None,
                                dtype: torch.dtype = torch.float32) -> TimestepNormState:
    """The state before any step: count 0, mean 0, var 1 (the official prior; unused once a step is seen)."""
    validate.positive_ints(batch_size=batch_size, num_groups=num_groups)
    return TimestepNormState(
        count=torch.zeros(batch_size, dtype=torch.int64, device=device),
        mean=torch.zeros(batch_size, num_groups, dtype=dtype, device=device),
        var=torch.ones(batch_size, num_groups, dtype=dtype, device=device),
    )


def welford_update(state: TimestepNormState, step_mean: Tensor, step_var: Tensor,
                   is_real: Tensor) -> TimestepNormState:
    """Merge one step's group moments into the running statistics (Chan et al. pairwise merge).

    c' = c + 1, w = 1/c', M' = M + w(m - M), S' = (1 - w)S + w v + w(1 - w)(m - M)^2.
    A padded step (``is_real`` False) has w = 0 and leaves the state unchanged.

    Args:
        state: running (count (B,), mean (B, G), var (B, G)).
        step_mean, step_var: (B, G) moments m, v of the step.
        is_real: (B,) bool, False where the step is padding.
    """
    count = state.count + is_real.long()
    weight = (is_real.to(step_mean.dtype) / count.clamp_min(1).to(step_mean.dtype)).unsqueeze(-1)
    delta = step_mean - state.mean
    mean = state.mean + weight * delta
    var = (1 - weight) * state.var + weight * step_var + weight * (1 - weight) * delta.square()
    return TimestepNormState(count, mean, var)


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
               padding_mask: Tensor | None) -> Tensor:
    """y = (x - M_t) * rsqrt(S_t + eps) * (weight + 1) + bias; 0 on padding; in x's dtype.

    x (B, L, D); mean, var (B, L, G) in the statistics dtype; weight, bias (D,).
    """
    batch, length, channels = x.shape
    groups = mean.shape[-1]
    dtype = mean.dtype
    grouped = x.to(dtype).reshape(batch, length, groups, channels // groups)
    normed = (grouped - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + eps)
    y = normed.reshape(batch, length, channels) * (weight.to(dtype) + 1) + bias.to(dtype)
    if padding_mask is not None:
        y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return y.to(x.dtype)


# %% [markdown]
# Before the loop, the inputs are checked once, by `validate.timestep_norm_inputs` (the package's
# argument checks live in the hand-written `megalodon_lite/validate.py`). A wrong shape or dtype
# raises an error that names the argument (`TypeError` for a wrong type or dtype, `ValueError`
# for a wrong shape or value), instead of broadcasting into a silently wrong answer. A carried
# state is checked too: its shapes and dtypes always, its *values* (counts $\ge 0$, a finite
# mean, a finite variance $\ge 0$) only when it lives on the CPU. Reading a value back from a GPU
# tensor waits for every kernel queued before it, and this check runs on every decoding step, so
# on an accelerator we trust the state that our own previous call returned. Padded steps are then
# set to zero before any sum sees them: a merge with weight 0 multiplies their moments by 0, and
# $0 \cdot \infty$ or $0 \cdot \mathrm{NaN}$ is NaN, so garbage in the padding (uninitialised
# memory, a huge sentinel value) would otherwise poison every later step and every gradient.

# %% tags=["export:timestep_norm"]
def _prepare(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, state: TimestepNormState | None,
             padding_mask: Tensor | None) -> tuple[Tensor, TimestepNormState, Tensor, Tensor, Tensor]:
    """Checked inputs for both forms: x with padded steps zeroed, the incoming state in the
    statistics dtype, the per-step moments m, v (B, L, G) and ``is_real`` (B, L)."""
    validate.timestep_norm_inputs(x, weight, bias, num_groups, state, padding_mask)
    dtype = statistics_dtype(x.dtype)
    if state is None:
        state = initial_timestep_norm_state(x.shape[0], num_groups, device=x.device, dtype=dtype)
    else:
        count, mean, var = state
        state = TimestepNormState(count, mean.to(dtype), var.to(dtype))
    if padding_mask is None:
        is_real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        is_real = ~padding_mask
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # no gradient flows to padded steps either
    step_mean, step_var = group_moments(x, num_groups)
    return x, state, step_mean, step_var, is_real


# %% [markdown]
# The sequential reference is then a loop over steps: merge, record, normalise. It is slow
# (one merge per step in Python) and obviously right, which is what a reference is for.

# %% tags=["export:timestep_norm"]
def timestep_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int,
                            state: TimestepNormState | None = None, padding_mask: Tensor | None = None,
                            eps: float = 1e-5) -> tuple[Tensor, TimestepNormState]:
    """TimestepNorm by the sequential Welford/Chan recurrence (slow; the reference for tests).

    Args:
        x: (B, L, D) floating tensor.
        weight, bias: (D,) stored as 0; the scale applied is ``weight + 1``.
        num_groups: G, dividing D.
        state: statistics carried from a previous call (default: :func:`initial_timestep_norm_state`).
        padding_mask: (B, L) bool, True = padding: no state update, output 0.
        eps: added to the variance before the reciprocal square root.

    Returns:
        y (B, L, D) in x's dtype, and the state after the last step.
    """
    x, state, step_mean, step_var, is_real = _prepare(x, weight, bias, num_groups, state, padding_mask)
    running_means, running_vars = [], []
    for t in range(x.shape[1]):
        state = welford_update(state, step_mean[:, t], step_var[:, t], is_real[:, t])
        running_means.append(state.mean)
        running_vars.append(state.var)
    mean, var = torch.stack(running_means, dim=1), torch.stack(running_vars, dim=1)
    return _normalize(x, mean, var, weight, bias, eps, padding_mask), state


# %% [markdown]
# The recurrence must reproduce the statistics from the definition. `timestep_norm_reference`
# only returns the final state, so we run it one step at a time and collect the states: that is
# also our first look at streaming.

# %%
zeros_d = torch.zeros(D, dtype=torch.float64)
state = None
stream_means, stream_vars = [], []
for t in range(L_REF):
    _, state = timestep_norm_reference(x_small[:, t : t + 1], zeros_d, zeros_d, G, state)
    stream_means.append(state.mean)
    stream_vars.append(state.var)
welford_err_mean = (torch.stack(stream_means, 1) - mu_def).abs().max().item()
welford_err_var = (torch.stack(stream_vars, 1) - var_def).abs().max().item()
print(f"Welford recurrence vs definition (float64): mean {welford_err_mean:.1e}, var {welford_err_var:.1e}")
assert welford_err_mean < 1e-12 and welford_err_var < 1e-12

y_ref, _ = timestep_norm_reference(x_small, zeros_d, zeros_d, G)
y_def = ((x_small.reshape(B, L_REF, G, D // G) - mu_def[..., None])
         / torch.sqrt(var_def[..., None] + 1e-5)).reshape(B, L_REF, D)
print(f"reference output vs definition: {(y_ref - y_def).abs().max().item():.1e}")
assert torch.allclose(y_ref, y_def, rtol=0, atol=1e-10)

# %% [markdown]
# ## 4. Why not cumulative sums of $x$ and $x^2$?
#
# The tempting vectorised form is $\mu_t = \frac{1}{t}\sum_{i\le t} m_i$ and
# $\sigma^2_t = \frac{1}{t}\sum_{i\le t}(v_i + m_i^2) - \mu_t^2$: two `cumsum`s and a subtraction.
# It is exact in real arithmetic and wrong in floating point. When the data sit at an offset $a$
# with spread $s \ll |a|$, both terms are about $a^2$ and their difference is $s^2$: float32 keeps
# about 7 significant digits of $a^2$, so the variance loses everything once $a^2/s^2$ nears
# $10^7$. The table measures it: float32, unit spread, growing offset, error against float64.

# %%
def naive_cumulative_var(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma^2_t = mean_{i<=t}(v_i + m_i^2) - (mean_{i<=t} m_i)^2: the cancelling formula."""
    steps_ = torch.arange(1, m.shape[1] + 1, dtype=m.dtype, device=m.device)[None, :, None]
    mean_ = m.cumsum(1) / steps_
    return (v + m.square()).cumsum(1) / steps_ - mean_.square()

x_unit = torch.randn(1, L_REF, D, dtype=torch.float64)
print(f"{'offset':>8} | {'naive sum of squares':>21} | {'Welford reference':>18}   (max relative var error, float32)")
naive_errors, welford_errors = {}, {}
for offset in (0.0, 1e2, 1e3, 1e4):
    x32 = (x_unit + offset).float()                                   # the float32 data both methods see
    truth_var = naive_cumulative_var(*group_moments(x32.double() - offset, G))  # offset removed exactly, float64
    naive = naive_cumulative_var(*group_moments(x32, G)).double()
    state = None
    vars32 = []
    for t in range(L_REF):
        _, state = timestep_norm_reference(x32[:, t : t + 1], zeros_d.float(), zeros_d.float(), G, state)
        vars32.append(state.var)
    welford = torch.stack(vars32, 1).double()
    naive_errors[offset] = ((naive - truth_var).abs() / truth_var).max().item()
    welford_errors[offset] = ((welford - truth_var).abs() / truth_var).max().item()
    print(f"{offset:>8.0e} | {naive_errors[offset]:>21.2e} | {welford_errors[offset]:>18.2e}")
assert welford_errors[1e4] < 1e-2 < naive_errors[1e4]

# %% [markdown]
# (Both methods see the same float32 numbers. The float64 truth subtracts the offset first, which
# is exact for these values and does not change a variance.) The naive error grows with the
# offset squared; the Welford error grows far more slowly: it comes from the float32 rounding of
# the means near the offset, which enter the update only through their difference $m - M$.
#
# ## 5. All steps at once, without cancellation
#
# The loop is sequential in $t$; a GPU wants one pass over the whole sequence. Two
# rearrangements of the recurrence give cumulative sums whose terms cannot cancel.
#
# **Mean.** With $n_t = c_0 + (\text{real steps} \le t)$ and any constant $K$ (a shift),
# $M_t = K + \frac{1}{n_t}\big(c_0 (M_0 - K) + \sum_{i\le t} (m_i - K)\big)$.
# Choosing $K$ near the data removes the offset before summing: $K = M_0$ when the incoming
# state has seen steps, else the first real step's $m$. This matters where the running sum is
# kept in float32 (PyTorch's CUDA `cumsum`; its CPU `cumsum` happens to accumulate float32 in
# float64): an unshifted sum of values near an offset grows with $t$ and loses the low digits
# that carry the signal. The shift is a constant for autograd (the result does not depend on
# it), so no gradient flows through it.
#
# **Variance.** Multiply the Welford variance update by $c' = c + 1$:
# $c'S' = c\,S + v + \tfrac{c}{c'}(m - M)^2$. So $Q_t = n_t S_t$ (the sum of squared deviations)
# is a cumulative sum
#
# $$Q_t = c_0 S_0 + \sum_{i \le t}\Big(v_i + \frac{n_{i}-1}{n_i}\,(m_i - M_{i-1})^2\Big),$$
#
# and once all $M_{i-1}$ are known (from the mean step) every term is **non-negative**. A sum of
# non-negative terms has no cancellation at all, whatever the offset or drift of the data.
# Padded steps add zero to every sum, so their statistics equal the previous step's.

# %% tags=["export:timestep_norm"]
def cumulative_moments(step_mean: Tensor, step_var: Tensor, state: TimestepNormState,
                       is_real: Tensor) -> tuple[Tensor, Tensor, TimestepNormState]:
    """Running mean M_t and variance S_t after every step, vectorised over L.

    M_t = K + (c0 (M0 - K) + sum_{i<=t} (m_i - K)) / n_t with a constant shift K, and
    n_t S_t = c0 S0 + sum_{i<=t} (v_i + (n_i - 1)/n_i (m_i - M_{i-1})^2), a cumulative sum of
    non-negative terms. Equal to repeated :func:`welford_update`; padded steps add nothing.

    Args:
        step_mean, step_var: (B, L, G) per-step group moments m_t, v_t.
        state: incoming (count (B,), mean (B, G), var (B, G)) in the dtype of ``step_mean``.
        is_real: (B, L) bool, False on padding.

    Returns:
        mean, var: (B, L, G) running statistics after each step; the state after the last step.
    """
    dtype = step_mean.dtype
    real = is_real.to(dtype).unsqueeze(-1)                                   # (B, L, 1)
    count0 = state.count.to(dtype)[:, None, None]                            # (B, 1, 1)
    mean0, var0 = state.mean.unsqueeze(1), state.var.unsqueeze(1)            # (B, 1, G)
    seen = count0 + real.cumsum(dim=1)                                       # n_t, (B, L, 1)
    seen_safe = seen.clamp_min(1)
    # Shift: the incoming mean if it has seen steps, else this call's first real step.
    first_real = is_real.to(torch.uint8).argmax(dim=1)                        # (B,)
    first_mean = step_mean.gather(1, first_real[:, None, None].expand(-1, 1, step_mean.shape[-1]))
    shift = torch.where(count0 > 0, mean0, first_mean).detach()
    mean = shift + (count0 * (mean0 - shift) + ((step_mean - shift) * real).cumsum(dim=1)) / seen_safe
    mean = torch.where(seen > 0, mean, mean0)
    prev_mean = torch.cat([mean0, mean[:, :-1]], dim=1)                      # M_{t-1}
    spread = (seen - 1) / seen_safe * (step_mean - prev_mean).square()
    sum_sq = count0 * var0 + ((step_var + spread) * real).cumsum(dim=1)     # n_t S_t
    var = torch.where(seen > 0, sum_sq / seen_safe, var0)
    final = TimestepNormState(state.count + is_real.sum(dim=1), mean[:, -1], var[:, -1])
    return mean, var, final


def timestep_norm(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int,
                  state: TimestepNormState | None = None, padding_mask: Tensor | None = None,
                  eps: float = 1e-5) -> tuple[Tensor, TimestepNormState]:
    """TimestepNorm (Megalodon §3.2) for all steps at once, from cumulative sums.

    y_t = (x_t - M_t) * rsqrt(S_t + eps) * (weight + 1) + bias, where (M_t, S_t) are the mean and
    population variance of the group over all real steps <= t, including those summarised in
    ``state``. Statistics are computed in float32 (float64 for float64 input).

    Args:
        x: (B, L, D) floating tensor.
        weight, bias: (D,) stored as 0; the scale applied is ``weight + 1``.
        num_groups: G, dividing D.
        state: statistics carried from a previous call (default: :func:`initial_timestep_norm_state`).
        padding_mask: (B, L) bool, True = padding: no state update, output 0.
        eps: added to the variance before the reciprocal square root.

    Returns:
        y (B, L, D) in x's dtype, and the state after the last step (the next call's state).
    """
    x, state, step_mean, step_var, is_real = _prepare(x, weight, bias, num_groups, state, padding_mask)
    mean, var, final = cumulative_moments(step_mean, step_var, state, is_real)
    return _normalize(x, mean, var, weight, bias, eps, padding_mask), final


# %% [markdown]
# In float64 the two forms must agree to rounding, for outputs and for the final state,
# including an incoming state that has already seen steps.

# %%
incoming = TimestepNormState(torch.tensor([0, 5]), torch.randn(B, G, dtype=torch.float64),
                             torch.rand(B, G, dtype=torch.float64) + 0.5)
weight_r = torch.randn(D, dtype=torch.float64) * 0.1
bias_r = torch.randn(D, dtype=torch.float64) * 0.1
y_seq, s_seq = timestep_norm_reference(x_small, weight_r, bias_r, G, incoming)
y_par, s_par = timestep_norm(x_small, weight_r, bias_r, G, incoming)
parallel_err = max((y_seq - y_par).abs().max().item(), (s_seq.mean - s_par.mean).abs().max().item(),
                   (s_seq.var - s_par.var).abs().max().item())
print(f"parallel vs sequential, float64: max |difference| = {parallel_err:.1e}")
assert torch.equal(s_seq.count, s_par.count) and parallel_err < 1e-12

# %% [markdown]
# The cumulative-sum form at the full length, in float32, against itself in float64 — also with
# the offset that broke the naive formula:

# %%
x_long = torch.randn(B, L, D, device=device)
zeros_f = torch.zeros(D, device=device)
for offset in (0.0, 1e4):
    x32 = x_long + offset                       # the float32 input; float64 below sees the same values
    y32, st32 = timestep_norm(x32, zeros_f, zeros_f, G)
    y64, st64 = timestep_norm(x32.double(), zeros_f.double(), zeros_f.double(), G)
    err_y = (y32.double() - y64).abs().max().item()
    err_var = ((st32.var.double() - st64.var).abs() / st64.var).max().item()
    print(f"L={L}, offset {offset:.0e}: float32 max |y error| {err_y:.1e}, final var rel. error {err_var:.1e}")
    # A float32 mean near the offset is itself rounded by up to |offset|·2^-24; y (unit spread)
    # inherits that, plus a few float32 ulps from the sums.
    assert err_y < 1e-4 + 4 * 2**-24 * offset and err_var < 1e-4

# %% [markdown]
# ## 6. Streaming and padding
#
# The state after one call is the state for the next. Feeding the sequence in pieces of any sizes
# must therefore give the outputs of one call over the whole — this is what lets chapter 07 run
# the model on an unlimited stream with constant memory.

# %%
pieces = [int(p) for p in torch.randint(1, 40, (50,))]
bounds = [0]
while bounds[-1] < L_REF:
    bounds.append(min(L_REF, bounds[-1] + pieces[len(bounds) % len(pieces)]))
state = None
outputs = []
for start, stop in zip(bounds[:-1], bounds[1:]):
    y_piece, state = timestep_norm(x_small[:, start:stop], weight_r, bias_r, G, state)
    outputs.append(y_piece)
y_whole, state_whole = timestep_norm(x_small, weight_r, bias_r, G)
stream_err = (torch.cat(outputs, 1) - y_whole).abs().max().item()
print(f"{len(bounds) - 1} pieces vs one call: max |difference| = {stream_err:.1e}")
assert stream_err < 1e-12 and torch.equal(state.count, state_whole.count)

# %% [markdown]
# Padding (True in `padding_mask`) marks steps that are not part of the sequence, for instance
# the right-padding of a batch of documents of different lengths. As in the official kernel
# ([the statistics](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/ops/timestep_norm_kernel.cu#L571-L574), [the output](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/ops/timestep_norm_kernel.cu#L656-L661)), a
# padded step neither updates the state nor produces output: its output is 0. The real steps
# must then come out exactly as for the same sequence with the padding removed.

# %%
pad = torch.zeros(B, L_REF, dtype=torch.bool)
pad[0, L_REF // 3 : L_REF // 2] = True          # a hole in the middle of row 0
pad[1, -L_REF // 4 :] = True                    # right-padding on row 1
y_pad, state_pad = timestep_norm(x_small, weight_r, bias_r, G, padding_mask=pad)
assert (y_pad[pad] == 0).all()
for row in range(B):
    y_row, state_row = timestep_norm(x_small[row : row + 1, ~pad[row]], weight_r, bias_r, G)
    assert torch.allclose(y_pad[row, ~pad[row]], y_row[0], rtol=0, atol=1e-12)
    assert state_pad.count[row] == state_row.count[0] == (~pad[row]).sum()
    assert torch.allclose(state_pad.var[row], state_row.var[0], rtol=0, atol=1e-12)
x_garbage = x_small.masked_fill(pad.unsqueeze(-1), float("nan"))   # whatever the padding holds
y_garbage, state_garbage = timestep_norm(x_garbage, weight_r, bias_r, G, padding_mask=pad)
assert torch.equal(y_garbage, y_pad) and all(torch.equal(a, b) for a, b in zip(state_garbage, state_pad))
print("padded steps: output 0, state untouched, NaN in the padding changes nothing; "
      "real steps equal the unpadded sequence")

# %% [markdown]
# ## 7. The module
#
# `TimestepNorm` holds the per-channel `weight` and `bias`, both stored as 0 and applied as
# `weight + 1` and `bias` (so a fresh module is a pure normaliser), and calls `timestep_norm`.
# Statistics and the returned state are float32 even for bfloat16 input; the output has the
# input's dtype. (The official kernel [allocates the returned state like the incoming one](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/ops/timestep_norm_kernel.cu#L1547-L1550),
# which [the official layer casts to the input's dtype](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L270-L271); keeping it in float32 means a
# bfloat16 stream does not round its statistics at every call boundary.)
#
# On a GPU the module runs chapter 08's Triton kernels instead of `timestep_norm` (the same
# function, at a small multiple of the memory floor); `backend` (or the environment variable
# `MEGALODON_BACKEND`) forces either path, see `megalodon_lite/backend.py`.

# %% tags=["export:timestep_norm"]
class TimestepNorm(nn.Module):
    """Causal group normalisation with cumulative statistics (Megalodon §3.2).

    Args:
        model_dim: D, the number of channels.
        num_groups: G, dividing D; each group of D/G consecutive channels shares statistics (the
            model's ``norm_num_groups``; the official module calls it ``num_groups`` too).
        eps: added to the variance before the reciprocal square root.
        backend: "auto" (chapter 08's Triton kernels on CUDA, PyTorch elsewhere), "triton" or
            "torch" (:mod:`megalodon_lite.backend`).

    ``forward(x (B, L, D), state, padding_mask (B, L) bool) -> (y (B, L, D), state)``; see
    :func:`timestep_norm`.
    """

    def __init__(self, model_dim: int, num_groups: int, eps: float = 1e-5, backend: str = "auto") -> None:
        super().__init__()
        validate.positive_int("model_dim", model_dim)
        validate.divides("num_groups", num_groups, "model_dim", model_dim)
        validate.positive_number("eps", eps)
        self.model_dim = model_dim
        self.num_groups = num_groups
        self.eps = float(eps)
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.zeros(model_dim))   # applied as weight + 1
        self.bias = nn.Parameter(torch.zeros(model_dim))

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> TimestepNormState:
        """The state before any step: count (B,) 0, mean (B, G) 0, var (B, G) 1, float32."""
        return initial_timestep_norm_state(batch_size, self.num_groups,
                                           device=self.weight.device if device is None else device)

    def forward(self, x: Tensor, state: TimestepNormState | None = None,
                padding_mask: Tensor | None = None) -> tuple[Tensor, TimestepNormState]:
        """Normalise x (B, L, D) with statistics over steps <= t; return y (B, L, D) and the new state.

        float16/bfloat16/float32 input runs the Triton kernels when :func:`~megalodon_lite.backend.use_triton`
        says so; float64 always runs in PyTorch under "auto" and is refused under "triton".
        """
        validate.float_tensor("x", x)
        validate.channels("x", x, "model_dim", self.model_dim)
        if use_triton(self.backend, x.device, supported=x.dtype != torch.float64,
                      why_not="the TimestepNorm kernel takes float16, bfloat16 or float32 input"):
            from megalodon_lite.ops.timestep_norm import timestep_norm_triton  # chapter 08; imports triton
            return timestep_norm_triton(x, self.weight, self.bias, self.num_groups, state, padding_mask, self.eps)
        return timestep_norm(x, self.weight, self.bias, self.num_groups, state, padding_mask, self.eps)

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, num_groups={self.num_groups}, eps={self.eps}, backend={self.backend}"


# %% [markdown]
# The property that started the chapter: change the last token, and with TimestepNorm no
# earlier output moves, not even by a rounding error.

# %%
norm = TimestepNorm(D, G).to(device)
x_causal = torch.randn(B, L, D, device=device)
x_causal_future = x_causal.clone()
x_causal_future[:, -1] += 10.0
with torch.no_grad():
    y_before, _ = norm(x_causal)
    y_after, _ = norm(x_causal_future)
print("earlier outputs identical:", torch.equal(y_before[:, :-1], y_after[:, :-1]),
      "| last output moved by", f"{(y_after[:, -1] - y_before[:, -1]).abs().max().item():.2f}")
assert torch.equal(y_before[:, :-1], y_after[:, :-1])

# %% [markdown]
# ## 8. What the statistics look like over time
#
# A sequence whose distribution changes halfway: the per-step group moments $m_t, v_t$ jump,
# while the running $M_t, S_t$ move slowly, since after $t$ steps each new step has weight $1/t$.
# The running variance also picks up the spread between the two halves' means (the
# $(m - M)^2$ term). This is the trade-off of cumulative statistics: no look-ahead, a long memory.

# %%
half = L_REF // 2
x_shift = torch.randn(1, L_REF, D, dtype=torch.float64)
x_shift[:, half:] = x_shift[:, half:] * 0.5 + 2.0
m_shift, v_shift = group_moments(x_shift, G)
run_mean, run_var, _ = cumulative_moments(m_shift, v_shift, initial_timestep_norm_state(1, G, dtype=torch.float64),
                                          torch.ones(1, L_REF, dtype=torch.bool))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharex=True)
t_axis = torch.arange(1, L_REF + 1)
for ax, per_step, running, label in ((axes[0], m_shift, run_mean, "mean"), (axes[1], v_shift, run_var, "variance")):
    ax.plot(t_axis, per_step[0, :, 0], lw=0.8, alpha=0.6, label=f"per-step group {label}")
    ax.plot(t_axis, running[0, :, 0], lw=2, label=f"running {label} (TimestepNorm)")
    ax.axvline(half, color="gray", ls=":", lw=1)
    ax.set_xlabel("step t")
    ax.set_title(f"group 0: {label}")
    ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "05_timestep_norm_statistics")
plt.show()

# %% [markdown]
# ## 9. bfloat16 at length
#
# Training runs under bfloat16. The statistics are still computed in float32; only the input and
# the output are bfloat16. Check at the full length, also with an offset of 100 (where bfloat16's
# own spacing is coarse): compare against float32 computation on the *same* bfloat16 values, so
# the only difference allowed is rounding the output to bfloat16 (relative $2^{-8}$).

# %%
x_bf16 = torch.randn(B, L, D, device=device).to(torch.bfloat16)
for offset in (0.0, 100.0):
    x_in = (x_bf16.float() + offset).to(torch.bfloat16)
    with torch.no_grad():
        y_bf16, st_bf16 = norm(x_in)
        y_f32, _ = norm(x_in.float())
    assert y_bf16.dtype == torch.bfloat16 and st_bf16.mean.dtype == torch.float32
    assert torch.isfinite(y_bf16).all()
    diff = (y_bf16.float() - y_f32).abs()
    rel = (diff / y_f32.abs().clamp_min(1e-30)).max().item()
    print(f"bf16 input, offset {offset:>5}: finite, max relative difference to float32 {rel:.2e}")
    assert (diff <= 2**-8 * y_f32.abs()).all()   # bfloat16 keeps 8 significant bits: rounding ≤ 2^-8 relative

# %% [markdown]
# ## Summary
#
# - Statistics over the whole sequence leak the future; TimestepNorm accumulates them over steps
#   $\le t$ only, per group, with population variance.
# - The state is $(c, M, S)$ per (row, group); one step merges with $w = 1/(c+1)$
#   (Welford/Chan). Raw sums of $x$ and $x^2$ cancel catastrophically at an offset.
# - The parallel form uses a shifted cumulative sum for the mean and a cumulative sum of
#   non-negative terms for $c\,S$, so it is as stable as the recurrence and vectorised over $L$.
# - Streaming: the returned state continues the sequence exactly. Padding: no update, output 0.
#
# `megalodon_lite.timestep_norm` exports `TimestepNorm`, `TimestepNormState`,
# `timestep_norm` (parallel), `timestep_norm_reference` (sequential), `cumulative_moments`,
# `welford_update`, `group_moments` and `initial_timestep_norm_state`.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** A group's running statistics have seen $c = 999$ steps, with mean
# $M = 0$ and variance $S = 1$. The next step's group has mean $m = 10$ and variance $v = 1$. What
# are the new $M'$ and $S'$? Predict with the merge of section 3, then run the next cell.
#
# ### BEGIN SOLUTION
# $w = 1/1000$, so $M' = 0 + w \cdot 10 = 0.01$ and
# $S' = (1-w) \cdot 1 + w \cdot 1 + w(1-w) \cdot 10^2 = 1 + 0.0999 = 1.0999$. One outlying step
# moves the mean by a thousandth of its distance and widens the variance by a tenth: after many
# steps the statistics are stable, which is the trade-off of cumulative statistics.
# ### END SOLUTION

# %%
import torch

from megalodon_lite.exercises import check
from megalodon_lite.timestep_norm import TimestepNormState, group_moments, welford_update

before = TimestepNormState(torch.tensor([999]), torch.zeros(1, 1, dtype=torch.float64),
                           torch.ones(1, 1, dtype=torch.float64))
after = welford_update(before, torch.full((1, 1), 10.0, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                       torch.tensor([True]))
print(f"count {after.count.item()}, mean {after.mean.item():.4f}, variance {after.var.item():.4f}")

# %% [markdown]
# **2. Derive.** Two sets of numbers, the first with weight $1 - w$, mean $M$ and variance $S$, the
# second with weight $w$, mean $m$ and variance $v$. Derive the variance of their union,
# $S' = (1-w)S + wv + w(1-w)(m - M)^2$, from the law of total variance. Why does no term of it
# cancel?
#
# ### BEGIN SOLUTION
# The union's mean is $M' = (1-w)M + wm$. The law of total variance: the variance of the union is
# the weighted mean of the variances, plus the variance of the means,
# $S' = (1-w)S + wv + (1-w)(M - M')^2 + w(m - M')^2$. With $M - M' = -w(m - M)$ and
# $m - M' = (1-w)(m - M)$ the last two terms are $(1-w)w^2(m-M)^2 + w(1-w)^2(m-M)^2 = w(1-w)(m-M)^2$.
# Every term is a non-negative number on the scale of the data (a variance, or a squared difference
# of two means), so nothing large is subtracted from anything large: unlike
# $\overline{x^2} - \bar x^2$, it keeps its digits at any offset.
# ### END SOLUTION

# %% [markdown]
# **3. Write the per-step moments.** `my_group_moments(x, num_groups)` splits the $D$ channels of
# each step of `x` (B, L, D) into `num_groups` groups of consecutive channels and returns each
# group's mean and (population) variance, both (B, L, G). The check compares it with
# `megalodon_lite.timestep_norm.group_moments`.

# %%
def my_group_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) -> mean and population variance of each group of D/G consecutive channels, (B, L, G) each."""
    ### BEGIN SOLUTION
    grouped = x.reshape(*x.shape[:2], num_groups, x.shape[2] // num_groups)
    mean = grouped.mean(dim=-1)
    return mean, (grouped - mean[..., None]).square().mean(dim=-1)
    ### END SOLUTION


# %% tags=["check"]
def moment_inputs(generator: torch.Generator) -> tuple[torch.Tensor, int]:
    batch, length, groups, size = (int(n) for n in torch.randint(1, 9, (4,), generator=generator))
    return 3 + torch.randn(batch, length, groups * size, generator=generator, dtype=torch.float64), groups


check(my_group_moments, reference=group_moments, make_inputs=moment_inputs,
      hint="reshape (B, L, D) to (B, L, G, D/G); the variance divides by D/G (unbiased=False)")

# %% [markdown]
# **4. Write the Welford/Chan step.** `my_welford_update(state, step_mean, step_var, is_real)` merges
# one step's group moments (B, G) into the running `TimestepNormState` (count (B,), mean and var
# (B, G)), for the rows where `is_real` (B,) is True; a padded row keeps its state exactly. Return a
# `TimestepNormState`. The check compares it with `megalodon_lite.timestep_norm.welford_update`.

# %%
def my_welford_update(state: TimestepNormState, step_mean: torch.Tensor, step_var: torch.Tensor,
                      is_real: torch.Tensor) -> TimestepNormState:
    """One step merged into the running (count, mean, var); rows where is_real is False are unchanged."""
    ### BEGIN SOLUTION
    count = state.count + is_real.long()
    w = (is_real.to(step_mean.dtype) / count.clamp_min(1).to(step_mean.dtype))[:, None]
    delta = step_mean - state.mean
    mean = state.mean + w * delta
    var = (1 - w) * state.var + w * step_var + w * (1 - w) * delta.square()
    return TimestepNormState(count, mean, var)
    ### END SOLUTION


# %% tags=["check"]
def update_inputs(generator: torch.Generator) -> tuple:
    batch, groups = (int(n) for n in torch.randint(1, 9, (2,), generator=generator))
    count = torch.randint(0, 50, (batch,), generator=generator)
    state = TimestepNormState(count, torch.randn(batch, groups, generator=generator, dtype=torch.float64),
                              torch.rand(batch, groups, generator=generator, dtype=torch.float64) + 0.1)
    step_mean = 2 * torch.randn(batch, groups, generator=generator, dtype=torch.float64)
    step_var = torch.rand(batch, groups, generator=generator, dtype=torch.float64)
    return state, step_mean, step_var, torch.rand(batch, generator=generator) < 0.7


check(my_welford_update, reference=welford_update, make_inputs=update_inputs,
      hint="the weight is w = 1/c' for a real step and 0 for padding (mind c' = 0 when a padded row has seen "
           "nothing yet); the variance term w(1 - w)(m - M)^2 uses the mean before the update")


# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# Why `cumulative_moments` shifts before it sums: on CUDA, `cumsum` accumulates float32 in
# float32. The running mean of data near an offset of 100, summed without and with the shift, each
# against float64.

# %% tags=["gpu"]
cuda = require_cuda()
x_off_gpu = torch.randn(1, 65_536, 1024, device=cuda) + 100.0
m_gpu, _ = group_moments(x_off_gpu, 32)
steps_gpu = torch.arange(1, m_gpu.shape[1] + 1, device=cuda)[None, :, None]
truth_gpu = m_gpu.double().cumsum(1) / steps_gpu
unshifted_gpu = m_gpu.cumsum(1) / steps_gpu
shifted_gpu = m_gpu[:, :1] + (m_gpu - m_gpu[:, :1]).cumsum(1) / steps_gpu
print(f"running mean, float32 on CUDA, max |error|: unshifted {(unshifted_gpu - truth_gpu).abs().max().item():.1e}, "
      f"shifted {(shifted_gpu - truth_gpu).abs().max().item():.1e}")

# %% [markdown]
# A timing of forward and backward of this pure-PyTorch cumulative-sum form at the full size, for
# comparison with fused kernels later in the book.

# %% tags=["gpu"]
x_gpu = torch.randn(1, 65_536, 1024, device=cuda, dtype=torch.bfloat16, requires_grad=True)
norm_gpu = TimestepNorm(1024, 32).to(cuda)


def step() -> None:
    y_gpu, _ = norm_gpu(x_gpu)
    y_gpu.float().square().mean().backward()


step_ms = 1e3 * time_call(step, repeats=10, warmup=3, device=cuda)
print(f"TimestepNorm fwd+bwd, (1, 65536, 1024) bf16, G=32: {step_ms:.2f} ms (median of 10)")
