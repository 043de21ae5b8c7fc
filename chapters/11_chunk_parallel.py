# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11 · Beyond one device: chunk parallelism with torch.distributed
#
# A Megalodon model reads a sequence in linear time and, streaming, in constant memory
# (chapter 07). *Training* on a long sequence is another matter: backpropagation keeps every
# layer's activations of every token, so the memory of one training step grows with the context.
# At some length one GPU is not enough — not for the parameters, which are small, but for the
# activations of one sequence. The paper's answer (Megalodon §3.5, "4-dimensional parallelism")
# adds a fourth axis to data, tensor and pipeline parallelism: split the *sequence* itself across
# devices, each holding a contiguous run of whole chunks.
#
# This chapter builds that on `torch.distributed`, for `MegalodonLM` exactly as chapter 07 left
# it:
#
# 1. what must cross a segment boundary — a small state per layer — and why attention needs
#    nothing;
# 2. two ways to send it: the official **chain** (each rank waits for its predecessor) and **one
#    all-gather per state** (each rank summarises its own segment, everyone combines);
# 3. gradients through both, by small `torch.autograd.Function`s around the communication;
# 4. a proof on two CPU processes that the loss and every gradient equal one process reading the
#    whole sequence;
# 5. what each scheme costs, measured and simulated up to 64 ranks, and the two-GPU results.
#
# Everything here runs on a laptop CPU with the `gloo` backend; the same code runs on GPUs with
# `nccl`. The finished code is `megalodon_lite.parallel`.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from megalodon_lite.config import preset
from megalodon_lite.model import MegalodonLM
from megalodon_lite.notebook import (describe_run, pick, pick_device, recorded, recorded_files, save_figure,
                                    seed_everything)

seed_everything(0)
device = pick_device()
describe_run(device)
torch.set_num_threads(1)  # tiny models: a second thread only adds waiting

# %% [markdown]
# ## 1. What must cross a segment boundary
#
# Split a sequence of $L$ tokens into $P$ contiguous segments, segment $r$ on rank $r$. Almost
# everything in a Megalodon model works token by token: the embedding, every linear projection,
# the RMS and layer norms, the gates, the FFN, the head. Three parts look back in time, and they
# are exactly the three parts of chapter 07's streaming state:
#
# * **TimestepNorm** (Megalodon §3.2) normalises step $t$ with the mean and variance of its
#   group over *all* steps $\le t$. At the first token of segment $r$ it needs the running
#   $(\text{count}, \mu, \sigma^2)$ of everything before: $2G$ numbers per sequence (and the
#   count, which every rank knows from the segment lengths).
# * **CEMA** (Megalodon §3.1) runs $h_t = q \odot h_{t-1} + p \odot x_t$. Segment $r$
#   needs $h$ at its start: $D \times N$ complex numbers.
# * **Chunk attention** only lets a query see keys of its own chunk of $c$ tokens. If every
#   segment starts on a chunk boundary, no query of segment $r$ ever sees a key of another
#   segment: **attention needs nothing**. In streaming terms, the key/value cache is empty at a
#   chunk boundary.
#
# Each of the $n$ layers has its own norm and CEMA, and the final norm has its statistics: per
# sequence $(n+1) \cdot 2G + n \cdot 2DN$ real numbers cross each boundary. Counted for the
# `small` preset, next to what one segment of 32K tokens holds as it enters one layer:

# %%
small = preset("small")
crossing = (small.num_layers + 1) * 2 * small.norm_num_groups + small.num_layers * 2 * small.model_dim * small.cema_ndim
segment_tokens = 32 * 1024
print(f"small: {crossing:,} numbers cross a boundary per sequence ({crossing * 4 / 2**20:.2f} MiB in float32); "
      f"a {segment_tokens:,}-token segment entering one layer: {segment_tokens * small.model_dim * 4 / 2**20:,.0f} MiB")

# %% [markdown]
# Chunk parallelism is streaming (chapter 07) with the state handed from one process to the
# next. A single process shows it: stream a sequence in two pieces split at a chunk boundary,
# look at the state in between, and compare with one call over the whole.

# %%
cfg = preset("tiny", model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, num_heads=2,
             norm_num_groups=4, chunk_size=16, vocab_size=64)
model = MegalodonLM(cfg).double().eval()
tokens = torch.randint(0, cfg.vocab_size, (2, 5 * cfg.chunk_size + 7))
boundary = 3 * cfg.chunk_size
with torch.no_grad():
    whole, _ = model(tokens)
    first, state = model(tokens[:, :boundary])
    second, _ = model(tokens[:, boundary:], state)
layer = state.layers[0]
print(f"state at token {boundary} (a chunk boundary), layer 0: norm count {layer.norm.count.tolist()}, "
      f"mean {tuple(layer.norm.mean.shape)}, var {tuple(layer.norm.var.shape)}, CEMA h {tuple(layer.cema.shape)} "
      f"{layer.cema.dtype}, attention cache {layer.attention.length} tokens")
assert layer.attention.length == 0
error = (torch.cat([first, second], dim=1) - whole).abs().max().item()
print(f"two pieces against one call, max |logit difference|: {error:.1e}")
assert error < 1e-10  # float64: only the order of the sums differs

# %% [markdown]
# So a rank that receives, for every layer, the norm statistics and the CEMA state at its
# segment's start can compute its logits without any other communication. The cells tagged
# `export:parallel` below build that into `megalodon_lite/parallel.py`; its docstring is the
# chapter in brief.

# %% tags=["export:parallel"]
"""Chunk (sequence) parallelism for :class:`~megalodon_lite.model.MegalodonLM` (Megalodon §3.5).

One sequence is split over the ranks of a ``torch.distributed`` process group, each rank holding
a contiguous segment of whole chunks (the last may end inside a chunk). Attention needs no
communication; every layer needs, at its segment's start, the TimestepNorm statistics and the
CEMA state of everything before. Two schemes send them:

- ``"chain"`` (the official code, ``megalodon/modules/chunk_parallel/mappings.py`` in
  github.com/XuezheMax/megalodon): rank r receives the state from rank r-1, then sends its own;
  backward runs the same chain from the last rank down;
- ``"allgather"``: every rank all-gathers its segment's zero-start norm summary and CEMA end
  state, and combines the prefix itself (Chan's merge; a q-power-weighted sum).

Gradients flow through both (``torch.autograd.Function`` around each communication). Use::

    groups = init_chunk_parallel(sequence_parallel=P)          # under torchrun (or launch.spawn_local)
    lm = ChunkParallelLM(model, groups.sequence, scheme="allgather")
    logits = lm(tokens[:, start:stop])                         # this rank's segment
    loss, mean_loss = chunk_parallel_cross_entropy(logits, targets[:, start:stop], groups.sequence)
    loss.backward(); sum_gradients(model, groups.sequence)     # then the optimizer step
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite.cema import cema_powers
from megalodon_lite.config import MegalodonConfig
from megalodon_lite.model import MegalodonLM
from megalodon_lite.timestep_norm import TimestepNormState, group_moments, statistics_dtype

SCHEMES = ("chain", "allgather")

# %% [markdown]
# Segments must start on chunk boundaries; the *last* segment may end anywhere (inside a chunk),
# and segments may have different numbers of chunks. `split_sequence` makes such a split, as even
# as whole chunks allow, and `check_segments` refuses a split that would cut a chunk between two
# ranks.

# %% tags=["export:parallel"]
def split_sequence(length: int, world_size: int, chunk_size: int) -> list[int]:
    """Segment lengths for ``world_size`` ranks: whole chunks, as evenly as possible.

    The earlier ranks get the extra chunk when the chunks do not divide evenly; the last rank also
    holds the unfinished last chunk when ``length`` is not a multiple of ``chunk_size``.
    """
    for name, value in (("length", length), ("world_size", world_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n_chunks = -(-length // chunk_size)
    if n_chunks < world_size:
        raise ValueError(f"a sequence of {length} tokens has {n_chunks} chunk(s) of {chunk_size}: too few for "
                         f"{world_size} ranks (each rank needs at least one chunk)")
    base, extra = divmod(n_chunks, world_size)
    lengths = [(base + (rank < extra)) * chunk_size for rank in range(world_size)]
    lengths[-1] -= n_chunks * chunk_size - length
    return lengths


def segment_slice(length: int, rank: int, world_size: int, chunk_size: int) -> slice:
    """The tokens of rank ``rank`` under :func:`split_sequence`: ``tokens[:, segment_slice(...)]``."""
    lengths = split_sequence(length, world_size, chunk_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def check_segments(lengths: list[int], chunk_size: int) -> None:
    """ValueError unless every segment holds a token and all but the last end on a chunk boundary."""
    for rank, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"rank {rank} holds {n} tokens (segment lengths {lengths}): every rank needs one")
        if rank < len(lengths) - 1 and n % chunk_size:
            raise ValueError(
                f"rank {rank} holds {n} tokens, not a multiple of chunk_size={chunk_size}: every segment but the "
                f"last must end on a chunk boundary, so that no attention chunk spans two ranks (segment lengths "
                f"{lengths}; split_sequence makes a valid split)")

# %%
from megalodon_lite.parallel import check_segments, split_sequence

print("1000 tokens, chunks of 64, 4 ranks:", split_sequence(1000, 4, 64))
print("1024 tokens, chunks of 64, 3 ranks:", split_sequence(1024, 3, 64))
try:
    check_segments([100, 60], chunk_size=64)
except ValueError as err:
    print("refused:", err)

# %% [markdown]
# ## 2. The official chain
#
# The official code sends the boundary state down a chain
# ([`moving_average_gated_attention.py`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L288)):
# before its layer's timestep norm, rank $r$ *receives* $[\mu, \sigma^2, h]$ from rank $r-1$ as
# one packed tensor; after its CEMA it *sends* its own end state to rank $r+1$. In backward the
# messages run the other way: the gradient with respect to the state a rank received is sent back
# to the rank it came from. Rank 0 receives nothing and the last rank sends nothing.
#
# Two autograd functions do it
# ([`mappings.py`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/chunk_parallel/mappings.py#L131) has the same
# pair). The receiving end needs an input that requires a gradient, or autograd would never call
# its backward: an empty "anchor" tensor. The sending end returns some tensor that lies on the
# path to the loss unchanged — the CEMA output — so that its backward (receive the gradient)
# runs at the right moment; the official code gets the same effect by adding
# `prev_tensor.mean() * 0` to the CEMA output
# ([L310](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L310)).
#
# Every communication is wrapped so that a failure names this rank, what it was waiting for, and
# the likely causes. The process group's timeout (section 5) turns a dead or silent peer into
# that error instead of a hang.

# %% tags=["export:parallel"]
class ChunkParallelError(RuntimeError):
    """A rank could not exchange state with the others: a peer died, hung past the timeout or never joined."""


def _failure(what: str, group: dist.ProcessGroup, err: BaseException) -> ChunkParallelError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return ChunkParallelError(f"chunk parallel, rank {rank} of {size}: {what} failed (a peer died, hung past the "
                              f"process group's timeout, or never joined): {err}")


class _ReceiveFromPrevious(torch.autograd.Function):
    """Forward: receive a tensor from the previous rank of ``group``. Backward: send its gradient back.

    ``anchor`` is an empty tensor that requires a gradient (so that autograd calls backward); it
    also gives the message's dtype and device.
    """

    @staticmethod
    def forward(ctx, anchor: Tensor, shape: tuple[int, ...], group: dist.ProcessGroup, what: str) -> Tensor:
        ctx.group, ctx.what = group, what
        ctx.peer = dist.get_global_rank(group, dist.get_rank(group) - 1)
        message = torch.empty(shape, dtype=anchor.dtype, device=anchor.device)
        try:
            dist.recv(message, src=ctx.peer, group=group)
        except RuntimeError as err:
            raise _failure(f"receiving {what} from the previous rank", group, err) from err
        return message

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None, None]:
        try:
            dist.send(grad.contiguous(), dst=ctx.peer, group=ctx.group)
        except RuntimeError as err:
            raise _failure(f"sending the gradient of {ctx.what} to the previous rank", ctx.group, err) from err
        return None, None, None, None


class _SendToNext(torch.autograd.Function):
    """Forward: send ``message`` to the next rank of ``group`` and return ``carrier`` unchanged.
    Backward: receive the message's gradient from the next rank.

    ``carrier`` is a tensor on the path to the loss (the CEMA or norm output): returning it through
    this function makes autograd run the backward once the carrier's gradient is known.
    """

    @staticmethod
    def forward(ctx, message: Tensor, carrier: Tensor, group: dist.ProcessGroup, what: str) -> Tensor:
        ctx.group, ctx.what, ctx.shape, ctx.dtype = group, what, message.shape, message.dtype
        ctx.peer = dist.get_global_rank(group, dist.get_rank(group) + 1)
        try:
            dist.send(message.contiguous(), dst=ctx.peer, group=group)
        except RuntimeError as err:
            raise _failure(f"sending {what} to the next rank", group, err) from err
        return carrier.view_as(carrier)

    @staticmethod
    def backward(ctx, grad_carrier: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad_carrier.device)
        try:
            dist.recv(grad, src=ctx.peer, group=ctx.group)
        except RuntimeError as err:
            raise _failure(f"receiving the gradient of {ctx.what} from the next rank", ctx.group, err) from err
        return grad, grad_carrier, None, None

# %% [markdown]
# The chain itself is four small steps, called at the four points where a layer reads or
# produces its boundary state (section 4 shows how they are attached to the model). One forward
# pass carries a `_Call`: the group, this rank, and every rank's segment length, from which each
# rank knows how many tokens precede it (the norm's count).

# %% tags=["export:parallel"]
@dataclass
class _Call:
    """One chunk-parallel forward: the group, this rank, every rank's segment length, and a scratch
    space for what a layer's norm hands to its CEMA."""

    group: dist.ProcessGroup
    rank: int
    lengths: list[int]
    stash: dict[Any, Any] = field(default_factory=dict)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == len(self.lengths) - 1

    def tokens_before(self, batch: int, device: torch.device) -> Tensor:
        """The norm's count at this segment's start: (B,) int64."""
        return torch.full((batch,), sum(self.lengths[: self.rank]), dtype=torch.int64, device=device)


def _cema_real_dtype(cema: nn.Module) -> torch.dtype:
    return torch.float64 if cema.alpha.dtype == torch.float64 else torch.float32


class ChainExchange:
    """The official scheme: before a layer's norm, receive [mean, var, h] from the previous rank;
    after its CEMA, send this segment's end state to the next rank. The final norm sends [mean, var]."""

    def before_norm(self, call: _Call, site: str, x: Tensor, norm: nn.Module,
                    cema: nn.Module | None) -> TimestepNormState | None:
        if call.is_first:
            return None
        batch, groups, stats = x.shape[0], norm.num_groups, statistics_dtype(x.dtype)
        dtype = stats if cema is None else torch.promote_types(stats, _cema_real_dtype(cema))
        width = 2 * groups + (0 if cema is None else 2 * cema.model_dim * cema.cema_ndim)
        anchor = torch.empty(0, dtype=dtype, device=x.device, requires_grad=torch.is_grad_enabled())
        message = _ReceiveFromPrevious.apply(anchor, (batch, width), call.group, f"the state before {site}")
        mean, var, h = message.split([groups, groups, width - 2 * groups], dim=-1)
        if cema is not None:
            h = h.reshape(batch, cema.model_dim, cema.cema_ndim, 2).to(_cema_real_dtype(cema))
            call.stash[site] = torch.view_as_complex(h.contiguous())
        return TimestepNormState(call.tokens_before(batch, x.device), mean.to(stats), var.to(stats))

    def after_norm(self, call: _Call, site: str, y: Tensor, state: TimestepNormState, cema: nn.Module | None) -> Tensor:
        if cema is not None:  # the layer's message leaves after its CEMA
            call.stash[site, "norm"] = state
            return y
        if call.is_last:
            return y
        return _SendToNext.apply(torch.cat([state.mean, state.var], dim=-1), y, call.group, f"the state after {site}")

    def before_cema(self, call: _Call, site: str, X: Tensor, cema: nn.Module) -> Tensor | None:
        return call.stash.pop(site, None)

    def after_cema(self, call: _Call, site: str, y: Tensor, h_last: Tensor) -> Tensor:
        norm_state = call.stash.pop((site, "norm"))
        if call.is_last:
            return y
        h = torch.view_as_real(h_last).flatten(1)
        dtype = torch.promote_types(norm_state.mean.dtype, h.dtype)
        message = torch.cat([norm_state.mean.to(dtype), norm_state.var.to(dtype), h.to(dtype)], dim=-1)
        return _SendToNext.apply(message, y, call.group, f"the state after {site}")

# %% [markdown]
# **What the chain costs.** Within one layer the chain is serial: rank $r$ cannot start its
# norm before rank $r-1$ has finished its norm and CEMA and the message has travelled. If all ranks
# moved in lockstep, a pass would pay $P-1$ hops *per layer*. They need not: while rank $r+1$
# waits for layer $\ell$'s state, rank $r$ runs layer $\ell$'s attention and FFN and goes on to
# layer $\ell+1$. The ranks settle into a pipeline, each a little behind its predecessor, and the
# serial part is paid once per pass: $(P-1)$ times (one hop + one segment's norm and CEMA), by the
# last rank at the start of the forward pass, and by the first rank in the backward pass, which
# starts at the last rank and reaches it last.
# A segment is $L/P$ tokens, so this bubble is about one layer's norm and CEMA over the *whole*
# sequence, whatever $P$.
#
# One thing ties the ranks closer: a blocking `send` returns only once the receiver has posted
# its matching receive (gloo's does), so a rank cannot run more than a layer ahead of its
# successor, and every layer adds a couple of hops of waiting. Non-blocking `isend`s, waited for
# later, would remove that; the official code blocks too, and so does this one. Section 7 draws
# the result.

# %% [markdown]
# ## 3. One all-gather per state
#
# The chain's serial dependency is not a law of nature: both states can be computed from
# per-segment *summaries* that every rank produces independently, and a summary of a prefix is a
# simple combination of the summaries of its parts.
#
# **The norm statistics.** A segment that started from nothing ends with its own count $n_j$,
# mean $M_j$ and variance $S_j$ per group. Two adjacent segments $a, b$ merge as Chan, Golub and
# LeVeque showed — the same rule chapter 05's `welford_update` applies with $n_b = 1$:
#
# $$n = n_a + n_b,\quad \delta = M_b - M_a,\quad M = M_a + \delta \frac{n_b}{n},\quad
#   S = \frac{n_a S_a + n_b S_b}{n} + \delta^2 \frac{n_a n_b}{n^2}.$$
#
# Merging all the segments before rank $r$ at once is the many-way form of the same identity
# (the law of total variance): $M = \sum_{j<r} n_j M_j / n$ and
# $n S = \sum_{j<r} n_j \left(S_j + (M_j - M)^2\right)$ — a sum of non-negative terms, with no
# cancellation. A segment's own summary needs no running statistics at all: every step carries
# $D/G$ values per group, so the steps weigh equally, $M_j$ is the mean of the per-step means
# $m_t$ and $S_j$ the mean of the per-step variances $v_t$ plus the variance of the $m_t$.

# %% tags=["export:parallel"]
def segment_moments(x: Tensor, num_groups: int) -> TimestepNormState:
    """The statistics a timestep norm started from nothing would hold after this segment.

    x (B, L, D) -> count (B,) = L, mean (B, G), var (B, G) in the statistics dtype (Megalodon §3.2).
    Every step holds D/G values per group, so steps weigh equally: mean = avg_t m_t and, by the law
    of total variance, var = avg_t v_t + avg_t (m_t - mean)^2.
    """
    step_mean, step_var = group_moments(x, num_groups)                          # (B, L, G)
    mean = step_mean.mean(dim=1)
    var = step_var.mean(dim=1) + (step_mean - mean.unsqueeze(1)).square().mean(dim=1)
    count = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
    return TimestepNormState(count, mean, var)


def merge_moments(a: TimestepNormState, b: TimestepNormState) -> TimestepNormState:
    """Chan et al.'s pairwise merge: the statistics of segment a followed by segment b.

    n = n_a + n_b, delta = M_b - M_a, M = M_a + delta n_b / n, S = (n_a S_a + n_b S_b) / n + delta^2 n_a n_b / n^2.
    """
    n_a, n_b = (s.count.to(a.mean.dtype).unsqueeze(-1) for s in (a, b))
    n = (n_a + n_b).clamp_min(1)
    delta = b.mean - a.mean
    mean = a.mean + delta * n_b / n
    var = (n_a * a.var + n_b * b.var) / n + delta.square() * n_a * n_b / n.square()
    return TimestepNormState(a.count + b.count, mean, var)


def prefix_moments(means: Tensor, variances: Tensor, lengths: list[int], rank: int) -> TimestepNormState:
    """The norm state at the start of segment ``rank``: the summaries of all segments j < rank merged.

    means, variances: (P, B, G), every segment's :func:`segment_moments`. Many-way Chan merge,
    M = sum_j n_j M_j / n, n S = sum_j n_j (S_j + (M_j - M)^2), written alike for every rank (rank 0
    gets count 0 through zero weights), so every rank's autograd graph holds the same collectives.
    """
    weights = torch.tensor([n if j < rank else 0 for j, n in enumerate(lengths)],
                           dtype=means.dtype, device=means.device).view(-1, 1, 1)
    count = weights.sum().clamp_min(1)
    mean = (weights * means).sum(dim=0) / count
    var = (weights * (variances + (means - mean).square())).sum(dim=0) / count
    counts = torch.full(means.shape[1:2], sum(lengths[:rank]), dtype=torch.int64, device=means.device)
    return TimestepNormState(counts, mean, var)

# %% [markdown]
# Check: three segments of random data, summarised separately and merged (pairwise, and all at
# once), against the state a timestep norm reaches after reading the whole concatenation
# (chapter 05). Values far from zero make a sloppy formula show.

# %%
from megalodon_lite.parallel import merge_moments, prefix_moments, segment_moments
from megalodon_lite.timestep_norm import timestep_norm

G = 4
pieces = [3.0 + torch.randn(2, n, 16, dtype=torch.float64) * (1 + j) for j, n in enumerate((48, 32, 21))]
_, truth = timestep_norm(torch.cat(pieces, dim=1), torch.zeros(16, dtype=torch.float64),
                         torch.zeros(16, dtype=torch.float64), G)
summaries = [segment_moments(x, G) for x in pieces]
pairwise = merge_moments(merge_moments(summaries[0], summaries[1]), summaries[2])
lengths = [x.shape[1] for x in pieces]
all_at_once = prefix_moments(torch.stack([s.mean for s in summaries] + [torch.zeros(2, G, dtype=torch.float64)]),
                             torch.stack([s.var for s in summaries] + [torch.zeros(2, G, dtype=torch.float64)]),
                             lengths + [1], rank=3)
for name, state in (("pairwise", pairwise), ("all at once", all_at_once)):
    assert torch.equal(state.count, truth.count)
    err = max((state.mean - truth.mean).abs().max().item(), (state.var - truth.var).abs().max().item())
    print(f"{name:>12}: count {state.count.tolist()}, max |difference| of mean and var {err:.1e}")
    assert err < 1e-12  # float64, values of order 10: a few roundings

# %% [markdown]
# **The CEMA state.** The recurrence is linear, so (chapter 04) a segment of length $n$ that
# starts from $h_0$ ends in
#
# $$h_n = q^{n} h_0 + \underbrace{\sum_{t<n} p\, q^{\,n-1-t} x_t}_{S}, $$
#
# where $S$ is the end state the segment reaches from zero. Unrolling over segments, the state at
# the start of segment $r$ is
#
# $$h^{(r)} = \sum_{j<r} q^{\,g_j} S_j, \qquad g_j = \text{tokens between the end of segment } j
#   \text{ and the start of segment } r,$$
#
# a $q$-power-weighted sum of the other ranks' zero-start end states, with the powers built by
# chapter 04's `cema_powers` (magnitude and phase, never a running product). Computing $S$ alone is
# cheaper than a CEMA pass: in blocks of $C$ tokens, each block's end state is one matrix product
# with the powers $p\,q^{C-1-j}$, and the blocks are summed with weights $q^{C(M-1-m)}$ — only
# $(D, N, C)$ and $(D, N, L/C)$ powers, never $(D, N, L)$.

# %% tags=["export:parallel"]
def cema_end_state(x: Tensor, p: Tensor, q: Tensor, block_size: int = 64) -> Tensor:
    """The CEMA state after a segment that started from zero: S = sum_t p q^{L-1-t} x_t (Megalodon §3.1).

    x (B, L, D); p (D, N) real and q (D, N) complex from ``CEMA.coefficients()`` -> S (B, D, N) in q's
    dtype. Each block of C tokens contributes its own end state (one matmul with p q^{C-1-j}); blocks
    are weighted by q^{C(M-1-m)}.
    """
    batch, length, model_dim = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        pad = (-length) % block_size                     # zeros before the segment add nothing to S
        blocks = F.pad(x.to(p.dtype), (0, 0, pad, 0)).view(batch, -1, block_size, model_dim)
        into_end = p.unsqueeze(-1) * cema_powers(q, block_size).flip(-1)      # (D, N, C): p q^{C-1-j}
        local = torch.einsum("bmjd,dnj->bmdn", blocks.to(q.dtype), into_end)  # each block's end state
        q_block = cema_powers(q, 1, start=block_size)[..., 0]                 # q^C
        across = cema_powers(q_block, blocks.shape[1]).flip(-1)               # (D, N, M): q^{C(M-1-m)}
        return torch.einsum("bmdn,dnm->bdn", local, across)


def prefix_cema_state(end_states: Tensor, lengths: list[int], rank: int, q: Tensor) -> Tensor:
    """The CEMA state at the start of segment ``rank``: h = sum_{j<rank} q^{g_j} S_j.

    end_states (P, B, D, N): every segment's :func:`cema_end_state`; g_j is the number of tokens between
    the end of segment j and the start of segment ``rank``. Written alike for every rank (zero weights
    for j >= rank). Returns (B, D, N).
    """
    starts = [sum(lengths[:j]) for j in range(len(lengths) + 1)]
    weights = [cema_powers(q, 1, start=starts[rank] - starts[j + 1])[..., 0] if j < rank else torch.zeros_like(q)
               for j in range(len(lengths))]
    return torch.einsum("pdn,pbdn->bdn", torch.stack(weights), end_states)

# %% [markdown]
# Check against the CEMA module itself: the end state of each segment from zero, and the state at
# the start of the third segment, against the states the CEMA returns when it reads the
# concatenation (float64).

# %%
from megalodon_lite.cema import CEMA
from megalodon_lite.parallel import cema_end_state, prefix_cema_state

cema = CEMA(16, 8).double()
p, q, _ = cema.coefficients()
for x in pieces:
    _, h_from_zero = cema(x)
    assert (cema_end_state(x, p, q, block_size=8) - h_from_zero).abs().max() < 1e-12
ends = torch.stack([cema_end_state(x, p, q) for x in pieces])
_, h_before_third = cema(torch.cat(pieces[:2], dim=1))
combined = prefix_cema_state(ends, lengths, rank=2, q=q)
err = (combined - h_before_third).abs().max().item()
print(f"state at the start of segment 2, combined from end states vs read through: max |difference| {err:.1e}")
assert err < 1e-12

# %% [markdown]
# **Two collectives per layer, not one.** Could one all-gather per layer carry both summaries?
# No: the CEMA reads the *normalised* input $X$, and $X$ at every step of segment $r$ depends,
# non-linearly, on the statistics of all earlier segments. A rank can summarise its raw input
# $x$ at once (for the norm), but its CEMA end state only after it knows the norm statistics. So
# a layer does: all-gather the norm summaries → normalise → compute $S$ → all-gather the CEMA end
# states → combine → run the CEMA from the combined state. The final norm adds one more
# all-gather. In backward each collective's gradient is an all-reduce: rank $r$'s summary
# influenced every later rank, so its gradient is the sum of what all ranks send back.
#
# `torch.distributed.nn.functional.all_gather` would do this, but torch 2.13 deprecates it; the
# function below is the same fifteen lines with an all-reduce in backward, which every backend
# (gloo included) supports. It stacks the parts: `(P, *shape)`.

# %% tags=["export:parallel"]
class _AllGather(torch.autograd.Function):
    """(shape) -> (P, shape), every rank's tensor in rank order. Backward: the gradient with respect to
    this rank's tensor is the sum over ranks of the gradients of its slot (an all-reduce, then the slot)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup, what: str) -> Tensor:
        ctx.group, ctx.what = group, what
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        try:
            dist.all_gather(parts, tensor.contiguous(), group=group)
        except RuntimeError as err:
            raise _failure(f"all-gather of {what}", group, err) from err
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous()
        try:
            dist.all_reduce(grad, group=ctx.group)
        except RuntimeError as err:
            raise _failure(f"all-reduce of the gradient of {ctx.what}", ctx.group, err) from err
        return grad[dist.get_rank(ctx.group)], None, None


class AllGatherExchange:
    """One collective per state: all-gather the norm summaries before the norm and the zero-start CEMA
    end states before the CEMA; each rank combines the prefix it needs. Nothing is sent afterwards."""

    def before_norm(self, call: _Call, site: str, x: Tensor, norm: nn.Module,
                    cema: nn.Module | None) -> TimestepNormState:
        own = segment_moments(x, norm.num_groups)
        every = _AllGather.apply(torch.cat([own.mean, own.var], dim=-1), call.group, f"the norm summary of {site}")
        means, variances = every.chunk(2, dim=-1)
        return prefix_moments(means, variances, call.lengths, call.rank)

    def after_norm(self, call: _Call, site: str, y: Tensor, state: TimestepNormState, cema: nn.Module | None) -> Tensor:
        return y

    def before_cema(self, call: _Call, site: str, X: Tensor, cema: nn.Module) -> Tensor:
        p, q, _ = cema.coefficients()
        own = torch.view_as_real(cema_end_state(X, p, q))
        every = _AllGather.apply(own, call.group, f"the CEMA end state of {site}")
        return prefix_cema_state(torch.view_as_complex(every), call.lengths, call.rank, q)

    def after_cema(self, call: _Call, site: str, y: Tensor, h_last: Tensor) -> Tensor:
        return y

# %% [markdown]
# Why does rank 0 combine a prefix at all (with weights zero)? Because in backward every rank must
# call every all-reduce, in the same order. A rank whose autograd graph did not contain a
# collective would skip its backward and leave the others waiting until the timeout; written alike
# for every rank, the graphs have the same collectives in the same places.
#
# ## 4. Attaching the exchange to the model, without changing it
#
# `MegalodonLayer.forward` (chapter 07) calls `self.timenorm(x, state)` and `self.cema(X, h0)`,
# and a fresh call passes `None` for both states. PyTorch lets a module run a function just
# before its forward (a *forward pre-hook*, which may replace the arguments) and just after it (a
# *forward hook*, which may replace the output). `ChunkParallelLM` puts a pre-hook and a hook on
# every layer's norm and CEMA and on the final norm; they supply the boundary state where the
# model would have used `None`, and hand the end state to the scheme. Outside the wrapper's own
# forward the hooks do nothing, so the model still works alone. The wrapper's forward is then just
# the model's forward on this rank's tokens, after one tiny all-gather of every rank's
# `(batch, length)`, which checks the split on every rank alike (so all ranks raise the same error
# rather than some of them waiting).
#
# A pre-hook registered `with_kwargs=True` sees the call's positional and keyword arguments and
# may return new ones. The state is the second argument of both `timenorm(x, state)` and
# `cema(X, h0)`, passed by position or by name, so the hooks replace it wherever it is:

# %% tags=["export:parallel"]
def _replace_argument(args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """(args, kwargs) with the second argument (``name``) set to ``value``, positional or keyword."""
    if len(args) > 1:
        return (args[0], value, *args[2:]), kwargs
    return args, {**kwargs, name: value}

# %% [markdown]
# The wrapper also broadcasts rank 0's parameters to the group when it is built, as
# `DistributedDataParallel` does, so every rank starts from the same model.

# %% tags=["export:parallel"]
class ChunkParallelLM(nn.Module):
    """A MegalodonLM over one segment of a sequence split across the ranks of ``group``.

    ``forward(tokens (B, L_r))`` -> logits (B, L_r, V): rank r's logits of the whole sequence, where
    L_r is rank r's segment length (whole chunks; the last rank may end inside one). Every rank of
    the group must call it with the same batch. ``scheme`` is "chain" or "allgather". Move the model
    to this rank's device first: building the wrapper broadcasts rank 0's parameters to the group.
    """

    def __init__(self, model: MegalodonLM, group: dist.ProcessGroup, scheme: str = "allgather") -> None:
        super().__init__()
        if not isinstance(model, MegalodonLM):
            raise TypeError(f"model must be a MegalodonLM, got {type(model).__name__}")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        self.model, self.group, self.scheme = model, group, scheme
        self.exchange = ChainExchange() if scheme == "chain" else AllGatherExchange()
        self._call: _Call | None = None
        sites = [(f"layer {i}", block.mega.timenorm, block.mega.cema) for i, block in enumerate(model.blocks)]
        sites.append(("the final norm", model.final_norm, None))
        self._hooks = []
        for site, norm, cema in sites:
            self._hooks += [norm.register_forward_pre_hook(partial(self._before_norm, site, cema), with_kwargs=True),
                            norm.register_forward_hook(partial(self._after_norm, site, cema))]
            if cema is not None:
                self._hooks += [cema.register_forward_pre_hook(partial(self._before_cema, site), with_kwargs=True),
                                cema.register_forward_hook(partial(self._after_cema, site))]
        with torch.no_grad():  # start from rank 0's parameters, as DistributedDataParallel does
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)

    def _before_norm(self, site, cema, norm, args, kwargs):
        if self._call is None:
            return None
        return _replace_argument(args, kwargs, "state", self.exchange.before_norm(self._call, site, args[0], norm, cema))

    def _after_norm(self, site, cema, norm, args, output):
        if self._call is None:
            return None
        y, state = output
        return self.exchange.after_norm(self._call, site, y, state, cema), state

    def _before_cema(self, site, cema, args, kwargs):
        if self._call is None:
            return None
        return _replace_argument(args, kwargs, "h0", self.exchange.before_cema(self._call, site, args[0], cema))

    def _after_cema(self, site, cema, args, output):
        if self._call is None:
            return None
        y, h_last = output
        return self.exchange.after_cema(self._call, site, y, h_last), h_last

    def segment_lengths(self, tokens: Tensor) -> list[int]:
        """Every rank's segment length (one small all-gather), checked alike on every rank."""
        shape = torch.tensor(tokens.shape, dtype=torch.int64, device=tokens.device)
        shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(self.group))]
        try:
            dist.all_gather(shapes, shape, group=self.group)
        except RuntimeError as err:
            raise _failure("all-gather of the segment lengths", self.group, err) from err
        shapes = [tuple(s.tolist()) for s in shapes]
        if len({s[0] for s in shapes}) != 1:
            raise ValueError(f"every rank must read the same batch of sequences; (batch, length) per rank: {shapes}")
        lengths = [s[1] for s in shapes]
        check_segments(lengths, self.model.config.chunk_size)
        return lengths

    def forward(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (batch, length) tensor of this rank's segment, got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        self._call = _Call(self.group, dist.get_rank(self.group), self.segment_lengths(tokens))
        try:
            logits, _ = self.model(tokens)
        finally:
            self._call = None
        return logits

    def remove_hooks(self) -> None:
        """Detach from the model (its hooks already do nothing outside this wrapper's forward)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

# %% [markdown]
# **The loss and the gradients.** The loss of the whole sequence is the mean over all its tokens.
# Each rank computes the sum over its own tokens divided by the count of *all* tokens, so that
# the sum over ranks is the loss; backpropagating each rank's share gives each rank its part of
# every parameter's gradient, and one all-reduce (sum) over the group completes them. (The
# official code gathers the per-token losses on every rank instead
# ([`losses.py`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/losses.py#L58)) and sums the gradients over the
# chunk-parallel group inside its FSDP wrapper
# ([`fairscale_fsdp.py`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/distributed/fairscale_fsdp.py#L62)).)

# %% tags=["export:parallel"]
def chunk_parallel_cross_entropy(logits: Tensor, targets: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor]:
    """This rank's share of the whole sequence's mean token loss, and that mean loss (detached).

    logits (B, L_r, V), targets (B, L_r) int: this rank's segment. The share is this segment's summed
    token loss over the number of target tokens of all ranks, so the shares add up to the mean loss
    and their gradients, summed over ``group`` by :func:`sum_gradients`, are the mean loss's gradients.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits (B, L, V) and targets (B, L) must agree, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    totals = torch.stack([summed.detach().double(), torch.tensor(float(targets.numel()), dtype=torch.float64,
                                                                  device=summed.device)])
    try:
        dist.all_reduce(totals, group=group)
    except RuntimeError as err:
        raise _failure("all-reduce of the loss", group, err) from err
    return summed / totals[1].to(summed.dtype), (totals[0] / totals[1]).to(summed.dtype)


def sum_gradients(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Sum every parameter's gradient over ``group``, in one flat all-reduce."""
    grads = [param.grad for param in module.parameters() if param.grad is not None]
    if not grads:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    try:
        dist.all_reduce(flat, group=group)
    except RuntimeError as err:
        raise _failure("all-reduce of the gradients", group, err) from err
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()

# %% [markdown]
# ## 5. Process groups, timeouts, and launching
#
# A job of $W$ processes (launched by `torchrun`, one per GPU) trains $W/P$ sequences at a time,
# each split over $P$ ranks: a two-dimensional layout, *data* × *sequence*. Rank
# $g = d \cdot P + s$ holds segment $s$ of sequence $d$, so the ranks that share a sequence are
# neighbours (on one machine, GPUs joined by NVLink), as in the official layout
# ([`initialize.py`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/distributed/initialize.py#L101)). Two process groups
# follow: the *sequence* group of the $P$ ranks of one sequence (boundary states, the loss, the
# gradient sum) and the *data* group of the $W/P$ ranks that hold the same segment of different
# sequences (for `DistributedDataParallel`, section 8).
#
# Every group gets an explicit timeout. `torch.distributed.new_group` does *not* inherit the
# timeout given to `init_process_group` (it defaults to 30 minutes), so it is passed each time. With
# `gloo`, every operation — `send`, `recv` and the collectives — then raises once it has waited that
# long, and at once when a peer's connection closes because the peer died; a rank that never joins
# makes `init_process_group` give up after the same timeout. With `nccl`, operations are queued on
# the GPU and a watchdog aborts the communicator (and the process) when one exceeds the timeout;
# `torchrun` then stops the other ranks.

# %% tags=["export:parallel"]
@dataclass(frozen=True)
class ParallelGroups:
    """The two process groups of a data x sequence layout (global rank = data_rank * sequence_size + sequence_rank).

    sequence: the ranks that share one sequence (consecutive global ranks).
    data: the ranks that hold the same segment of different sequences (for DistributedDataParallel).
    """

    sequence: dist.ProcessGroup
    data: dist.ProcessGroup
    sequence_rank: int
    sequence_size: int
    data_rank: int
    data_size: int


def init_chunk_parallel(sequence_parallel: int, *, timeout: datetime.timedelta = datetime.timedelta(minutes=10),
                        backend: str | None = None) -> ParallelGroups:
    """Join the job (``env://``: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, as torchrun sets them) and
    build the sequence and data groups, every one with ``timeout``.

    backend: "nccl" when CUDA is available (and then this process uses GPU LOCAL_RANK), else "gloo".
    Raises ChunkParallelError when not every process joins within ``timeout``, ValueError when
    ``sequence_parallel`` does not divide the world size.
    """
    if isinstance(sequence_parallel, bool) or not isinstance(sequence_parallel, int) or sequence_parallel < 1:
        raise ValueError(f"sequence_parallel must be a positive int, got {sequence_parallel!r}")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        except RuntimeError as err:
            raise ChunkParallelError(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: not every "
                                     f"process joined within {timeout}: {err}") from err
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sequence_parallel:
        raise ValueError(f"sequence_parallel={sequence_parallel} must divide the number of processes, {world}")
    data_parallel = world // sequence_parallel
    groups = {}
    for d in range(data_parallel):  # every rank creates every group, in the same order
        ranks = list(range(d * sequence_parallel, (d + 1) * sequence_parallel))
        groups["sequence", d] = dist.new_group(ranks, timeout=timeout)
    for s in range(sequence_parallel):
        groups["data", s] = dist.new_group(list(range(s, world, sequence_parallel)), timeout=timeout)
    data_rank, sequence_rank = divmod(rank, sequence_parallel)
    return ParallelGroups(groups["sequence", data_rank], groups["data", sequence_rank],
                          sequence_rank, sequence_parallel, data_rank, data_parallel)

# %% [markdown]
# On GPUs, `torchrun --nproc-per-node 2 train.py` starts the processes. For the CPU
# demonstrations of this chapter and for the tests, `spawn_local` (in `megalodon_lite.launch`,
# a separate module because it has nothing to do with Megalodon) starts $W$ fresh Python
# processes on this machine with the same environment variables `torchrun` would set (the
# address and a free port on the loopback interface, `RANK`, `WORLD_SIZE`), runs a function in
# each, and collects every rank's result — or its traceback, or the fact that it died or did
# not finish in time, in which case it is terminated. The function must be importable (a
# module-level function of a module, not a notebook cell), and its arguments and result
# picklable; tensors travel best as NumPy arrays.

# %% tags=["export:launch"]
"""Start a few processes on this machine as torchrun would, for CPU demonstrations and tests (chapter 11)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class RankOutcome:
    """What one spawned process returned (``value``), or why it did not (``error``)."""

    rank: int
    value: Any = None
    error: str | None = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple,
              results: Any, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        outcome = RankOutcome(rank, value=fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001  (reported to the parent with its traceback)
        outcome = RankOutcome(rank, error=traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put(outcome)

# %% [markdown]
# The parent starts the processes with the `spawn` method (a fresh interpreter each, as
# `torchrun` gives), then collects outcomes until every rank has reported, every process has
# exited, or the deadline has passed; whatever is still running then is terminated, and a rank
# that left no result is reported as such.

# %% tags=["export:launch"]
def spawn_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                threads: int = 1) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes, as torchrun would on one machine.

    Each process gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE, and
    ``threads`` torch threads; ``fn`` joins the group itself (e.g. :func:`init_chunk_parallel`). Returns
    one outcome per rank, in rank order; processes still running after ``timeout`` seconds are terminated.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_run_rank, args=(fn, rank, world_size, port, args, results, threads),
                                 daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size and time.monotonic() < deadline:
        everyone_done = not any(process.is_alive() for process in processes)
        try:
            outcome = results.get(timeout=0.1)
            outcomes[outcome.rank] = outcome
        except queue.Empty:
            if everyone_done:  # a process that exited flushed its result first: nothing more will come
                break
    for rank, process in enumerate(processes):
        process.join(timeout=1.0)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5.0)
            outcomes.setdefault(rank, RankOutcome(rank, error=f"still running after {timeout} s: terminated"))
        outcomes.setdefault(rank, RankOutcome(rank, error=f"exited with code {process.exitcode} without a result"))
    return [outcomes[rank] for rank in range(world_size)]

# %% [markdown]
# The function the next section spawns: one training step's loss and gradients, with the sequence
# split over all ranks, for each scheme in turn (a fresh model from the same weights each time).
# It is what a training loop does per step, minus the optimizer.

# %% tags=["export:parallel"]
def sequence_gradients(rank: int, world_size: int, config: MegalodonConfig, weights: dict[str, Tensor],
                       tokens: Tensor, targets: Tensor, lengths: list[int], schemes: tuple[str, ...] = SCHEMES,
                       timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Mean loss and every parameter's gradient of one sequence batch split over ``world_size`` ranks.

    For :func:`spawn_local`. tokens, targets (B, L): the whole batch (every rank takes its segment,
    ``lengths[rank]`` tokens); weights: a state dict (its dtype is the model's). Returns, per scheme,
    ``{"loss": float, "grads": {name: ndarray}}`` — the same on every rank after the gradient sum.
    """
    groups = init_chunk_parallel(world_size, timeout=datetime.timedelta(seconds=timeout_s))
    start = sum(lengths[:rank])
    segment = slice(start, start + lengths[rank])
    results = {}
    for scheme in schemes:
        model = MegalodonLM(config).to(next(iter(weights.values())).dtype)
        model.load_state_dict(weights)
        wrapped = ChunkParallelLM(model, groups.sequence, scheme)
        logits = wrapped(tokens[:, segment])
        share, mean_loss = chunk_parallel_cross_entropy(logits, targets[:, segment], groups.sequence)
        share.backward()
        sum_gradients(model, groups.sequence)
        results[scheme] = {"loss": mean_loss.item(),
                           "grads": {name: param.grad.numpy() for name, param in model.named_parameters()}}
    return results

# %% [markdown]
# ## 6. The proof: two processes against one
#
# Two CPU processes, joined by `gloo` over the loopback interface, each read one segment of a
# batch of two sequences: rank 0 a few whole chunks, rank 1 fewer chunks and seven tokens (uneven
# segments, the last ending inside a chunk). With each scheme they compute the loss and every
# parameter's gradient; one process computes the same on the whole sequence. All in float64, so
# the only differences are the order of the sums (the tests in `tests/test_parallel.py` do the
# same with four processes, more splits, a 2 × 2 data × sequence layout, and failing ranks).

# %%
from megalodon_lite.launch import spawn_local
from megalodon_lite.parallel import sequence_gradients

torch.manual_seed(1)
reference = MegalodonLM(cfg).double()
with torch.no_grad():  # norm scales, q/k affine and biases start at 0: move them so they are tested
    for name, param in reference.named_parameters():
        if name.endswith(("norm.weight", "norm.bias", "attention.gamma", "attention.beta", ".bias")):
            param.copy_(0.3 * torch.randn_like(param))
c = cfg.chunk_size
lengths = pick(smoke=[3 * c, 2 * c + 7], full=[24 * c, 17 * c + 7])
batch = torch.randint(0, cfg.vocab_size, (2, sum(lengths) + 1))
inputs, targets = batch[:, :-1], batch[:, 1:]

outcomes = spawn_local(sequence_gradients, 2, cfg, reference.state_dict(), inputs, targets, lengths, timeout=120)
print(f"segments of {lengths} tokens (chunks of {c})")
for outcome in outcomes:
    assert outcome.error is None, outcome.error

logits, _ = reference(inputs)
loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
loss.backward()
print(f"{'':>10} {'loss':>20} {'|loss difference|':>18} {'max relative gradient difference':>34}")
print(f"{'1 process':>10} {loss.item():20.15f}")
for scheme in ("chain", "allgather"):
    result = outcomes[0].value[scheme]
    assert all(o.value[scheme]["loss"] == result["loss"] for o in outcomes)
    worst = max(np.abs(result["grads"][name] - param.grad.numpy()).max() / np.abs(param.grad.numpy()).max()
                for name, param in reference.named_parameters())
    print(f"{scheme:>10} {result['loss']:20.15f} {abs(result['loss'] - loss.item()):18.1e} {worst:34.1e}")
    # float64 (unit roundoff 1e-16): a few hundred roundings in a different order stay far below 1e-10
    assert abs(result["loss"] - loss.item()) < 1e-12 and worst < 1e-10

# %% [markdown]
# Equal to the last few bits: both schemes compute the gradient of the whole sequence's loss,
# including the parts that flow backwards across the boundary — from rank 1's tokens into rank
# 0's parameters *and* into rank 0's activations, through the received state.
#
# ## 7. What each scheme costs
#
# Per layer and per pass the two schemes move almost the same bytes; they differ in how many
# times someone *waits*:
#
# | | forward, per layer | backward, per layer | serial over ranks |
# |---|---|---|---|
# | chain | one message $[\mu, \sigma^2, h]$, rank to rank | one message back | yes: $P-1$ hops, pipelined across layers |
# | all-gather | two all-gathers (norm, then CEMA) | two all-reduces | no, but every rank waits for the slowest at each collective |
#
# and the all-gather scheme computes each segment's CEMA end state once more (cheap next to the
# CEMA itself, and run in parallel on every rank).
#
# A small simulation makes the difference visible. Each rank runs its layers in order; a piece
# of work starts when the rank is free and its inputs have arrived. Costs are in arbitrary units
# here, chosen only to make the picture readable: a layer's norm and CEMA take 1, the rest of the
# layer 3, backward twice the forward, a hop 0.3 and a collective 0.5.

# %%
def simulate_step(scheme: str, ranks: int, layers: int, cost: dict[str, float]):
    """Start, length and kind of every piece of one training step (forward, then backward) on every
    rank; returns (step time, pieces). cost: mix (norm + CEMA), rest (attention, FFN), backward (factor),
    hop, collective (all-gather / all-reduce), end_state (the extra CEMA end state of the all-gather)."""
    clock, pieces = [0.0] * ranks, []

    def work(rank, start, length, kind):
        if start > clock[rank]:
            pieces.append((rank, clock[rank], start - clock[rank], "waiting"))
        pieces.append((rank, start, length, kind))
        clock[rank] = start + length

    k = cost["backward"]
    if scheme == "chain":  # blocking sends: a send ends a hop after the receiver has posted its receive
        for _ in range(layers):                      # forward: rank r waits for rank r-1's state
            arrival = 0.0
            for r in range(ranks):
                work(r, max(clock[r], arrival), cost["mix"], "norm + CEMA")
                if r + 1 < ranks:                    # rank r+1 posts its receive when its last layer ends
                    work(r, max(clock[r], clock[r + 1]), cost["hop"], "communication")
                    arrival = clock[r]
                work(r, clock[r], cost["rest"], "attention + FFN")
        for _ in range(layers):                      # backward: rank r waits for rank r+1's gradient
            arrival = 0.0
            for r in reversed(range(ranks)):
                work(r, clock[r], k * cost["rest"], "attention + FFN")
                work(r, max(clock[r], arrival), k * cost["mix"], "norm + CEMA")
                if r > 0:                            # rank r-1 posts its receive after its attention + FFN
                    work(r, max(clock[r], clock[r - 1] + k * cost["rest"]), cost["hop"], "communication")
                    arrival = clock[r]
    else:
        half, end = cost["mix"] / 2, cost["end_state"]
        forward = [("communication", 0), ("norm + CEMA", half), ("end state S", end), ("communication", 0),
                   ("norm + CEMA", half), ("attention + FFN", cost["rest"])]
        backward = [("attention + FFN", k * cost["rest"]), ("norm + CEMA", k * half), ("communication", 0),
                    ("end state S", k * end), ("norm + CEMA", k * half), ("communication", 0)]
        for kind, length in forward * layers + backward * layers:
            if kind == "communication":              # a collective: everyone waits for the slowest
                start = max(clock)
                for r in range(ranks):
                    work(r, start, cost["collective"], kind)
            else:
                for r in range(ranks):
                    work(r, clock[r], length, kind)
    return max(clock), pieces

# %%
COLORS = {"norm + CEMA": "tab:orange", "attention + FFN": "tab:blue", "end state S": "tab:red",
          "communication": "tab:green", "waiting": "0.85"}
picture_cost = {"mix": 1.0, "rest": 3.0, "backward": 2.0, "hop": 0.3, "collective": 0.5, "end_state": 0.25}
fig, axes = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
for ax, scheme in zip(axes, ("chain", "allgather")):
    total, pieces = simulate_step(scheme, ranks=4, layers=3, cost=picture_cost)
    for rank, start, length, kind in pieces:
        ax.barh(rank, length, left=start, color=COLORS[kind], edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(4), [f"rank {r}" for r in range(4)])
    ax.invert_yaxis()
    ax.set_title(f"{scheme}: one training step of 3 layers on 4 ranks takes {total:.1f} units")
axes[-1].set_xlabel("time (arbitrary units: norm + CEMA 1, rest of a layer 3, backward ×2, hop 0.3, collective 0.5)")
axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()], labels=list(COLORS),
               ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.55), frameon=False)
fig.tight_layout()
save_figure(fig, "11_schemes_timeline")
plt.show()
ideal = 3 * (1 + 2) * (picture_cost["mix"] + picture_cost["rest"])
print(f"the same step with no waiting and no communication: {ideal:.1f} units")

# %% [markdown]
# The chain's cost is a **pipeline bubble**: rank 3 idles at the start of the forward pass until
# the state has passed through ranks 0–2 (three hops, three norm + CEMA), and in the backward
# pass rank 0 idles until the gradient has come back through ranks 3–1; in between, the ranks
# overlap, and the short grey gaps are blocking sends waiting for their receiver. The all-gather
# scheme has no bubble but stops every rank twice per layer and pass, so its cost grows with the
# number of layers, while the chain's grows with the number of ranks.
#
# **With measured numbers.** `kernels/chunk_parallel_costs.py` measures, with `gloo` on this
# machine and 2 to 8 processes, the time of one hop of the chain message and of each collective
# of the all-gather scheme, at the message sizes of the `small` preset (one sequence). The cost
# model then counts, per training step of a model with $n$ layers (plus the final norm):
#
# * chain, ranks in lockstep (the worst case, e.g. if every layer began with a barrier):
#   $2 (n+1)(P-1)\, t_\text{hop}$;
# * chain with blocking sends, as implemented: the simulation above with the compute set to
#   zero, so that only the messages remain — $P-1$ hops once per pass plus about two per layer;
#   the compute bubble (one layer's norm and CEMA over the whole sequence, per pass) comes on top;
# * all-gather: $n\,(t_\text{gather,norm} + t_\text{gather,CEMA} + t_\text{reduce,norm} +
#   t_\text{reduce,CEMA}) + t_\text{gather,norm} + t_\text{reduce,norm}$.
#
# A hop does not depend on $P$: the model takes the median of its measurements. A collective
# does: `gloo`'s all-gather and all-reduce pass messages around a ring, so their latency grows
# with the number of ranks; past the measured range the model extends the last measurement by the
# least-squares slope per extra rank. One caveat belongs next to every number below: this machine
# has the core count printed with them, so past that many processes each step of a ring also
# waits for the operating system to switch processes, and other jobs share the machine (the JSON
# records the load). A hop keeps only one process busy at a time and suffers far less. The script
# runs anywhere; on a GPU cluster the constants, and possibly the winner, differ.

# %%
measured = json.loads(recorded("chunk_parallel_costs_cpu.json").read_text())   # the checkout's, or the installed copy
rows = measured["rows"]
print(f"{measured['device']}, {measured['backend']}, torch {measured['torch']}, {measured['date']}")
print(f"messages (float32 numbers): {measured['message_floats']}; command: {measured['command']}")
print(f"{'P':>3}" + "".join(f"{k[:-2]:>18}" for k in rows[0] if k != "ranks"))
for row in rows:
    print(f"{row['ranks']:3d}" + "".join(f"{v * 1e6:15.0f} µs" for k, v in row.items() if k != "ranks"))

measured_ranks = np.array([row["ranks"] for row in rows], dtype=float)


def modelled(key: str, ranks: np.ndarray) -> np.ndarray:
    """One operation's seconds at ``ranks``: a hop is the median of its measurements (it does not depend on
    P); a collective is interpolated between measurements and extended past them from the last one with
    the least-squares slope per extra rank."""
    values = np.array([row[key] for row in rows])
    if key == "hop_s":
        return np.full_like(ranks, np.median(values))
    slope = max(np.polyfit(measured_ranks, values, 1)[0], 0.0)
    inside = np.interp(ranks, measured_ranks, values)
    return np.where(ranks <= measured_ranks[-1], inside, values[-1] + slope * (ranks - measured_ranks[-1]))


def step_exchange_seconds(scheme: str, ranks: np.ndarray, layers: int) -> np.ndarray:
    """Seconds one training step (forward + backward) spends communicating, by the cost model."""
    hop = modelled("hop_s", ranks)
    if scheme == "chain, lockstep":
        return 2 * (layers + 1) * (ranks - 1) * hop
    if scheme == "chain, blocking sends":  # the simulation with no compute: only the messages remain
        no_compute = {"mix": 0.0, "rest": 0.0, "backward": 1.0, "hop": float(hop[0])}
        return np.array([simulate_step("chain", int(p), layers + 1, no_compute)[0] for p in ranks])
    gather_norm, reduce_norm = modelled("allgather_norm_s", ranks), modelled("allreduce_norm_s", ranks)
    per_layer = gather_norm + modelled("allgather_cema_s", ranks) + reduce_norm + modelled("allreduce_cema_s", ranks)
    return layers * per_layer + gather_norm + reduce_norm


# %%
layers = preset("small").num_layers
ranks = np.arange(2, 65, dtype=float)
fig, (ax_ops, ax_step) = plt.subplots(1, 2, figsize=(12, 4.2))
for key, color in zip(list(rows[0])[1:], ("tab:orange", "tab:green", "tab:olive", "tab:purple", "tab:pink")):
    ax_ops.plot(measured_ranks, [row[key] * 1e3 for row in rows], "o", color=color)
    ax_ops.plot(ranks, modelled(key, ranks) * 1e3, "-", color=color, label=key[:-2].replace("_", " "))
ax_ops.set_title("one operation (points: measured; lines: model)", fontsize=10)
ax_ops.set_ylabel("milliseconds")
SCHEME_CURVES = (("chain, lockstep", "--"), ("chain, blocking sends", "-"), ("all-gather", "-"))
for scheme, style in SCHEME_CURVES:
    ax_step.plot(ranks, step_exchange_seconds(scheme, ranks, layers) * 1e3, style, label=scheme)
ax_step.axvspan(ranks.min(), measured_ranks.max(), color="0.93", zorder=0)
ax_step.set_title(f"per training step, {layers} layers + final norm (shaded: measured P)", fontsize=10)
for ax in (ax_ops, ax_step):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks P")
    ax.legend(fontsize=8)
fig.suptitle(f"Chain against all-gather: gloo on {measured['device']}", fontsize=10)
fig.tight_layout()
save_figure(fig, "11_chain_vs_allgather")
plt.show()
for P in (2, 4, 8, 16, 64):
    per_scheme = {name: step_exchange_seconds(name, np.array([float(P)]), layers)[0] for name, _ in SCHEME_CURVES}
    cheaper = min(("chain, blocking sends", "all-gather"), key=per_scheme.get)
    print(f"P={P:2d}: " + ", ".join(f"{name} {t * 1e3:7.2f} ms" for name, t in per_scheme.items())
          + f"  -> cheaper: {cheaper}")

# %% [markdown]
# The chain in lockstep is what one would fear from "$P-1$ serial hops per layer"; the ranks do
# not stay in lockstep, and with blocking sends the chain pays $P-1$ hops once per pass plus a
# couple per layer. The all-gather pays four collectives per layer, each involving every rank. The
# printout names the cheaper one at each $P$ with the committed measurements. What these
# communication-only curves leave out is compute: the chain's bubble (with `small` at 128K tokens
# on two GPUs, one 64K-token segment's norm and CEMA, forward and backward, per step) and the
# all-gather's extra end states. So the chain suits few ranks and slow collectives; the all-gather
# suits many ranks, fast collectives, and a norm and CEMA that are slow next to the rest of a
# layer. Section 9 has the two-GPU measurement.
#
# ## 8. Composing with data parallelism
#
# The sequence dimension and the data dimension are independent: `ChunkParallelLM` handles the
# boundary states inside the sequence group; `DistributedDataParallel` over the *data* group
# averages the gradients of the different sequences; `sum_gradients` adds the segments' parts.
# One training step, on every rank of a `data × sequence` job:
#
# ```python
# from torch.nn.parallel import DistributedDataParallel as DDP
# from megalodon_lite.parallel import (ChunkParallelLM, chunk_parallel_cross_entropy, init_chunk_parallel,
#                                      segment_slice, sum_gradients)
#
# groups = init_chunk_parallel(sequence_parallel=2)            # e.g. 4 processes: 2 sequences x 2 segments
# model = MegalodonLM(config).to(device)
# lm = DDP(ChunkParallelLM(model, groups.sequence, "allgather"), process_group=groups.data)
# for batch in loader:                                          # (B, L + 1): this data rank's sequences
#     seg = segment_slice(batch.shape[1] - 1, groups.sequence_rank, groups.sequence_size, config.chunk_size)
#     logits = lm(batch[:, :-1][:, seg])
#     share, mean_loss = chunk_parallel_cross_entropy(logits, batch[:, 1:][:, seg], groups.sequence)
#     share.backward()                                          # DDP averages over the data group
#     sum_gradients(model, groups.sequence)                     # then the segments' parts are added
#     torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # the same on every rank
#     optimizer.step(); optimizer.zero_grad()
# ```
#
# `tests/test_parallel.py` runs exactly this with four `gloo` processes as 2 × 2 and checks every
# gradient against one process reading both sequences whole.
#
# Chapter 10's `train` command does it under `torchrun` (`megalodon_lite.parallel_train`):
#
# ```bash
# torchrun --standalone --nproc-per-node 4 -m megalodon_lite train --sequence-parallel 2
# ```
#
# trains two sequences at a time, each split over two processes. It sums the gradients once per
# optimizer step, after gradient accumulation, in one all-reduce over all the processes: each
# rank's loss is its share of the mean over *every* rank's tokens (`chunk_parallel_cross_entropy`
# given the whole job as its group), so that one sum adds the segments' parts and averages the
# sequences' at once, where `DistributedDataParallel` would all-reduce after every micro-batch.
# `tests/test_parallel_train.py` checks that its losses follow one process's step by step, and
# that Ctrl-C and `--resume` continue a run bit for bit.
#
# ## 9. On two GPUs
#
# `kernels/sequence_parallel_bench.py` trains the `small` preset at contexts of 64K and 128K
# tokens, on one GPU and split over two with each scheme, and records tokens per second and the
# peak memory of each GPU:
#
# ```bash
# torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --out kernels/results
# ```

# %%
gpu_results = [p for p in recorded_files("sequence_parallel_*.json") if "cpu" not in p.name]
if not gpu_results:
    print("The 2-GPU run has not been recorded yet (kernels/results/sequence_parallel_<gpu>.json is absent).")
for path in gpu_results:
    record = json.loads(path.read_text())
    print(f"{record['device']} x {record['gpus']}, torch {record['torch']}, {record['date']}\n{record['command']}")
    print(f"{'context':>8} {'GPUs':>4} {'scheme':>10} {'tokens/s':>10} {'per GPU':>10} {'peak GiB per GPU':>20}")
    measured_rows = [r for r in record["rows"] if "out_of_memory" not in r]
    for row in record["rows"]:
        if "out_of_memory" in row:
            print(f"{row['context']:8d} {row['gpus']:4d} {row['scheme']:>10}   out of memory")
            continue
        memory = ", ".join(f"{m:.1f}" for m in row["peak_memory_GiB"])
        print(f"{row['context']:8d} {row['gpus']:4d} {row['scheme']:>10} {row['tokens_per_s']:10.0f} "
              f"{row['tokens_per_s'] / row['gpus']:10.0f} {memory:>20}")
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = [f"{r['context'] // 1024}K\n{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}\n{r['scheme']}"
              for r in measured_rows]
    ax_speed.bar(labels, [r["tokens_per_s"] for r in measured_rows])
    ax_speed.set_ylabel("tokens per second")
    ax_memory.bar(labels, [max(r["peak_memory_GiB"]) for r in measured_rows])
    ax_memory.set_ylabel("peak memory per GPU (GiB)")
    for ax in (ax_speed, ax_memory):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"small preset, one sequence per step, {record['device']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, "11_two_gpu_scaling")
    plt.show()
    single = {r["context"]: r for r in measured_rows if r["gpus"] == 1}
    for row in measured_rows:
        if row["gpus"] > 1 and row["context"] in single:
            one = single[row["context"]]
            print(f"{row['context'] // 1024}K, {row['scheme']:>9}: {row['tokens_per_s'] / one['tokens_per_s']:.2f} x the "
                  f"tokens/s of one GPU, {max(row['peak_memory_GiB']) / one['peak_memory_GiB'][0]:.2f} x its peak memory per GPU")

# %% [markdown]
# Read against section 7. Splitting the sequence halves the activations each GPU holds, so the
# peak memory per GPU falls to about half for the chain — which is the point: the 128K sequence
# that fills most of one H200 trains on two with room to spare, and the context a job can reach
# grows with the number of GPUs. The all-gather scheme keeps a little more (the segment
# summaries and the correction's intermediates). Speed: the chain comes closest to twice one
# GPU; on two ranks its bubble is a single hop of a few kilobytes per layer. The all-gather scheme
# is slower here, as the cost table predicts for small $P$: it pays two collectives per layer in
# each direction, every rank waits at each one for the slowest, and it computes each segment's end
# state once more. Its advantage, no serial chain, only shows at many ranks, where the chain's
# $P-1$ hops per pass add up (the simulated curve of section 7). Both schemes' losses equal one
# GPU's step by step to bfloat16 rounding (the `losses` of each row in the results file).

# %% [markdown]
# ## Summary
#
# * Splitting one sequence over $P$ ranks at chunk boundaries leaves attention untouched; per
#   layer only the timestep norm's statistics and the CEMA state cross a boundary — the streaming
#   state of chapter 07, handed from process to process.
# * The official **chain** sends that state rank to rank, forward and (for the gradients) back.
#   Its cost is a pipeline bubble of $P-1$ hops and $P-1$ segments' norm + CEMA per pass (plus a
#   couple of hops per layer, because a blocking send waits for its receiver), not $P-1$ hops per
#   layer.
# * The **all-gather** scheme lets every rank summarise its own segment — Chan's merge for the
#   statistics, $h = \sum_j q^{g_j} S_j$ for the CEMA — with two collectives per layer and no
#   bubble.
# * Both are a few `torch.autograd.Function`s around `send`/`recv`/`all_gather`, attached to an
#   unchanged model with forward hooks; loss and every gradient equal one process's to float64
#   rounding, with uneven segments and a last segment that ends inside a chunk.
# * Every group has a timeout, so a rank that dies, hangs or never joins produces an error that
#   names the rank and what it was waiting for, not a hang.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** Split one sequence for the `tiny` preset ($n = 2$ layers, $D = 64$,
# $N = 16$, $G = 8$ groups, chunks of 64) at token 128, a chunk boundary. How many real numbers must
# cross the boundary, and how many of them come from the attention? Predict with section 1's count,
# then run the next cell, which reads the state at the boundary.
#
# ### BEGIN SOLUTION
# $(n+1) \cdot 2G + n \cdot 2DN = 3 \cdot 16 + 2 \cdot 2 \cdot 64 \cdot 16 = 48 + 4{,}096 = 4{,}144$ real
# numbers (each complex CEMA number counts as two): the means and variances of three timestep norms
# and two CEMA states. None from the attention: at a chunk boundary its cache is empty. (The counts are
# known to every rank from the segment lengths and need not be sent.)
# ### END SOLUTION

# %%
import torch

from megalodon_lite.cema import cema_powers
from megalodon_lite.config import preset
from megalodon_lite.exercises import check
from megalodon_lite.model import MegalodonLM
from megalodon_lite.parallel import merge_moments, prefix_cema_state
from megalodon_lite.timestep_norm import TimestepNormState

with torch.no_grad():
    _, at_boundary = MegalodonLM(preset("tiny"))(torch.randint(0, 256, (1, 128)))
norms = [at_boundary.final_norm] + [layer.norm for layer in at_boundary.layers]
statistics = sum(norm.mean.numel() + norm.var.numel() for norm in norms)
cema_numbers = sum(2 * layer.cema.numel() for layer in at_boundary.layers)
cached = sum(layer.attention.k.numel() + layer.attention.v.numel() for layer in at_boundary.layers)
print(f"norm statistics {statistics} + CEMA states {cema_numbers} = {statistics + cema_numbers} real numbers; "
      f"attention cache: {cached}")

# %% [markdown]
# **2. Derive.** A segment of length $n$ that starts in CEMA state $h_0$ ends in $q^n h_0 + S$, where
# $S$ is the state it reaches from zero. Segments $0, 1, 2$ of lengths $n_0, n_1, n_2$ have zero-start
# end states $S_0, S_1, S_2$. Unroll the state at the start of segment 2, then write the state at the
# start of segment $r$ as a sum over the earlier segments.
#
# ### BEGIN SOLUTION
# Segment 0 starts from nothing and ends in $S_0$. Segment 1 starts there and ends in
# $q^{n_1} S_0 + S_1$, which is where segment 2 starts. In general each earlier end state decays by
# $q$ once for every token between the end of its segment and the start of segment $r$:
# $h^{(r)} = \sum_{j<r} q^{g_j} S_j$ with $g_j = n_{j+1} + \dots + n_{r-1}$ (so $g_{r-1} = 0$). Every
# $S_j$ is computed by its own rank at the same time; only this weighted sum needs the others'.
# ### END SOLUTION

# %% [markdown]
# **3. Merge two segments' statistics.** `my_merge_moments(a, b)` takes the timestep-norm statistics
# (`TimestepNormState`: count (B,), mean and var (B, G)) of a segment `a` and of the segment `b` that
# follows it, and returns those of `a` followed by `b` (Chan, Golub and LeVeque's merge, section 3).
# The check compares it with `megalodon_lite.parallel.merge_moments`.

# %%
def my_merge_moments(a: TimestepNormState, b: TimestepNormState) -> TimestepNormState:
    """The count, mean and population variance of segment a followed by segment b."""
    ### BEGIN SOLUTION
    n_a, n_b = a.count.to(a.mean.dtype)[:, None], b.count.to(a.mean.dtype)[:, None]
    n = n_a + n_b
    delta = b.mean - a.mean
    mean = a.mean + delta * n_b / n
    var = (n_a * a.var + n_b * b.var) / n + delta.square() * n_a * n_b / n.square()
    return TimestepNormState(a.count + b.count, mean, var)
    ### END SOLUTION


# %% tags=["check"]
def two_summaries(generator: torch.Generator) -> tuple[TimestepNormState, TimestepNormState]:
    batch, groups = (int(n) for n in torch.randint(1, 9, (2,), generator=generator))

    def summary(offset: float) -> TimestepNormState:
        return TimestepNormState(torch.randint(1, 1000, (batch,), generator=generator),
                                 offset + torch.randn(batch, groups, generator=generator, dtype=torch.float64),
                                 torch.rand(batch, groups, generator=generator, dtype=torch.float64) + 0.1)

    return summary(0.0), summary(3.0)


check(my_merge_moments, reference=merge_moments, make_inputs=two_summaries,
      hint="weights n_a / n and n_b / n for the means and the variances, plus the spread of the two means, "
           "delta^2 n_a n_b / n^2")

# %% [markdown]
# **4. Combine the CEMA end states.** `my_prefix_cema_state(end_states, lengths, rank, q)` takes every
# segment's zero-start end state (P, B, D, N), the segment lengths and the CEMA's `q` (D, N), and
# returns the state at the start of segment `rank`, $\sum_{j<\text{rank}} q^{g_j} S_j$ (exercise 2),
# of shape (B, D, N). The check compares it with `megalodon_lite.parallel.prefix_cema_state`.

# %%
def my_prefix_cema_state(end_states: torch.Tensor, lengths: list[int], rank: int, q: torch.Tensor) -> torch.Tensor:
    """(P, B, D, N) zero-start end states -> the CEMA state (B, D, N) at the start of segment ``rank``."""
    ### BEGIN SOLUTION
    state = torch.zeros_like(end_states[0])
    for j in range(rank):
        gap = sum(lengths[j + 1:rank])                          # tokens between segment j's end and rank's start
        state = state + cema_powers(q, 1, start=gap)[..., 0] * end_states[j]
    return state
    ### END SOLUTION


# %% tags=["check"]
def segments(generator: torch.Generator) -> tuple:
    ranks, batch, channels, ndim = (int(n) for n in torch.randint(1, 6, (4,), generator=generator))
    lengths = [int(n) for n in torch.randint(1, 200, (ranks,), generator=generator)]
    magnitude = 0.9 + 0.099 * torch.rand(channels, ndim, generator=generator, dtype=torch.float64)
    q = torch.polar(magnitude, 3 * torch.rand(channels, ndim, generator=generator, dtype=torch.float64))
    end_states = torch.complex(*(torch.randn(ranks, batch, channels, ndim, generator=generator, dtype=torch.float64)
                                 for _ in range(2)))
    return end_states, lengths, int(torch.randint(0, ranks, (), generator=generator)), q


check(my_prefix_cema_state, reference=prefix_cema_state, make_inputs=segments,
      hint="g_j counts the tokens of the segments strictly between j and rank (0 for j = rank - 1); "
           "q ** g_j, or cema_powers(q, 1, start=g_j)[..., 0] for the accurate power")
