# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Triton kernels for the scans: CEMA and TimestepNorm
#
# Chapters 04 and 05 wrote CEMA and timestep normalisation in plain PyTorch: correct against
# float64 references, and slow. Issue 8 of this book measured on one H200 (bf16, 52M parameters,
# 32,768 tokens per step, 2026-11-30) that the model trained at 0.16–0.22× the speed of a
# Llama-style transformer of the same size, where the paper reports Megalodon about as fast at 4K
# and faster at 32K. Attention is one reason (chapter 09); these two ops are the other two.
#
# Both are *scans*: per token a little arithmetic on a state carried along the sequence. However
# it is computed, a scan must read its input once and write its output once, so the time to move
# those bytes at the device's memory bandwidth is a floor no implementation can beat. This
# chapter writes each op as Triton kernels, forward and backward, proves them against the
# chapter 04/05 references under the Triton interpreter (it runs on a laptop CPU), and measures
# them on a GPU against that floor. The target is forward+backward within 2× of the floor.
#
# The first cell reads the committed measurements (`kernels/results/nvidia_h200.json`, written by
# `python kernels/bench.py`): the PyTorch rows are where we start.

# %%
import copy
import json
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

if not torch.cuda.is_available():   # the kernels then run in the Triton interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megalodon_lite.notebook import FIGURES_DIR, SMOKE, pick, pick_device, require_cuda, save_figure, seed_everything

seed_everything(0)
device = pick_device()
ROOT = FIGURES_DIR.parent                      # the checkout: chapters/, kernels/, figures/
measured = json.loads((ROOT / "kernels" / "results" / "nvidia_h200.json").read_text())
print(f"{measured['device']}, torch {measured['torch']}, triton {measured['triton']}, {measured['date']}: "
      f"copy {measured['copy_TBps']:.2f} TB/s, bf16 matmul {measured['matmul_TFLOPs']:.0f} TFLOP/s")
print(f"{'op':>14} {'path':>6} {'B x L':>10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'x floor (fwd+bwd)':>18}")
for row in measured["rows"]:
    if row["path"] == "torch":
        print(f"{row['op']:>14} {row['path']:>6} {row['B']:>3} x {row['L']:<6} {row['fwd_ms']:9.2f} "
              f"{row['fwdbwd_ms']:11.2f} {row['fwdbwd_ms'] / row['floor_fwdbwd_ms']:18.0f}")

# %% [markdown]
# ## Part 1 · CEMA
#
# ### 1.1 What has to move, and what has to be computed
#
# CEMA (chapter 04, Megalodon §3.1) is, per channel $d$ and state $n = 1..N$,
#
# $$h_t = q \odot h_{t-1} + p \odot x_t, \qquad y_t = \mathrm{Re}\Big(\sum_n \gamma_n h_{t,n}\Big) + \omega\, x_t .$$
#
# **Bytes.** Forward, a kernel must read $x$ and write $y$: $2 \cdot BLD$ elements. Backward it
# reads $x$ and $\partial L/\partial y$ and writes $\partial L/\partial x$: three more, so
# forward+backward moves 2.5× the forward's bytes (the state, $N$ complex numbers per channel and
# row, is noise next to that). At the benchmark's 65,536 tokens × $D = 1024$ in bf16 and the copy
# bandwidth measured in the same run, that gives the floor below.
#
# **Arithmetic.** Stepping the recurrence costs $4N$ real multiply-adds per token and channel for
# $q \odot h$ (a complex product) and $2N$ for the output, $6N$ in all. On the GPU's float32 units
# (one fused multiply-add per lane and cycle; 128 lanes per SM on an H200) that alone takes longer
# than moving the bytes, before any loads or bookkeeping. So the work must go to the tensor cores,
# which means it must be written as matrix products.

# %%
tokens, d_model, n_states = 65_536, 1024, 16
bandwidth = measured["copy_TBps"] * 1e12                        # bytes read + written per second
floor_fwd_ms = 2 * tokens * d_model * 2 / bandwidth * 1e3      # bf16 x read + y written
fma_per_s = 132 * 128 * 1.98e9                                  # H200: SMs x fp32 lanes x boost clock
recurrence_ms = 6 * n_states * tokens * d_model / fma_per_s * 1e3
print(f"floor: forward {floor_fwd_ms:.3f} ms, forward+backward {2.5 * floor_fwd_ms:.3f} ms "
      f"(at {measured['copy_TBps']:.2f} TB/s)")
print(f"the recurrence's 6N = {6 * n_states} multiply-adds per token and channel on CUDA cores: "
      f"{recurrence_ms:.3f} ms = {recurrence_ms / floor_fwd_ms:.1f}x the forward floor")

# %% [markdown]
# ### 1.2 Blocks: a Toeplitz product inside, a state across
#
# Chapter 04's `cema_chunked` already cut the sequence into blocks of $C$ tokens. For block $m$
# with start state $H_m$ (the state after the previous block) and tokens $i, j = 0..C-1$:
#
# $$y_m[i] = \sum_{j \le i} k[i-j]\, x_m[j] + \mathrm{Re}\sum_n \gamma_n q_n^{\,i+1} H_{m,n} + \omega x_m[i],
# \qquad H_{m+1} = q^C H_m + \sum_j p\, q^{\,C-1-j} x_m[j],$$
#
# with the kernel $k[t] = \mathrm{Re}\sum_n p\gamma_n q_n^t$. In matrices, per channel, with the
# block as a row vector, $y_m = x_m T^\top + H_m V + \omega x_m$ and $H_{m+1} = A H_m + x_m U$:
# $T$ is the $C\times C$ lower-triangular Toeplitz matrix of $k$ ($T_{ij} = k[i-j]$), $U$
# ($C \times 2N$) and $V$ ($2N \times C$) map tokens to the state and back (complex numbers as
# real/imaginary pairs), $A = q^C$.
#
# **The point that makes tensor cores usable:** $T$, $U$, $V$ and $A$ depend on the channel only —
# CEMA is time-invariant. So the blocks of *different sequences* (or of different stretches of
# one sequence) can be stacked as the rows of one product with the same matrices. A Triton
# program takes $S_B = 16$ such independent *streams* and a few channels ($B_D = 4$, one warp
# each), and steps through the streams' blocks in lockstep: at every step the 16 blocks are the
# 16 rows of $(16 \times C) \cdot (C \times C)$, batched over the channels — one 3-D `tl.dot` of
# shape $(B_D, 16, C) \cdot (B_D, C, C)$. The carried states are $16 \times B_D \times N$ complex
# numbers in registers, and the step $H \leftarrow A H + xU$ is elementwise. Per token and channel that is
# $C + 2N + 2N$ multiply-adds on tensor cores ($C$ for $T$, $2N$ each for $U$ and $V$), and $4N/C$
# on the float32 units for the carry. Loads are tiles of $C$ tokens × $B_D$ channels, contiguous
# along the channels.
#
# **Streams from one long row.** A batch of 32 rows gives 32 streams; one row of 65,536 tokens
# gives one, not enough for 132 SMs. So rows are cut into *segments* of $S$ tokens, each a stream.
# A segment needs its start state. A first kernel runs every segment from a zero state with unit
# input and writes its end state $e_s = \sum_t q^{S-1-t} x_t$ — $N$ complex numbers per segment
# and channel, a few percent of the bytes of $x$. Then each program of the main kernel builds its
# streams' start states by walking the segments before them,
# $H \leftarrow q^S H + p\, e_s$, from the row's initial state. The row's last block may be shorter
# than $C$ ($r$ tokens); the stream that holds it also writes the final state
# $q^r H + \sum_{j<r} p\, q^{\,r-1-j} x[j]$, which is what streaming needs.
#
# The picture: a row cut into segments and blocks (left), the Toeplitz tile of one channel
# (middle), and what one program holds: 16 streams stepping through their blocks together (right).

# %%
from megalodon_lite.cema import CEMA, cema_kernel, cema_recurrence


def draw_blocks(chunk: int = 8, blocks_per_segment: int = 4, segments: int = 3, streams: int = 6):
    """Three panels: a row in segments and blocks; a Toeplitz tile; a program's lockstep streams."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [2.3, 1, 1.4]})
    ax = axes[0]
    colours = plt.cm.Pastel1.colors
    for s in range(segments):
        for b in range(blocks_per_segment):
            m = s * blocks_per_segment + b
            ax.add_patch(plt.Rectangle((m * chunk, 0), chunk, 1, facecolor=colours[s], edgecolor="k", lw=0.8))
            if b < blocks_per_segment - 1:
                ax.annotate("", xy=((m + 1) * chunk + 1.5, 1.15), xytext=(m * chunk + chunk / 2, 1.15),
                            arrowprops=dict(arrowstyle="->", lw=0.8, connectionstyle="arc3,rad=-0.4"))
        ax.text((s + 0.5) * blocks_per_segment * chunk, -0.45, f"segment {s}: a stream", ha="center", fontsize=8)
        ax.text((s + 1) * blocks_per_segment * chunk - 1, 0.5, f"$e_{s}$", ha="right", va="center", fontsize=9)
    ax.text(0.5 * chunk, 1.75, "H carried block to block (registers)", fontsize=8)
    ax.annotate("start of segment s: $H \\leftarrow q^S H + p\\, e_{s-1}$", xy=(blocks_per_segment * chunk, 0),
                xytext=(blocks_per_segment * chunk * 1.2, -1.2), fontsize=8, arrowprops=dict(arrowstyle="->", lw=0.8))
    ax.set(xlim=(-2, segments * blocks_per_segment * chunk + 2), ylim=(-1.6, 2.2),
           title=f"one row: segments of {blocks_per_segment} blocks of C = {chunk} tokens")
    ax.axis("off")
    layer = CEMA(1, 4)
    with torch.no_grad():
        p, q, gamma = layer.coefficients()
        k = cema_kernel(p, q, gamma, chunk)[0]
    lags = torch.arange(chunk)[:, None] - torch.arange(chunk)[None, :]
    tile = torch.where(lags >= 0, k[lags.clamp(min=0)], torch.tensor(float("nan")))
    axes[1].imshow(tile, cmap="coolwarm", vmin=-k.abs().max(), vmax=k.abs().max())
    axes[1].set(title="inside a block: T[i, j] = k[i - j]", xlabel="input token j", ylabel="output token i")
    ax = axes[2]
    for r in range(streams):
        for b in range(blocks_per_segment):
            current = b == 1
            ax.add_patch(plt.Rectangle((b, r), 0.92, 0.85, facecolor="tab:orange" if current else "0.9", edgecolor="k", lw=0.5))
    ax.text(1.46, streams + 0.3, "one step: a (S_B x C) @ (C x C) tl.dot\nper channel", ha="center", fontsize=8)
    ax.set(xlim=(-0.2, blocks_per_segment + 0.2), ylim=(-0.3, streams + 1.4), xlabel="block (time) →",
           ylabel="stream (row or segment)", title="one program: streams in lockstep")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return fig


fig = draw_blocks()
save_figure(fig, "08_cema_blocks")
plt.show()

# %% [markdown]
# ### 1.3 The module, its tile sizes and the segment plan
#
# `megalodon_lite/ops/cema.py` is generated from the cells tagged `export:ops.cema` below. Its
# layout follows the kernel libraries of the field (flash-linear-attention's `ops/*`, mamba's
# `ops/triton/ssd_*.py`): tables, kernels, launchers with one-line shape checks, the autograd
# function, custom ops and the public function; the reference it is tested against is chapter
# 04's (`cema_chunked`, `cema_recurrence`), imported, not copied. The tile sizes live in one
# frozen dataclass; the defaults are the ones measured best on an H200 (`kernels/tune_cema.py`).

# %% tags=["export:ops.cema"]
"""CEMA as Triton kernels: the chunked scan of chapter 04 on tensor cores, forward and backward.

Megalodon §3.1 (official code: megalodon/modules/complex_exponential_moving_average.py), per
channel d and state n::

    h_t = q h_{t-1} + p x_t,     y_t = Re(sum_n gamma_n h_t,n) + omega x_t

with x (B, L, D) in bf16/fp16/fp32, p (D, N) float32, q and gamma (D, N) complex64, omega (D,),
the initial state h0 (B, D, N) complex64 or None. Accumulation, states and powers are float32.

Blocks of C tokens: inside a block a C x C Toeplitz matmul, across blocks the N complex states
carried in registers. One program runs SB independent *streams* (a batch row, or a segment of
one) in lockstep over BD channels, so every product is a tensor-core ``tl.dot`` batched over
channels: (BD, SB, C) @ (BD, C, C). Long rows are cut into segments whose start states come from
a first pass that writes every segment's end state. The kernels:

0. ``_cema_tables_kernel``: the per-channel tables (Toeplitz row, state maps, powers of q).
1. ``_cema_segment_end_kernel``: each segment's end state from zero (and its q-derivative).
2. ``_cema_scan_kernel``: outputs and final state; the backward runs it on dy backwards in time.
3. ``_cema_grad_sums_kernel``: the sums over (b, t) that the parameter gradients need.
4. ``_cema_grad_finish_kernel``: the parameter gradients from those sums.

``cema_triton`` is the public function; ``torch.ops.megalodon_lite.cema_fwd``/``cema_bwd`` are
the opaque custom ops torch.compile sees. The reference is chapter 04's ``cema_chunked``.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon_lite.backend import interpreter_enabled
from megalodon_lite.cema import _check_inputs, cema_chunked, cema_powers, cema_recurrence  # noqa: F401  (references)


@dataclass(frozen=True)
class CemaKernelConfig:
    """Tile sizes of the CEMA kernels. The defaults were the fastest of the variants timed on an
    H200 (kernels/tune_cema.py; the record is kernels/results/cema_tuning_h200*.json and
    kernels/NOTES_cema.md)."""

    chunk: int = 16              # C of the scan kernels (forward and dx), tokens per block
    chunk_grad: int = 16         # C of the parameter-gradient kernel
    block_d: int = 4             # BD, channels per program (one warp each)
    streams: int = 16            # SB, (row, segment) streams per program: the M of every tl.dot
    num_warps: int = 4
    num_stages: int = 2
    segment: int = 0             # tokens per segment; 0: split rows until the grid is full
    min_programs: int = 528      # ... i.e. until this many programs (4 per H200 SM) ...
    min_segment_blocks: int = 8  # ... unless segments would get shorter than this many blocks
    precision: str = ""          # tl.dot operands: "" (tf32, or tf32x3 for float32 x), "tf32", "bf16", "ieee"
    prefetch: bool = True        # load the next block while computing this one


DEFAULT_CONFIG = CemaKernelConfig()
POISON_OUTPUTS = False   # test hook: kernel outputs start as NaN, so an unwritten element shows


@contextmanager
def poisoned_outputs():
    """Within this block every buffer the kernels write starts filled with NaN."""
    global POISON_OUTPUTS
    previous, POISON_OUTPUTS = POISON_OUTPUTS, True
    try:
        yield
    finally:
        POISON_OUTPUTS = previous

# %% [markdown]
# The segment plan: rows are halved into segments until the grid holds enough programs to fill
# the device (a program per channel tile and group of 16 streams), but never below 8 blocks per
# segment. `cfg.segment` forces a length, which the tests use to reach several segments at a
# few hundred tokens.

# %% tags=["export:ops.cema"]
@dataclass(frozen=True)
class Segments:
    """How each row of L tokens is cut: n_seg segments of seg_len tokens (the last may be short)."""

    n_seg: int
    seg_len: int
    groups: int   # programs along the stream axis: ceil(B * n_seg / SB)


def plan_segments(batch: int, length: int, d_model: int, cfg: CemaKernelConfig) -> Segments:
    """Cut rows into segments until the grid has cfg.min_programs programs (a power-of-two count;
    segments stay at least cfg.min_segment_blocks blocks long), or as cfg.segment says."""
    unit = max(cfg.chunk, cfg.chunk_grad)
    if cfg.segment:
        seg_len = triton.cdiv(cfg.segment, unit) * unit
    else:
        blocks, tiles, n_seg = triton.cdiv(length, unit), triton.cdiv(d_model, cfg.block_d), 1
        while (triton.cdiv(batch * n_seg, cfg.streams) * tiles < cfg.min_programs
               and blocks >= 2 * n_seg * cfg.min_segment_blocks):
            n_seg *= 2
        seg_len = triton.cdiv(blocks, n_seg) * unit
    n_seg = triton.cdiv(length, seg_len)
    return Segments(n_seg, seg_len, triton.cdiv(batch * n_seg, cfg.streams))


def _dot_precision(dtype: torch.dtype, cfg: CemaKernelConfig) -> str:
    if cfg.precision:
        return cfg.precision
    return "tf32x3" if dtype == torch.float32 else "tf32"

# %% [markdown]
# ### 1.4 Complex numbers as pairs, and the precision of the products
#
# Complex numbers travel as (real, imaginary) pairs: a complex $(B_D, S_B, N)$ state is two real
# tensors for the elementwise algebra, and is interleaved into one $(B_D, S_B, 2N)$ tensor when it
# enters a matrix product, matching the tables' `(..., N, 2)` layout (`torch.view_as_real`).
#
# **Precision.** `tl.dot` runs on tensor cores in tf32 (10-bit mantissa) by default. For bf16 or
# fp16 input, $x$ is exact in tf32 and the tables and states are rounded to a relative $2^{-11}$,
# four times finer than the $2^{-9}$ with which the bf16 output is stored, and everything is
# accumulated in float32. For float32 input tf32 would lose precision the caller did not ask to
# lose, so the kernels use `tf32x3` (three tf32 products that recover float32 accuracy) there.

# %% tags=["export:ops.cema"]
@triton.jit
def _cmul(ar, ai, br, bi):
    """(ar + i ai)(br + i bi) on real/imaginary pairs."""
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _cstep(ar, ai, dar, dai, hr, hi, dhr, dhi, ur, ui, dur, dui):
    """One step of a state and its q-derivative: h <- A h + u,  h' <- A h' + A' h + u'."""
    return (ar * hr - ai * hi + ur, ar * hi + ai * hr + ui,
            ar * dhr - ai * dhi + dar * hr - dai * hi + dur, ar * dhi + ai * dhr + dar * hi + dai * hr + dui)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation; "bf16" rounds both operands to bfloat16 first."""
    if PRECISION == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _operand(t, PRECISION: tl.constexpr):
    """A loop-invariant matmul operand, converted once to what _dot reads."""
    if PRECISION == "bf16":
        return t.to(tl.bfloat16)
    else:
        return t


@triton.jit
def _pairs_to_complex(t, BD: tl.constexpr, SB: tl.constexpr, NP: tl.constexpr):
    """(BD, SB, 2NP) with columns (re, im) per state -> re, im, each (BD, SB, NP)."""
    return tl.split(tl.reshape(t, (BD, SB, NP, 2)))


@triton.jit
def _complex_to_pairs(re, im, BD: tl.constexpr, SB: tl.constexpr, NP: tl.constexpr):
    return tl.reshape(tl.join(re, im), (BD, SB, 2 * NP))

# %% tags=["export:ops.cema"]
@triton.jit
def _load_map(ptr, d, dmask, row_shift, C: tl.constexpr, NP: tl.constexpr, D_STRIDE: tl.constexpr):
    """A per-channel (C, NP, 2) table as (BD, C, 2NP); row j reads row j + row_shift, zero outside
    0..C-1 (the last, shorter block uses the full table shifted)."""
    j = tl.arange(0, C) + row_shift
    k = tl.arange(0, 2 * NP)
    offs = d[:, None, None] * D_STRIDE + j[None, :, None] * (2 * NP) + k[None, None, :]
    return tl.load(ptr + offs, mask=dmask[:, None, None] & ((j >= 0) & (j < C))[None, :, None], other=0.0)


@triton.jit
def _load_step(step_ptr, row: tl.constexpr, d, dmask, NP: tl.constexpr):
    """Row `row` of a (D, STEP_ROWS, NP, 2) step table as (re, im), each (BD, NP)."""
    n = tl.arange(0, NP)
    offs = d[:, None] * (STEP_ROWS * NP * 2) + row * (NP * 2) + n[None, :] * 2
    return (tl.load(step_ptr + offs, mask=dmask[:, None], other=0.0),
            tl.load(step_ptr + offs + 1, mask=dmask[:, None], other=0.0))


@triton.jit
def _load_step3(step_ptr, row: tl.constexpr, d, dmask, NP: tl.constexpr):
    """The same, shaped (BD, 1, NP) to scale (BD, SB, NP) states."""
    re, im = _load_step(step_ptr, row, d, dmask, NP)
    return re[:, None, :], im[:, None, :]


@triton.jit
def _load_state(ptr, index, batch_row, B, D, N, d, dmask, NP: tl.constexpr):
    """state[index] of an (index, D, N, 2) tensor as (re, im), each (BD, NP); zero if batch_row >= B."""
    n = tl.arange(0, NP)
    offs = (index.to(tl.int64) * D + d[:, None]) * (N * 2) + n[None, :] * 2
    # (batch_row + 0 * n): a tensor, so that the mask stays boolean under the interpreter too
    mask = dmask[:, None] & (n[None, :] < N) & ((batch_row + 0 * n[None, :]) < B)
    return tl.load(ptr + offs, mask=mask, other=0.0), tl.load(ptr + offs + 1, mask=mask, other=0.0)


@triton.jit
def _load_block(ptr, row, seg, blk, B, L, D, d, dmask, C: tl.constexpr, SEG_TOKENS, REVERSE: tl.constexpr,
                FLIP: tl.constexpr):
    """The (BD, SB, C) tile of block `blk` of every stream, in the input's dtype (zeros outside)."""
    offs, mask = _block_offsets(row, seg, blk, B, L, D, d, dmask, C, SEG_TOKENS, REVERSE, FLIP)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _store_pair(ptrs, re, im, mask):
    tl.store(ptrs, re, mask=mask)
    tl.store(ptrs + 1, im, mask=mask)


@triton.jit
def _state_offsets(index, live, D, N, d, dmask, NP: tl.constexpr):
    """Offsets and mask of state[index] (index: (SB,)) in an (index, D, N, 2) tensor, as (BD, SB, NP)."""
    n = tl.arange(0, NP)
    offs = (index.to(tl.int64)[None, :, None] * D + d[:, None, None]) * (N * 2) + n[None, None, :] * 2
    return offs, dmask[:, None, None] & live[None, :, None] & (n[None, None, :] < N)


@triton.jit
def _gather_states(ptr, index, live, D, N, d, dmask, NP: tl.constexpr):
    offs, mask = _state_offsets(index, live, D, N, d, dmask, NP)
    return tl.load(ptr + offs, mask=mask, other=0.0), tl.load(ptr + offs + 1, mask=mask, other=0.0)


@triton.jit
def _store_states(ptr, index, live, re, im, D, N, d, dmask, NP: tl.constexpr):
    offs, mask = _state_offsets(index, live, D, N, d, dmask, NP)
    _store_pair(ptr + offs, re, im, mask)


@triton.jit
def _block_offsets(row, seg, blk, B, L, D, d, dmask, C: tl.constexpr, SEG_TOKENS, REVERSE: tl.constexpr,
                   FLIP: tl.constexpr, shift=0):
    """Element offsets (BD, SB, C) of block `blk` of every stream, and the mask of real tokens.
    REVERSE reads the row backwards in time; FLIP reverses the token order inside the block;
    shift moves every token by `shift` places (masking what falls outside the block; a block
    past the segment's end is all masked)."""
    cj = tl.arange(0, C)
    if FLIP:
        cj = C - 1 - cj
    cj = cj + shift
    tok = seg[:, None] * SEG_TOKENS + blk * C + cj[None, :]
    if REVERSE:
        pos = L - 1 - tok
    else:
        pos = tok
    offs = row.to(tl.int64)[None, :, None] * L * D + pos.to(tl.int64)[None, :, :] * D + d[:, None, None]
    inside = (tok < L) & (row < B)[:, None] & ((cj >= 0) & (cj < C) & (blk * C + cj < SEG_TOKENS))[None, :]
    return offs, inside[None, :, :] & dmask[:, None, None]

# %% [markdown]
# ### 1.5 Per-channel tables
#
# Everything the kernels multiply by depends on the channel only: the Toeplitz row $k[0..C-1]$,
# the maps $U$ and $V$, the powers $Q[j] = q^j$, and a few per-state scalars ($q^C$, $q^r$ for the
# short last block, $q^S$ for a segment). They are computed once per call by one small kernel —
# built with PyTorch operations they were some thirty launches per call, each costing more than
# the table's arithmetic. Every power follows chapter 04's `cema_powers`: the exponent
# $t \log q$ is formed in float64 and the phase reduced modulo $2\pi$ before rounding, so the
# kernels never build $q^t$ by repeated multiplication and the powers stay accurate at any $t$
# (`tests/test_ops_cema.py` compares the tables with `cema_powers`). The state axis is padded to
# a power of two $\ge 8$ (a `tl.dot` needs sizes $\ge 16$); the padded states have zero
# coefficients and stay zero.

# %% tags=["export:ops.cema"]
def _padded_states(n_states: int) -> int:
    """NP: N rounded up to a power of two, at least 8 (2NP >= 16 is tl.dot's smallest size)."""
    return max(8, triton.next_power_of_2(n_states))


STEP_A, STEP_AR1, STEP_AR, STEP_P, STEP_BETA, STEP_Q, STEP_QL1, STEP_ROWS = (tl.constexpr(i) for i in range(8))
TWO_PI = tl.constexpr(2 * math.pi)


@dataclass
class CemaTables:
    """Per-channel tables of one scan, state axis padded to NP (padded states: zeros).

    powers (D, C, NP, 2): Q[j] = q^j;  kern (D, C): k[j] = Re sum_n p gamma q^j;
    u (D, C, NP, 2): u[j] = beta q^(C-1-j);  v (D, NP, 2, C): rows (Re, -Im) of c q^(i+v0);
    step (D, 8, NP, 2): q^C, q^(r-1), q^r, q^S, beta, q, q^(L-1)   (r: tokens in the last block).
    Forward: beta = p, c = gamma, v0 = 1. Adjoint (the input gradient): beta = q gamma, c = p, v0 = 0.
    """

    chunk: int
    n_states: int
    n_pad: int
    powers: Tensor
    kern: Tensor
    u: Tensor
    v: Tensor
    step: Tensor


@triton.jit
def _power(log_r, theta, t):
    """q^t as float32 (re, im) from log|q| and arg q in float64: chapter 04's cema_powers recipe
    (the exponent t log q in float64, the phase reduced modulo 2 pi, then rounded once)."""
    t = t.to(tl.float64)
    magnitude = tl.exp(log_r * t).to(tl.float32)
    phase = theta * t
    phase = (phase - tl.floor(phase / TWO_PI) * TWO_PI).to(tl.float32)
    return magnitude * tl.cos(phase), magnitude * tl.sin(phase)


@triton.jit
def _cema_tables_kernel(log_q_ptr, q_ptr, p_ptr, gamma_ptr, powers_ptr, kern_ptr, u_ptr, v_ptr, step_ptr,
                        D, N, last_len, seg_len, length,
                        C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, ADJOINT: tl.constexpr):
    """Every table of CemaTables, for BD channels per program (one launch per scan)."""
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    live = (d < D)[:, None] & (n < N)[None, :]
    at = d[:, None] * N + n[None, :]
    log_r, theta = tl.load(log_q_ptr + 2 * at, mask=live, other=0.0), tl.load(log_q_ptr + 2 * at + 1, mask=live, other=0.0)
    qr, qi = tl.load(q_ptr + 2 * at, mask=live, other=0.0), tl.load(q_ptr + 2 * at + 1, mask=live, other=0.0)
    p = tl.load(p_ptr + at, mask=live, other=0.0)
    gr, gi = tl.load(gamma_ptr + 2 * at, mask=live, other=0.0), tl.load(gamma_ptr + 2 * at + 1, mask=live, other=0.0)
    if ADJOINT:
        br, bi, cr, ci, v0 = qr * gr - qi * gi, qr * gi + qi * gr, p, p * 0.0, 0
    else:
        br, bi, cr, ci, v0 = p, p * 0.0, gr, gi, 1
    j = tl.arange(0, C)[None, :, None]
    lr3, th3, live3 = log_r[:, None, :], theta[:, None, :], live[:, None, :]
    d3, n3 = d[:, None, None], n[None, None, :]
    pr, pi = _power(lr3, th3, j + 0 * d3)                                  # q^j
    offs = ((d3 * C + j) * NP + n3) * 2
    _store_pair(powers_ptr + offs, tl.where(live3, pr, 0.0), tl.where(live3, pi, 0.0), (d3 < D) & (j < C))
    kern = tl.sum(p[:, None, :] * (gr[:, None, :] * pr - gi[:, None, :] * pi), 2)
    tl.store(kern_ptr + d[:, None] * C + tl.arange(0, C)[None, :], kern, mask=(d < D)[:, None])
    ur, ui = _power(lr3, th3, C - 1 - j + 0 * d3)                          # beta q^(C-1-j)
    _store_pair(u_ptr + offs, br[:, None, :] * ur - bi[:, None, :] * ui, br[:, None, :] * ui + bi[:, None, :] * ur,
                (d3 < D) & (j < C))
    vr, vi = _power(lr3, th3, j + v0 + 0 * d3)                             # c q^(i+v0): rows Re, -Im
    offs_v = ((d3 * NP + n3) * 2) * C + j
    tl.store(v_ptr + offs_v, cr[:, None, :] * vr - ci[:, None, :] * vi, mask=(d3 < D) & (j < C))
    tl.store(v_ptr + offs_v + C, -(cr[:, None, :] * vi + ci[:, None, :] * vr), mask=(d3 < D) & (j < C))
    rows = step_ptr + ((d[:, None] * STEP_ROWS) * NP + n[None, :]) * 2
    t = 0 * d[:, None] + 0 * n[None, :]                                     # (BD, NP) integer exponents
    _store_step_power(rows + STEP_A * NP * 2, log_r, theta, t + C, live, d < D)
    _store_step_power(rows + STEP_AR1 * NP * 2, log_r, theta, t + last_len - 1, live, d < D)
    _store_step_power(rows + STEP_AR * NP * 2, log_r, theta, t + last_len, live, d < D)
    _store_step_power(rows + STEP_P * NP * 2, log_r, theta, t + seg_len, live, d < D)
    _store_step_power(rows + STEP_QL1 * NP * 2, log_r, theta, t + length - 1, live, d < D)
    _store_pair(rows + STEP_BETA * NP * 2, br, bi, (d < D)[:, None])
    _store_pair(rows + STEP_Q * NP * 2, qr, qi, (d < D)[:, None])


@triton.jit
def _store_step_power(ptrs, log_r, theta, t, live, dmask):
    re, im = _power(log_r, theta, t)
    _store_pair(ptrs, tl.where(live, re, 0.0), tl.where(live, im, 0.0), dmask[:, None])


def build_tables(log_q: Tensor, q: Tensor, p: Tensor, gamma: Tensor, chunk: int, length: int, seg_len: int, *,
                 adjoint: bool) -> CemaTables:
    """Launch _cema_tables_kernel. log_q: (D, N, 2) float64 (log|q|, arg q); q, gamma: (D, N, 2) float32 pairs."""
    d_model, n_states = p.shape
    n_pad = _padded_states(n_states)
    new = lambda *shape: _new(shape, p)  # noqa: E731
    tables = CemaTables(chunk, n_states, n_pad, new(d_model, chunk, n_pad, 2), new(d_model, chunk), new(d_model, chunk, n_pad, 2),
                        new(d_model, n_pad, 2, chunk), new(d_model, STEP_ROWS, n_pad, 2))
    last_len = length - (triton.cdiv(length, chunk) - 1) * chunk
    _cema_tables_kernel[(triton.cdiv(d_model, 8),)](
        log_q, q, p, gamma, tables.powers, tables.kern, tables.u, tables.v, tables.step,
        d_model, n_states, last_len, seg_len, length, C=chunk, BD=8, NP=n_pad, ADJOINT=adjoint)
    return tables

# %% [markdown]
# ### 1.6 The kernels
#
# First, the start states of a program's streams: one running state walks the segments in order
# (streams are (row, segment) pairs in row-major order), restarting from the row's initial state
# at every new row: the segments before the program's first stream, then its 16 streams. The walk
# is sequential, so its length grows with the number of segments per row; the segment plan keeps
# that number moderate (the tuning sessions in `kernels/NOTES_cema.md` show what 256 cost).

# %% tags=["export:ops.cema"]
@triton.jit
def _segment_starts(ends_ptr, z_ptr, step_ptr, pid_g, B, D, N, n_seg, d, dmask,
                    BD: tl.constexpr, SB: tl.constexpr, NP: tl.constexpr, HAS_Z: tl.constexpr, z_sign: tl.constexpr):
    """Start state (BD, SB, NP) x 2 of this program's streams: the row's initial state z carried
    over the earlier segments, H <- q^S H + beta e_s, e_s being segment s's end state from zero
    with unit input (kernel 1). Streams are (row, segment) pairs in row-major order, so one running
    state serves them all, restarting from z at each new row. (Arithmetic written out: this loop
    runs under the interpreter in CI, where every helper call costs a millisecond.)"""
    pr, pi = _load_step(step_ptr, STEP_P, d, dmask, NP)
    br, bi = _load_step(step_ptr, STEP_BETA, d, dmask, NP)
    n = tl.arange(0, NP)
    offs = d[:, None] * (N * 2) + n[None, :] * 2                  # state[index] is at index * D * N * 2 + offs
    in_range = dmask[:, None] & (n[None, :] < N)
    zeros = tl.zeros((BD, NP), tl.int32)                           # keeps masks boolean under the interpreter
    first = pid_g * SB
    row = first // n_seg
    mask = in_range & (zeros + row < B)
    hr = tl.zeros((BD, NP), tl.float32)
    hi = tl.zeros((BD, NP), tl.float32)
    if HAS_Z:
        hr = tl.load(z_ptr + row * D * N * 2 + offs, mask=mask, other=0.0)
        hi = z_sign * tl.load(z_ptr + row * D * N * 2 + offs + 1, mask=mask, other=0.0)
    slot = tl.arange(0, SB)[None, :, None]
    out_r = tl.zeros((BD, SB, NP), tl.float32)
    out_i = tl.zeros((BD, SB, NP), tl.float32)
    for stream in range(row * n_seg, first + SB):    # the first row's earlier segments, then ours
        row = stream // n_seg
        mask = in_range & (zeros + row < B)
        if HAS_Z:
            zr = tl.load(z_ptr + row * D * N * 2 + offs, mask=mask, other=0.0)
            zi = z_sign * tl.load(z_ptr + row * D * N * 2 + offs + 1, mask=mask, other=0.0)
        else:
            zr, zi = hr * 0.0, hi * 0.0
        new_row = stream == row * n_seg
        hr, hi = tl.where(new_row, zr, hr), tl.where(new_row, zi, hi)
        out_r = tl.where(slot == stream - first, hr[:, None, :], out_r)
        out_i = tl.where(slot == stream - first, hi[:, None, :], out_i)
        er = tl.load(ends_ptr + stream * D * N * 2 + offs, mask=mask, other=0.0)
        ei = tl.load(ends_ptr + stream * D * N * 2 + offs + 1, mask=mask, other=0.0)
        hr, hi = pr * hr - pi * hi + br * er - bi * ei, pr * hi + pi * hr + br * ei + bi * er
    return out_r, out_i

# %% [markdown]
# **Kernel 1** writes each segment's end state from zero with unit input. It reads the tokens of
# a block last-first, so that the block's contribution $\sum_j x_j q^{C-1-j}$ is the flipped block
# times the plain power table $Q[j] = q^j$ (one table serves this kernel and kernel 3). With
# `DERIV` it also carries $E = q\,\partial e/\partial q$, needed by the backward (§1.7).

# %% tags=["export:ops.cema"]
# Integer arguments that change with the sequence are not specialised on (one compiled kernel
# serves every length); D is, so that loads along the channels can be vectorised.
_LENGTH_ARGS = ["B", "L", "N", "n_seg", "seg_blocks", "last_seg", "last_blk", "last_len"]


@triton.jit(do_not_specialize=_LENGTH_ARGS[:5])
def _cema_segment_end_kernel(
    x_ptr, powers_ptr, step_ptr, ends_ptr, ends_dq_ptr,
    B, L, D, N, n_seg, seg_blocks,
    C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, SB: tl.constexpr,
    REVERSE: tl.constexpr, DERIV: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Kernel 1. Every segment's end state from a zero start with unit input,
    e = sum_t q^(S-1-t) x_t, and with DERIV also E = q de/dq. Grid: (channel tiles, groups).
    Tokens are read last-first inside a block (FLIP), so a block adds X_flipped @ Q to e and
    (j X_flipped) @ Q to E, Q[j] = q^j:  e <- A e + X_f Q,  E <- A E + C A e + (j X_f) Q."""
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    stream = pid_g * SB + tl.arange(0, SB)
    row = stream // n_seg
    seg = stream - row * n_seg
    powers = _operand(_load_map(powers_ptr, d, dmask, 0, C, NP, C * 2 * NP), PRECISION)
    ar, ai = _load_step3(step_ptr, STEP_A, d, dmask, NP)
    er = tl.zeros((BD, SB, NP), tl.float32)
    ei, fr, fi = er, er, er
    j = tl.arange(0, C).to(tl.float32)[None, None, :]
    x_next = _load_block(x_ptr, row, seg, 0, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, True)
    for blk in range(0, seg_blocks):
        if PREFETCH:
            x = x_next.to(tl.float32)
            x_next = _load_block(x_ptr, row, seg, blk + 1, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, True)
        else:
            x = _load_block(x_ptr, row, seg, blk, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, True).to(tl.float32)
        ur, ui = _pairs_to_complex(_dot(x, powers, PRECISION), BD, SB, NP)
        if DERIV:
            dur, dui = _pairs_to_complex(_dot(x * j, powers, PRECISION), BD, SB, NP)
            er, ei, fr, fi = _cstep(ar, ai, C * ar, C * ai, er, ei, fr, fi, ur, ui, dur, dui)
        else:
            er, ei = _cmul(ar, ai, er, ei)
            er, ei = er + ur, ei + ui
    _store_states(ends_ptr, stream, row < B, er, ei, D, N, d, dmask, NP)
    if DERIV:
        _store_states(ends_dq_ptr, stream, row < B, fr, fi, D, N, d, dmask, NP)

# %% [markdown]
# **Kernel 2** is the forward. The final state is taken from the state before the last block,
# kept in a register tensor as $q^r H$ while the loop runs and completed after it: computed inside
# the loop, in a branch, it made the compiler hold registers for it in every iteration (ptxas:
# 253 registers instead of about 180 at $C = 32$). The block moved $C - r$ places to the right
# times $U$ gives $\sum_{j<r} p\, q^{r-1-j} x_j$ without a shifted table.

# %% tags=["export:ops.cema"]
@triton.jit
def _scan_block(x, y_ptr, blk, row, seg, hr, hi, toeplitz, u, v, ar, ai, omega, B, L, D, d, dmask,
                C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, SB: tl.constexpr, SEG_TOKENS,
                REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """One block X (loaded) of every stream: y = X T + H_pairs V + omega X, then H <- A H + X U."""
    offs, mask = _block_offsets(row, seg, blk, B, L, D, d, dmask, C, SEG_TOKENS, REVERSE, False)
    x = x.to(tl.float32)
    h = _complex_to_pairs(hr, hi, BD, SB, NP)
    y = _dot(x, toeplitz, PRECISION) + _dot(h, v, PRECISION) + omega * x
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    ur, ui = _pairs_to_complex(_dot(x, u, PRECISION), BD, SB, NP)
    return ar * hr - ai * hi + ur, ar * hi + ai * hr + ui


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _cema_scan_kernel(
    x_ptr, y_ptr, kern_ptr, u_ptr, v_ptr, step_ptr, omega_ptr, ends_ptr, z_ptr, h_last_ptr,
    B, L, D, N, n_seg, seg_blocks, last_seg, last_blk, last_len,
    C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, SB: tl.constexpr,
    REVERSE: tl.constexpr, HAS_Z: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Kernel 2. Per block of C tokens of every stream, with the block-start state H in registers:
        y = X T + H_pairs V + omega X,     H <- q^C H + X U
    (T[j, i] = k[i - j], the Toeplitz product; U, V from scan_tables). The stream holding the
    last token writes the final state q^r H + X U_r (U_r: U shifted to the block's r tokens).
    Grid: (channel tiles, stream groups)."""
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    stream = pid_g * SB + tl.arange(0, SB)
    row = stream // n_seg
    seg = stream - row * n_seg
    cj = tl.arange(0, C)
    lag = cj[None, None, :] - cj[None, :, None]                             # (1, C_j, C_i): i - j
    toeplitz = tl.load(kern_ptr + d[:, None, None] * C + lag, mask=dmask[:, None, None] & (lag >= 0), other=0.0)
    u = _load_map(u_ptr, d, dmask, 0, C, NP, C * 2 * NP)
    k = tl.arange(0, 2 * NP)
    v = tl.load(v_ptr + d[:, None, None] * (2 * NP * C) + k[None, :, None] * C + cj[None, None, :],
                mask=dmask[:, None, None], other=0.0)
    toeplitz, u, v = _operand(toeplitz, PRECISION), _operand(u, PRECISION), _operand(v, PRECISION)
    ar, ai = _load_step3(step_ptr, STEP_A, d, dmask, NP)
    omega = tl.load(omega_ptr + d, mask=dmask, other=0.0)[:, None, None]
    sign: tl.constexpr = -1.0 if REVERSE else 1.0     # the adjoint run starts at conj(z), ends conjugated
    if SEGMENTED:
        hr, hi = _segment_starts(ends_ptr, z_ptr, step_ptr, pid_g, B, D, N, n_seg, d, dmask, BD, SB, NP, HAS_Z, sign)
    elif HAS_Z:
        hr, hi = _gather_states(z_ptr, row, row < B, D, N, d, dmask, NP)
        hi = sign * hi
    else:
        hr = tl.zeros((BD, SB, NP), tl.float32)
        hi = tl.zeros((BD, SB, NP), tl.float32)
    rr, ri = _load_step3(step_ptr, STEP_AR, d, dmask, NP)
    fr = tl.zeros((BD, SB, NP), tl.float32)
    fi = tl.zeros((BD, SB, NP), tl.float32)
    x_next = _load_block(x_ptr, row, seg, 0, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, False)
    for blk in range(0, seg_blocks):
        if PREFETCH:            # issue the next block's load now, so it flies while this one computes
            x = x_next
            x_next = _load_block(x_ptr, row, seg, blk + 1, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, False)
        else:
            x = _load_block(x_ptr, row, seg, blk, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, False)
        at_last = blk == last_blk          # keep q^r H of the last block's start state
        fr, fi = tl.where(at_last, rr * hr - ri * hi, fr), tl.where(at_last, rr * hi + ri * hr, fi)
        hr, hi = _scan_block(x, y_ptr, blk, row, seg, hr, hi, toeplitz, u, v, ar, ai, omega, B, L, D, d, dmask,
                             C, BD, NP, SB, seg_blocks * C, REVERSE, PRECISION)
    # the final state q^r H + sum_j x_j beta q^(r-1-j) (r = last_len tokens in the last block): the
    # block moved C - r places right, times U. After the loops, so that they hold no registers for it.
    offs, mask = _block_offsets(row, seg, last_blk, B, L, D, d, dmask, C, seg_blocks * C, REVERSE, False,
                                last_len - C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ur, ui = _pairs_to_complex(_dot(x, u, PRECISION), BD, SB, NP)
    _store_states(h_last_ptr, row, (row < B) & (seg == last_seg), fr + ur, sign * (fi + ui), D, N, d, dmask, NP)

# %% [markdown]
# ### 1.7 The backward, on paper
#
# Write $g_t = \partial L / \partial y_t$ and $\hat g = \partial L/\partial \mathrm{Re}\,h_{L-1} +
# i\,\partial L/\partial \mathrm{Im}\,h_{L-1}$ for the gradient arriving at the final state; for a
# complex parameter $z$ the gradient is $\partial L/\partial \mathrm{Re} z + i\,\partial L/\partial
# \mathrm{Im} z$ (PyTorch's convention; inside the op every complex tensor is a real pair, so the
# kernels never meet PyTorch's complex autograd).
#
# **The input gradient is the same scan, backwards in time.** The adjoint of the state,
# $\lambda_t = \partial L/\partial h_t$, obeys $\lambda_t = \bar q\, \lambda_{t+1} + \bar\gamma g_t$
# with $\lambda_{L-1} = \bar\gamma g_{L-1} + \hat g$, and $\partial L/\partial x_t = p\,\mathrm{Re}
# \sum_n \lambda_{t,n} + \omega g_t$. Its conjugate $\mu = \bar\lambda$ runs
# $\mu_t = q\,\mu_{t+1} + \gamma g_t$: CEMA in reversed time with input coefficient $\gamma$ and
# output coefficient $p$. Kernel 2 runs it with `REVERSE` (it reads the row from the end) and
# carries $q\mu$, which starts at $\bar{\hat g}$ and ends at
# $q\mu_0 = \overline{\partial L/\partial h_0}$.
#
# **The parameter gradients only need forward quantities.** Split the state as
# $h_t = p\, v_t + q^{t+1} h_0$ with the unit-input state $v_t = \sum_{s \le t} q^{t-s} x_s$. With
#
# $$K_1 = \sum_t g_t v_t,\quad K_2 = \sum_t g_t \frac{\partial v_t}{\partial q},\quad
#   K_z = \sum_t g_t\, q^{t+1} h_0,\quad K_z' = \sum_t g_t\, \frac{\partial (q^{t+1} h_0)}{\partial q}$$
#
# (summed over the batch too; $v$ and $q^t$ are holomorphic in $q$, so the derivatives are the
# complex ones), differentiating $y$ and $h_{L-1} = p\,v_{L-1} + q^L h_0$ gives
#
# $$\nabla_\gamma = \overline{p K_1 + K_z}, \qquad
#   \nabla_p = \mathrm{Re}(\gamma K_1) + \mathrm{Re}(\bar{\hat g}\, v_{L-1}), \qquad
#   \nabla_\omega = \sum_t g_t x_t,$$
# $$\nabla_q = \overline{\gamma\,(p K_2 + K_z')} + \hat g\; \overline{p\, \partial_q v_{L-1} + L q^{L-1} h_0}.$$
#
# (This is the gradient of the convolution kernel $k[t] = \mathrm{Re}\,p\gamma q^t$ written out:
# $K_1 = \sum_l q^l R[l]$ and $K_2 = \sum_l l q^{l-1} R[l]$ with the cross-correlation
# $R[l] = \sum_t x_{t-l} g_t$.) The adjoint never appears, so one pass forward in time over $x$
# and $g$ computes them all: kernel 3.
#
# **Blocked.** Pairs $(x_s, g_t)$ inside one block contribute through $R[l]$ for $l < C$: the
# anti-diagonal sums of the $C \times C$ correlation $X_f^\top G$ accumulated over all blocks and
# streams (a tensor-core product; $X_f$ is the block read last-first). Pairs across blocks go
# through the block-start state: with $Q[i] = q^i$, $g_q = \sum_i g_i q^i$ and the second-order
# state $\mathcal V = q\,\partial v/\partial q$ carried next to $v$,
#
# $$K_1 \mathrel{+}= q\, g_q\, v_m,\qquad K_2 \mathrel{+}= \Big(\sum_i (i{+}1) g_i q^i\Big) v_m + g_q \mathcal V_m,
# \qquad v_{m+1} = A v_m + X_f Q,\qquad \mathcal V_{m+1} = A \mathcal V_m + C A v_m + (j X_f) Q,$$
#
# where $(j X_f)$ scales the flipped block's $j$-th token by $j$. Carrying $q\,\partial v/\partial q$
# instead of $\partial v/\partial q$ is what lets a single table $Q$ serve all four products.
# Each check of a term against autograd of the float64 reference is in `tests/test_ops_cema.py`.

# %% tags=["export:ops.cema"]
@triton.jit
def _grad_segment_starts(ends_ptr, ends_dq_ptr, z_ptr, step_ptr, pid_g, B, D, N, n_seg, seg_len, d, dmask,
                         BD: tl.constexpr, SB: tl.constexpr, NP: tl.constexpr, HAS_Z: tl.constexpr):
    """For kernel 3, at each stream's segment start: the unit-input state v from a zero row start
    and V = q dv/dq, from kernel 1's segment ends e and E = q de/dq:
        v <- P v + e,   V <- P V + S P v + E      (P = q^S, q dP/dq = S P);
    with HAS_Z also z's free decay w = q^t z and W = q dw/dq. Eight (BD, SB, NP) tensors."""
    pr, pi = _load_step(step_ptr, STEP_P, d, dmask, NP)
    spr, spi = seg_len * pr, seg_len * pi
    n = tl.arange(0, NP)
    offs = d[:, None] * (N * 2) + n[None, :] * 2
    in_range = dmask[:, None] & (n[None, :] < N)
    zeros = tl.zeros((BD, NP), tl.int32)
    zero = tl.zeros((BD, NP), tl.float32)
    first = pid_g * SB
    slot = tl.arange(0, SB)[None, :, None]
    vr, vi, dvr, dvi, wr, wi, dwr, dwi = zero, zero, zero, zero, zero, zero, zero, zero
    o_vr = tl.zeros((BD, SB, NP), tl.float32)
    o_vi, o_dvr, o_dvi, o_wr, o_wi, o_dwr, o_dwi = o_vr, o_vr, o_vr, o_vr, o_vr, o_vr, o_vr
    for stream in range(first // n_seg * n_seg, first + SB):
        row = stream // n_seg
        mask = in_range & (zeros + row < B)
        new_row = stream == row * n_seg
        vr, vi = tl.where(new_row, zero, vr), tl.where(new_row, zero, vi)
        dvr, dvi = tl.where(new_row, zero, dvr), tl.where(new_row, zero, dvi)
        here = slot == stream - first
        o_vr, o_vi = tl.where(here, vr[:, None, :], o_vr), tl.where(here, vi[:, None, :], o_vi)
        o_dvr, o_dvi = tl.where(here, dvr[:, None, :], o_dvr), tl.where(here, dvi[:, None, :], o_dvi)
        base = stream * D * N * 2 + offs
        er, ei = tl.load(ends_ptr + base, mask=mask, other=0.0), tl.load(ends_ptr + base + 1, mask=mask, other=0.0)
        fr, fi = tl.load(ends_dq_ptr + base, mask=mask, other=0.0), tl.load(ends_dq_ptr + base + 1, mask=mask, other=0.0)
        vr, vi, dvr, dvi = _cstep(pr, pi, spr, spi, vr, vi, dvr, dvi, er, ei, fr, fi)
        if HAS_Z:
            zr = tl.load(z_ptr + row * D * N * 2 + offs, mask=mask, other=0.0)
            zi = tl.load(z_ptr + row * D * N * 2 + offs + 1, mask=mask, other=0.0)
            wr, wi = tl.where(new_row, zr, wr), tl.where(new_row, zi, wi)
            dwr, dwi = tl.where(new_row, zero, dwr), tl.where(new_row, zero, dwi)
            o_wr, o_wi = tl.where(here, wr[:, None, :], o_wr), tl.where(here, wi[:, None, :], o_wi)
            o_dwr, o_dwi = tl.where(here, dwr[:, None, :], o_dwr), tl.where(here, dwi[:, None, :], o_dwi)
            wr, wi, dwr, dwi = _cstep(pr, pi, spr, spi, wr, wi, dwr, dwi, zero, zero, zero, zero)
    return o_vr, o_vi, o_dvr, o_dvi, o_wr, o_wi, o_dwr, o_dwi

# %% tags=["export:ops.cema"]
@triton.jit
def _grad_block(x, g, powers, ar, ai, qr, qi, corr,
                vr, vi, dvr, dvi, wr, wi, dwr, dwi, k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi,
                C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, SB: tl.constexpr,
                HAS_Z: tl.constexpr, PRECISION: tl.constexpr):
    """One block of every stream for kernel 3 (x read last token first): the products, then the
    states one block on."""
    x, g = x.to(tl.float32), g.to(tl.float32)
    j = tl.arange(0, C).to(tl.float32)[None, None, :]
    corr += _dot(tl.permute(x, (0, 2, 1)), g, PRECISION)          # corr[j', i] = sum over streams x_(C-1-j') g_i
    gr, gi = _pairs_to_complex(_dot(g, powers, PRECISION), BD, SB, NP)                 # gq = sum_i g_i q^i
    hr, hi = _pairs_to_complex(_dot(g * (j + 1.0), powers, PRECISION), BD, SB, NP)     # sum_i (i+1) g_i q^i
    sr, si = _cmul(qr, qi, gr, gi)                                                     # sum_i g_i q^(i+1)
    zero = tl.zeros((BD, SB, NP), tl.float32)
    t1r, t1i = _cmul(sr, si, vr, vi)
    k1r, k1i = k1r + tl.sum(t1r, 1), k1i + tl.sum(t1i, 1)
    t1r, t1i, t2r, t2i = _cstep(gr, gi, hr, hi, vr, vi, dvr, dvi, zero, zero, zero, zero)
    k2r, k2i = k2r + tl.sum(t2r, 1), k2i + tl.sum(t2i, 1)                             # gq V + ((i+1) G) Q v
    if HAS_Z:
        t1r, t1i = _cmul(sr, si, wr, wi)
        kzr, kzi = kzr + tl.sum(t1r, 1), kzi + tl.sum(t1i, 1)
        t1r, t1i, t2r, t2i = _cstep(gr, gi, hr, hi, wr, wi, dwr, dwi, zero, zero, zero, zero)
        kdr, kdi = kdr + tl.sum(t2r, 1), kdi + tl.sum(t2i, 1)
        wr, wi, dwr, dwi = _cstep(ar, ai, C * ar, C * ai, wr, wi, dwr, dwi, zero, zero, zero, zero)
    ur, ui = _pairs_to_complex(_dot(x, powers, PRECISION), BD, SB, NP)
    dur, dui = _pairs_to_complex(_dot(x * j, powers, PRECISION), BD, SB, NP)
    vr, vi, dvr, dvi = _cstep(ar, ai, C * ar, C * ai, vr, vi, dvr, dvi, ur, ui, dur, dui)
    return corr, vr, vi, dvr, dvi, wr, wi, dwr, dwi, k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi

# %% tags=["export:ops.cema"]
@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _cema_grad_sums_kernel(
    x_ptr, g_ptr, powers_ptr, step_ptr, ends_ptr, ends_dq_ptr, z_ptr, lag_sums_ptr, sums_ptr, v_last_ptr,
    B, L, D, N, n_seg, seg_blocks, last_seg, last_blk, last_len,
    C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, SB: tl.constexpr,
    HAS_Z: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Kernel 3, forward in time over x and g = dL/dy. Per program (summed later in PyTorch):
    lag_sums[l] = sum of x_(t-l) g_t over pairs inside a block (anti-diagonals of X_f^T G), and the
    cross-block parts of K1 = sum g v, K2 = sum g dv/dq, Kz = sum g w, Kz' = sum g dw/dq (v: the
    unit-input state; w = q^(t+1) z); and each row's final v and dv/dq. Per block, with
    Q[i] = q^i, gq = G Q, and the block-start states v, V = q dv/dq:
        K1 += q gq v,   K2 += ((i+1) G) Q v + gq V,   v <- A v + X_f Q,   V <- A V + C A v + (j X_f) Q."""
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    dmask = d < D
    stream = pid_g * SB + tl.arange(0, SB)
    row = stream // n_seg
    seg = stream - row * n_seg
    powers = _operand(_load_map(powers_ptr, d, dmask, 0, C, NP, C * 2 * NP), PRECISION)
    ar, ai = _load_step3(step_ptr, STEP_A, d, dmask, NP)
    qr, qi = _load_step3(step_ptr, STEP_Q, d, dmask, NP)
    zero3 = tl.zeros((BD, SB, NP), tl.float32)
    if SEGMENTED:
        vr, vi, dvr, dvi, wr, wi, dwr, dwi = _grad_segment_starts(
            ends_ptr, ends_dq_ptr, z_ptr, step_ptr, pid_g, B, D, N, n_seg, seg_blocks * C, d, dmask, BD, SB, NP, HAS_Z)
    else:
        vr, vi, dvr, dvi, wr, wi, dwr, dwi = zero3, zero3, zero3, zero3, zero3, zero3, zero3, zero3
        if HAS_Z:
            wr, wi = _gather_states(z_ptr, row, row < B, D, N, d, dmask, NP)
    zero2 = tl.zeros((BD, NP), tl.float32)
    k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi = zero2, zero2, zero2, zero2, zero2, zero2, zero2, zero2
    corr = tl.zeros((BD, C, C), tl.float32)
    rr, ri = _load_step3(step_ptr, STEP_AR, d, dmask, NP)
    r1r, r1i = _load_step3(step_ptr, STEP_AR1, d, dmask, NP)
    fr, fi, f2r, f2i = zero3, zero3, zero3, zero3
    x_next = _load_block(x_ptr, row, seg, 0, B, L, D, d, dmask, C, seg_blocks * C, False, True)
    g_next = _load_block(g_ptr, row, seg, 0, B, L, D, d, dmask, C, seg_blocks * C, False, False)
    for blk in range(0, seg_blocks):
        if PREFETCH:
            x, g = x_next, g_next
            x_next = _load_block(x_ptr, row, seg, blk + 1, B, L, D, d, dmask, C, seg_blocks * C, False, True)
            g_next = _load_block(g_ptr, row, seg, blk + 1, B, L, D, d, dmask, C, seg_blocks * C, False, False)
        else:
            x = _load_block(x_ptr, row, seg, blk, B, L, D, d, dmask, C, seg_blocks * C, False, True)
            g = _load_block(g_ptr, row, seg, blk, B, L, D, d, dmask, C, seg_blocks * C, False, False)
        at_last = blk == last_blk   # keep q^r v and q^(r-1) (V + r v) of the last block's start states
        fr, fi = tl.where(at_last, rr * vr - ri * vi, fr), tl.where(at_last, rr * vi + ri * vr, fi)
        t1r, t1i = dvr + last_len * vr, dvi + last_len * vi
        f2r, f2i = tl.where(at_last, r1r * t1r - r1i * t1i, f2r), tl.where(at_last, r1r * t1i + r1i * t1r, f2i)
        corr, vr, vi, dvr, dvi, wr, wi, dwr, dwi, k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi = _grad_block(
            x, g, powers, ar, ai, qr, qi, corr, vr, vi, dvr, dvi, wr, wi, dwr, dwi,
            k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi, C, BD, NP, SB, HAS_Z, PRECISION)
    # each row's final v and dv/dq (r = last_len tokens in the last block):
    # v_end = q^r v + sum_k x_(r-1-k) q^k,  dv_end/dq = q^(r-1) (V + r v) + sum_k (k+1) x_(r-2-k) q^k
    # (the block read last-first and moved so that its last real token comes first, times Q)
    j = tl.arange(0, C).to(tl.float32)[None, None, :]
    offs, mask = _block_offsets(row, seg, last_blk, B, L, D, d, dmask, C, seg_blocks * C, False, True,
                                last_len - C)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ur, ui = _pairs_to_complex(_dot(x, powers, PRECISION), BD, SB, NP)
    offs, mask = _block_offsets(row, seg, last_blk, B, L, D, d, dmask, C, seg_blocks * C, False, True,
                                last_len - C - 1)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dur, dui = _pairs_to_complex(_dot(x * (j + 1.0), powers, PRECISION), BD, SB, NP)
    last = (row < B) & (seg == last_seg)
    _store_states(v_last_ptr, row, last, fr + ur, fi + ui, D, N, d, dmask, NP)
    _store_states(v_last_ptr + B * D * N * 2, row, last, f2r + dur, f2i + dui, D, N, d, dmask, NP)
    # the lag of corr[j', i] is i + j' - (C-1): sum its anti-diagonals
    cj = tl.arange(0, C)
    lag = cj[None, None, :] + cj[None, :, None] - (C - 1)
    lag_sums = tl.zeros((BD, C), tl.float32)
    for l in tl.static_range(C):
        total = tl.sum(tl.sum(tl.where(lag == l, corr, 0.0), 2), 1)
        lag_sums = tl.where(cj[None, :] == l, total[:, None], lag_sums)
    base = pid_g.to(tl.int64) * D + d
    tl.store(lag_sums_ptr + base[:, None] * C + cj[None, :], lag_sums, mask=dmask[:, None])
    n = tl.arange(0, NP)
    offs = base[:, None] * (4 * NP * 2) + n[None, :] * 2
    _store_pair(sums_ptr + offs, k1r, k1i, dmask[:, None])
    _store_pair(sums_ptr + offs + NP * 2, k2r, k2i, dmask[:, None])
    _store_pair(sums_ptr + offs + 2 * NP * 2, kzr, kzi, dmask[:, None])
    _store_pair(sums_ptr + offs + 3 * NP * 2, kdr, kdi, dmask[:, None])

# %% [markdown]
# **Kernel 4** adds the programs' partial sums and applies the formulas above, per channel and
# state (its work is $D \times N$, but in PyTorch it was another thirty launches).

# %% tags=["export:ops.cema"]
@triton.jit
def _cema_grad_finish_kernel(lag_sums_ptr, sums_ptr, v_last_ptr, dh_last_ptr, z_ptr, powers_ptr, step_ptr, p_ptr,
                             gamma_ptr, dp_ptr, dq_ptr, dgamma_ptr, domega_ptr, D, N, B, G, length,
                             C: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, HAS_Z: tl.constexpr):
    """Kernel 4: the parameter gradients from kernel 3's per-program sums (§1.6), per channel and state:
    K1 = sum_l R[l] q^l + cross, K2 = sum_l R[l] l q^(l-1) + cross (R: the lag sums), then
    dgamma = conj(p K1 + Kz), dp = Re(gamma K1) + sum_b Re(conj(g_b) v_b),
    dq = conj(gamma (p K2 + Kz')) + sum_b g_b conj(p v'_b + L q^(L-1) z_b), domega = R[0]."""
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    n = tl.arange(0, NP)
    l = tl.arange(0, C)
    dmask = d < D
    live = dmask[:, None] & (n < N)[None, :]
    lags = tl.zeros((BD, C), tl.float32)
    zero = tl.zeros((BD, NP), tl.float32)
    k1r, k1i, k2r, k2i, kzr, kzi, kdr, kdi = zero, zero, zero, zero, zero, zero, zero, zero
    for g in range(0, G):
        lags += tl.load(lag_sums_ptr + (g * D + d[:, None]) * C + l[None, :], mask=dmask[:, None], other=0.0)
        at = ((g * D + d[:, None]) * 4 * NP + n[None, :]) * 2                   # sums[g, d, k, n]
        k1r += tl.load(sums_ptr + at, mask=live, other=0.0)
        k1i += tl.load(sums_ptr + at + 1, mask=live, other=0.0)
        k2r += tl.load(sums_ptr + at + 2 * NP, mask=live, other=0.0)
        k2i += tl.load(sums_ptr + at + 2 * NP + 1, mask=live, other=0.0)
        kzr += tl.load(sums_ptr + at + 4 * NP, mask=live, other=0.0)
        kzi += tl.load(sums_ptr + at + 4 * NP + 1, mask=live, other=0.0)
        kdr += tl.load(sums_ptr + at + 6 * NP, mask=live, other=0.0)
        kdi += tl.load(sums_ptr + at + 6 * NP + 1, mask=live, other=0.0)
    l3 = l[None, :, None]
    pat = ((d[:, None, None] * C + l3) * NP + n[None, None, :]) * 2                # powers[d, l, n]
    m3 = dmask[:, None, None] & (n < N)[None, None, :]
    qr, qi = tl.load(powers_ptr + pat, mask=m3, other=0.0), tl.load(powers_ptr + pat + 1, mask=m3, other=0.0)
    k1r += tl.sum(lags[:, :, None] * qr, 1)
    k1i += tl.sum(lags[:, :, None] * qi, 1)
    before = m3 & (l3 >= 1)                                                      # l q^(l-1)
    qr = tl.load(powers_ptr + pat - NP * 2, mask=before, other=0.0)
    qi = tl.load(powers_ptr + pat - NP * 2 + 1, mask=before, other=0.0)
    k2r += tl.sum(lags[:, :, None] * l3 * qr, 1)
    k2i += tl.sum(lags[:, :, None] * l3 * qi, 1)
    dn = d[:, None] * N + n[None, :]
    p = tl.load(p_ptr + dn, mask=live, other=0.0)
    gr, gi = tl.load(gamma_ptr + 2 * dn, mask=live, other=0.0), tl.load(gamma_ptr + 2 * dn + 1, mask=live, other=0.0)
    tl.store(dgamma_ptr + 2 * dn, p * k1r + kzr, mask=live)
    tl.store(dgamma_ptr + 2 * dn + 1, -(p * k1i + kzi), mask=live)
    dp = gr * k1r - gi * k1i
    wr, wi = p * k2r + kdr, p * k2i + kdi
    dqr, dqi = gr * wr - gi * wi, -(gr * wi + gi * wr)
    rows = ((d[:, None] * STEP_ROWS + STEP_QL1) * NP + n[None, :]) * 2
    lr, li = length * tl.load(step_ptr + rows, mask=live, other=0.0), length * tl.load(step_ptr + rows + 1, mask=live, other=0.0)
    for b in range(0, B):
        row = (b * D * N + dn) * 2
        er, ei = tl.load(dh_last_ptr + row, mask=live, other=0.0), tl.load(dh_last_ptr + row + 1, mask=live, other=0.0)
        vr, vi = tl.load(v_last_ptr + row, mask=live, other=0.0), tl.load(v_last_ptr + row + 1, mask=live, other=0.0)
        ur = p * tl.load(v_last_ptr + B * D * N * 2 + row, mask=live, other=0.0)       # d h_last / dq
        ui = p * tl.load(v_last_ptr + B * D * N * 2 + row + 1, mask=live, other=0.0)
        if HAS_Z:
            zr, zi = tl.load(z_ptr + row, mask=live, other=0.0), tl.load(z_ptr + row + 1, mask=live, other=0.0)
            ur, ui = ur + lr * zr - li * zi, ui + lr * zi + li * zr
        dp += er * vr + ei * vi
        dqr, dqi = dqr + er * ur + ei * ui, dqi + ei * ur - er * ui
    tl.store(dp_ptr + dn, dp, mask=live)
    tl.store(dq_ptr + 2 * dn, dqr, mask=live)
    tl.store(dq_ptr + 2 * dn + 1, dqi, mask=live)
    tl.store(domega_ptr + d, tl.sum(tl.where(l[None, :] == 0, lags, 0.0), 1), mask=dmask)

# %% [markdown]
# ### 1.8 Launchers, autograd and the custom op
#
# The launchers allocate outputs (filled with NaN under `poisoned_outputs()`, so a test sees any
# element a kernel forgot to write) and launch; the forward and backward functions put the pieces
# together: forward, one table launch and kernels 1 and 2; backward, one table launch, kernels 1
# and 2 backwards in time for the input, kernels 3 and 4 for the parameters.

# %% tags=["export:ops.cema"]
def _new(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """An output buffer: uninitialised, or NaN-filled under poisoned_outputs()."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _last_block(length: int, chunk: int, seg_len: int) -> tuple[int, int, int]:
    """(segment, block inside it, its token count r) of the block holding the last token."""
    last_seg = (length - 1) // seg_len
    last_blk = (length - 1 - last_seg * seg_len) // chunk
    return last_seg, last_blk, length - last_seg * seg_len - last_blk * chunk


def launch_segment_ends(x: Tensor, tables: CemaTables, plan: Segments, cfg: CemaKernelConfig, *, reverse: bool,
                        deriv: bool, precision: str) -> tuple[Tensor, Tensor | None]:
    """Kernel 1: end states (B*n_seg, D, N, 2) of every segment, and their q-derivatives if deriv."""
    (batch, length, d_model), chunk = x.shape, tables.chunk
    assert x.is_contiguous() and plan.seg_len % chunk == 0, (x.stride(), plan, chunk)
    ends = _new((batch * plan.n_seg, d_model, tables.n_states, 2), x)
    ends_dq = _new(tuple(ends.shape), x) if deriv else ends
    _cema_segment_end_kernel[(triton.cdiv(d_model, cfg.block_d), plan.groups)](
        x, tables.powers, tables.step, ends, ends_dq, batch, length, d_model, tables.n_states, plan.n_seg,
        plan.seg_len // chunk, C=chunk, BD=cfg.block_d, NP=tables.n_pad, SB=cfg.streams, REVERSE=reverse,
        DERIV=deriv, PRECISION=precision, PREFETCH=cfg.prefetch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return ends, (ends_dq if deriv else None)


def launch_scan(x: Tensor, tables: CemaTables, omega: Tensor, z: Tensor | None, ends: Tensor | None,
                plan: Segments, cfg: CemaKernelConfig, *, reverse: bool, precision: str) -> tuple[Tensor, Tensor]:
    """Kernel 2: y (B, L, D) in x's dtype and the final state (B, D, N, 2). reverse: the adjoint
    run (backwards in time; it starts from conj(z) and returns the conjugated final state)."""
    (batch, length, d_model), chunk = x.shape, tables.chunk
    assert x.is_contiguous() and plan.seg_len % chunk == 0 and (ends is None) == (plan.n_seg == 1)
    last_seg, last_blk, last_len = _last_block(length, chunk, plan.seg_len)
    y, h_last = _new(tuple(x.shape), x, x.dtype), _new((batch, d_model, tables.n_states, 2), x)
    _cema_scan_kernel[(triton.cdiv(d_model, cfg.block_d), plan.groups)](
        x, y, tables.kern, tables.u, tables.v, tables.step, omega, h_last if ends is None else ends,
        h_last if z is None else z, h_last, batch, length, d_model, tables.n_states, plan.n_seg,
        plan.seg_len // chunk, last_seg, last_blk, last_len, C=chunk, BD=cfg.block_d, NP=tables.n_pad,
        SB=cfg.streams, REVERSE=reverse, HAS_Z=z is not None, SEGMENTED=ends is not None, PRECISION=precision,
        PREFETCH=cfg.prefetch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y, h_last


def launch_grad_sums(x: Tensor, g: Tensor, tables: CemaTables, z: Tensor | None, ends: Tensor | None,
                     ends_dq: Tensor | None, plan: Segments, cfg: CemaKernelConfig, precision: str):
    """Kernel 3: per-program lag sums (G, D, C) and cross-block sums (G, D, 4, NP, 2), and every
    row's final v and dv/dq (2, B, D, N, 2)."""
    (batch, length, d_model), chunk = x.shape, tables.chunk
    assert x.is_contiguous() and g.is_contiguous() and plan.seg_len % chunk == 0
    last_seg, last_blk, last_len = _last_block(length, chunk, plan.seg_len)
    lag_sums = _new((plan.groups, d_model, chunk), x)
    sums = _new((plan.groups, d_model, 4, tables.n_pad, 2), x)
    v_last = _new((2, batch, d_model, tables.n_states, 2), x)
    _cema_grad_sums_kernel[(triton.cdiv(d_model, cfg.block_d), plan.groups)](
        x, g, tables.powers, tables.step, lag_sums if ends is None else ends, lag_sums if ends_dq is None else ends_dq,
        lag_sums if z is None else z, lag_sums, sums, v_last, batch, length, d_model, tables.n_states, plan.n_seg,
        plan.seg_len // chunk, last_seg, last_blk, last_len, C=chunk, BD=cfg.block_d, NP=tables.n_pad,
        SB=cfg.streams, HAS_Z=z is not None, SEGMENTED=ends is not None, PRECISION=precision,
        PREFETCH=cfg.prefetch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return lag_sums, sums, v_last


def launch_grad_finish(lag_sums: Tensor, sums: Tensor, v_last: Tensor, dh_last: Tensor, z: Tensor | None,
                       tables: CemaTables, p: Tensor, gamma: Tensor, length: int) -> tuple[Tensor, ...]:
    """Kernel 4: dp (D, N), dq and dgamma (D, N, 2), domega (D) from kernel 3's sums."""
    groups, d_model, _ = lag_sums.shape
    dp, dq, dgamma, domega = _new(tuple(p.shape), p), _new(tuple(gamma.shape), p), _new(tuple(gamma.shape), p), \
        _new((d_model,), p)
    _cema_grad_finish_kernel[(triton.cdiv(d_model, 8),)](
        lag_sums, sums, v_last, dh_last, dh_last if z is None else z, tables.powers, tables.step, p, gamma,
        dp, dq, dgamma, domega, d_model, tables.n_states, v_last.shape[1], groups, length,
        C=tables.chunk, BD=8, NP=tables.n_pad, HAS_Z=z is not None)
    return dp, dq, dgamma, domega

# %% tags=["export:ops.cema"]
def _log_q(q: Tensor) -> Tensor:
    """(D, N, 2) float64: log|q| and arg q of the stored complex64 q (pairs in, pairs out)."""
    return torch.view_as_real(torch.log(torch.view_as_complex(q).to(torch.complex128)))


def cema_triton_fwd(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None,
                    save_dq: bool = False, cfg: CemaKernelConfig = DEFAULT_CONFIG
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """y (B, L, D), h_last (B, D, N, 2), and for the backward the segment end states and their
    q-derivatives (None for unsegmented rows or without save_dq). Complex tensors as float32 pairs:
    q, gamma (D, N, 2), h0 (B, D, N, 2) or None; p (D, N) and omega (D,) float32."""
    (batch, length, d_model), plan = x.shape, plan_segments(*x.shape, cfg)
    precision = _dot_precision(x.dtype, cfg)
    tables = build_tables(_log_q(q), q, p, gamma, cfg.chunk, length, plan.seg_len, adjoint=False)
    ends = ends_dq = None
    if plan.n_seg > 1:
        ends, ends_dq = launch_segment_ends(x, tables, plan, cfg, reverse=False, deriv=save_dq, precision=precision)
    y, h_last = launch_scan(x, tables, omega, h0, ends, plan, cfg, reverse=False, precision=precision)
    return y, h_last, ends, ends_dq


def cema_triton_bwd(dy: Tensor, dh_last: Tensor, x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor,
                    h0: Tensor | None, ends: Tensor | None, ends_dq: Tensor | None, params: bool = True,
                    cfg: CemaKernelConfig = DEFAULT_CONFIG) -> tuple[Tensor | None, ...]:
    """dx, dp, dq, dgamma, domega, dh0 (pairs as in cema_triton_fwd; dh0 None without h0, the
    parameter gradients None unless params). §1.6: dx and dh0 from the adjoint scan (kernel 2
    backwards in time, input gamma, output p); the parameters from kernels 3 and 4."""
    (batch, length, d_model), plan = x.shape, plan_segments(*x.shape, cfg)
    precision = _dot_precision(x.dtype, cfg)
    dy, log_q = dy.contiguous(), _log_q(q)
    adjoint = build_tables(log_q, q, p, gamma, cfg.chunk, length, plan.seg_len, adjoint=True)
    rends = None
    if plan.n_seg > 1:
        rends, _ = launch_segment_ends(dy, adjoint, plan, cfg, reverse=True, deriv=False, precision=precision)
    dx, dh0 = launch_scan(dy, adjoint, omega, dh_last, rends, plan, cfg, reverse=True, precision=precision)
    dh0 = dh0 if h0 is not None else None
    if not params:
        return dx, None, None, None, None, dh0
    grad_tables = adjoint if cfg.chunk_grad == cfg.chunk else build_tables(
        log_q, q, p, gamma, cfg.chunk_grad, length, plan.seg_len, adjoint=False)
    lag_sums, sums, v_last = launch_grad_sums(x, dy, grad_tables, h0, ends, ends_dq, plan, cfg, precision)
    dp, dq, dgamma, domega = launch_grad_finish(lag_sums, sums, v_last, dh_last, h0, grad_tables, p, gamma, length)
    return dx, dp, dq, dgamma, domega, dh0

# %% [markdown]
# `torch.compile` cannot trace into a Triton launch (nor, in Inductor, generate code for complex
# tensors), so forward and backward are registered as custom ops, `megalodon_lite::cema_fwd` and
# `megalodon_lite::cema_bwd`, with fake implementations that give output shapes: a compiled model
# treats them as opaque calls and compiles everything around them.

# %% tags=["export:ops.cema"]
_TILE_FIELDS = ("chunk", "chunk_grad", "block_d", "streams", "num_warps", "num_stages", "segment",
                "min_programs", "min_segment_blocks", "prefetch")


def _config_args(cfg: CemaKernelConfig) -> tuple[list[int], str]:
    return [int(getattr(cfg, name)) for name in _TILE_FIELDS], cfg.precision


def _config(tiles: list[int], precision: str) -> CemaKernelConfig:
    fields = dict(zip(_TILE_FIELDS, tiles))
    return CemaKernelConfig(**{**fields, "prefetch": bool(fields["prefetch"])}, precision=precision)


@torch.library.custom_op("megalodon_lite::cema_fwd", mutates_args=())
def cema_fwd_op(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None, save_dq: bool,
                tiles: list[int], precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Opaque forward: (y, h_last, ends, ends_dq); complex tensors as (..., 2) float32 pairs;
    ends/ends_dq empty when the rows are not segmented (or dq is not needed)."""
    with torch.autocast(x.device.type, enabled=False):
        y, h_last, ends, ends_dq = cema_triton_fwd(x, p, q, gamma, omega, h0, save_dq, _config(tiles, precision))

    def or_empty(t: Tensor | None) -> Tensor:   # ops return tensors, and never the same one twice
        return x.new_empty(0, dtype=torch.float32) if t is None else t
    return y, h_last, or_empty(ends), or_empty(ends_dq)


@cema_fwd_op.register_fake
def _(x, p, q, gamma, omega, h0, save_dq, tiles, precision):
    (batch, _, d_model), n_states = x.shape, p.shape[1]
    plan = plan_segments(*x.shape, _config(tiles, precision))
    ends = (batch * plan.n_seg, d_model, n_states, 2) if plan.n_seg > 1 else (0,)
    new = x.new_empty
    return (new(x.shape), new((batch, d_model, n_states, 2), dtype=torch.float32), new(ends, dtype=torch.float32),
            new(ends if save_dq else (0,), dtype=torch.float32))


@torch.library.custom_op("megalodon_lite::cema_bwd", mutates_args=())
def cema_bwd_op(dy: Tensor, dh_last: Tensor, x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor,
                h0: Tensor | None, ends: Tensor, ends_dq: Tensor, params: bool, tiles: list[int],
                precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Opaque backward: (dx, dp, dq, dgamma, domega, dh0); the ones not computed are empty."""
    with torch.autocast(x.device.type, enabled=False):
        grads = cema_triton_bwd(dy, dh_last, x, p, q, gamma, omega, h0, ends if ends.numel() else None,
                                ends_dq if ends_dq.numel() else None, params, _config(tiles, precision))
    return tuple(x.new_empty(0, dtype=torch.float32) if grad is None else grad for grad in grads)


@cema_bwd_op.register_fake
def _(dy, dh_last, x, p, q, gamma, omega, h0, ends, ends_dq, params, tiles, precision):
    def like(t: Tensor, needed: bool = True) -> Tensor:
        return t.new_empty(t.shape if needed else (0,), dtype=torch.float32)
    return (x.new_empty(x.shape), like(p, params), like(q, params), like(gamma, params), like(omega, params),
            like(dh_last, h0 is not None))

# %% tags=["export:ops.cema"]
class CemaTritonFunction(torch.autograd.Function):
    """Autograd glue: the custom ops forward and backward, complex tensors as float32 pairs."""

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None,
                cfg: CemaKernelConfig) -> tuple[Tensor, Tensor]:
        tiles, precision = _config_args(cfg)
        params = any(ctx.needs_input_grad[1:5])
        y, h_last, ends, ends_dq = cema_fwd_op(x, p, q, gamma, omega, h0, params, tiles, precision)
        ctx.save_for_backward(x, p, q, gamma, omega, h0, ends, ends_dq)
        ctx.params, ctx.config = params, (tiles, precision)
        return y, h_last

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor):
        x, p, q, gamma, omega, h0, ends, ends_dq = ctx.saved_tensors
        dx, dp, dq, dgamma, domega, dh0 = cema_bwd_op(dy, dh_last, x, p, q, gamma, omega, h0, ends, ends_dq,
                                                      ctx.params, *ctx.config)
        if not ctx.params:
            dp = dq = dgamma = domega = None
        return dx, dp, dq, dgamma, domega, (dh0 if h0 is not None else None), None


def cema_triton(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None = None, *,
                config: CemaKernelConfig | None = None) -> tuple[Tensor, Tensor]:
    """CEMA by the Triton kernels, the same contract as chapter 04's forms (e.g. cema_chunked).

    Args:
        x: (B, L, D) bfloat16, float16 or float32 (float64 is not the kernels' job: use cema_chunked).
        p: (D, N) float32; q, gamma: (D, N) complex64 (from cema_coefficients); omega: (D,).
        h0: (B, D, N) complex64 initial state, or None for zeros.
        config: tile sizes (default: DEFAULT_CONFIG).

    Returns:
        y (B, L, D) in x's dtype, and the final state h_L (B, D, N) complex64. Differentiable in
        x, p, q, gamma, omega and h0.
    """
    _check_inputs(x, p, q, gamma, omega, h0)
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or p.dtype != torch.float32:
        raise TypeError(f"cema_triton takes bf16/fp16/fp32 x and float32 coefficients, got x {x.dtype}, "
                        f"p {p.dtype}; float64 runs in PyTorch (cema_chunked)")
    if x.device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"cema_triton needs CUDA tensors or the Triton interpreter (TRITON_INTERPRET=1), "
                           f"got x on {x.device}")
    y, h_last = CemaTritonFunction.apply(
        x.contiguous(), p.contiguous(), torch.view_as_real(q.contiguous()), torch.view_as_real(gamma.contiguous()),
        omega.float().contiguous(), None if h0 is None else torch.view_as_real(h0.contiguous()),
        config or DEFAULT_CONFIG)
    return y, torch.view_as_complex(h_last)

# %% [markdown]
# ### 1.9 Spec → kernel → check, under the interpreter
#
# On a CPU the kernels run in the Triton interpreter (`TRITON_INTERPRET=1`, set in the first cell
# when there is no GPU), which executes the same kernel code with NumPy — so the check below tests
# exactly what runs on a GPU, at tiny sizes, against chapter 04's recurrence in float64. In smoke
# mode the tiles shrink too (4 streams, blocks of 16, segments of 32 tokens), so that a few dozen
# tokens already cross blocks, segments, channel tiles and a last short block. Under the
# interpreter `tl.dot` is a float32 matrix product, so the kernels are float32 arithmetic end to
# end: each output is a sum of at most a few hundred terms of size $O(1)$, each rounded to a relative
# $2^{-24}$, and we allow a relative $2 \cdot 10^{-5}$. Every gradient is checked, down to the
# layer's raw parameters through chapter 04's `cema_coefficients`.

# %%
check_config = pick(smoke=CemaKernelConfig(chunk=16, chunk_grad=16, block_d=4, streams=4, segment=32, num_warps=1),
                    full=CemaKernelConfig(segment=256))
B_chk, L_chk, D_chk, N_chk = 2, pick(smoke=75, full=1000), pick(smoke=6, full=40), 4
layer = CEMA(D_chk, N_chk).to(device)
reference = copy.deepcopy(layer).double()
x_chk = torch.randn(B_chk, L_chk, D_chk, device=device)
h0_chk = torch.randn(B_chk, D_chk, N_chk, dtype=torch.complex64, device=device)
dy_chk = torch.randn(B_chk, L_chk, D_chk, device=device)
dh_chk = torch.randn(B_chk, D_chk, N_chk, dtype=torch.complex64, device=device)


def outputs_and_gradients(module, form, x, h0):
    """y, h_last and the gradients of <y, dy> + <h_last, dh> to x, h0 and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    h0 = h0.detach().clone().requires_grad_(True)
    p, q, gamma = module.coefficients()
    y, h_last = form(x, p, q, gamma, module.omega, h0)
    loss = (y * dy_chk.to(y.dtype)).sum() + (torch.view_as_real(h_last) * torch.view_as_real(dh_chk.to(h_last.dtype))).sum()
    names = ["x", "h0", "alpha", "delta", "theta", "gamma", "omega"]
    inputs = [x, h0, module.alpha, module.delta, module.theta, module.gamma, module.omega]
    grads = torch.autograd.grad(loss, inputs)
    out = {"y": y, "h_last": torch.view_as_real(h_last)}
    out.update({f"d{n}": torch.view_as_real(g) if g.is_complex() else g for n, g in zip(names, grads)})
    return out


expected = outputs_and_gradients(reference, cema_recurrence, x_chk.double(), h0_chk.to(torch.complex128))
with poisoned_outputs():       # kernel outputs start as NaN: an element no program wrote shows up
    got = outputs_and_gradients(layer, lambda *a: cema_triton(*a, config=check_config), x_chk, h0_chk)
plan = plan_segments(B_chk, L_chk, D_chk, check_config)
print(f"B={B_chk} L={L_chk} D={D_chk} N={N_chk}: {plan.n_seg} segments of {plan.seg_len} tokens per row, "
      f"blocks of {check_config.chunk}, {plan.groups} stream groups x {math.ceil(D_chk / check_config.block_d)} channel tiles")
for name, want in expected.items():
    err = ((got[name].double() - want).norm() / want.norm()).item()
    print(f"  {name:>7}: relative error {err:.1e}")
    assert torch.isfinite(got[name]).all() and err < 2e-5, name

# %% [markdown]
# The streaming oracle of chapter 04 holds with the kernel: a sequence fed in pieces, each piece
# starting from the state the previous one returned, gives the same outputs as one call.

# %%
with torch.no_grad():
    p, q, gamma = layer.coefficients()
    y_whole, h_whole = cema_triton(x_chk, p, q, gamma, layer.omega, h0_chk, config=check_config)
    cuts = [0, 1, L_chk // 3, L_chk - 5, L_chk]             # a one-token piece, a long one, a short tail
    h, pieces = h0_chk, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        y_piece, h = cema_triton(x_chk[:, a:b], p, q, gamma, layer.omega, h, config=check_config)
        pieces.append(y_piece)
err_stream = (torch.cat(pieces, dim=1) - y_whole).abs().max().item()
print(f"pieces {[b - a for a, b in zip(cuts[:-1], cuts[1:])]}: max |difference| to one call {err_stream:.1e}, "
      f"final states {(h - h_whole).abs().max().item():.1e}")
assert err_stream < 1e-5 and (h - h_whole).abs().max() < 1e-5

# %% [markdown]
# ## Part 2 · TimestepNorm
#
# (TimestepNorm section: floor, block summaries and the Chan/Welford prefix, kernel code in
# export cells tagged `export:ops.timestep_norm`, closed-form backward, check under the
# interpreter.)

# %% [markdown]
# ## Part 3 · Measured on a GPU
#
# `python kernels/bench.py` measures, in one run on one device, the copy bandwidth and the bf16
# matmul rate, then every registered op forward and forward+backward, kernel and plain PyTorch, at
# 65,536 tokens per call ($D = 1024$, $N = 16$, bf16, gradients to the input and the parameters).
# Each row carries its floor. The committed run, and its figure (`kernels/plot.py`: time over
# floor per op, path and shape; the dotted line is the 2× target):

# %%
def show_results(results: dict) -> None:
    """The results table: time and multiple of the floor, forward and forward+backward."""
    print(f"{results['device']}  ({results['date']}, torch {results['torch']}, triton {results['triton']})")
    print(f"{'op':>14} {'path':>6} {'B x L':>12} {'fwd ms':>9} {'x floor':>8} {'fwd+bwd ms':>11} {'x floor':>8}")
    for row in results["rows"]:
        print(f"{row['op']:>14} {row['path']:>6} {row['B']:>4} x {row['L']:<6} {row['fwd_ms']:9.3f} "
              f"{row['fwd_ms'] / row['floor_fwd_ms']:8.2f} {row['fwdbwd_ms']:11.3f} "
              f"{row['fwdbwd_ms'] / row['floor_fwdbwd_ms']:8.2f}")
    for op in sorted({row["op"] for row in results["rows"]}):
        kernel = [r for r in results["rows"] if r["op"] == op and r["path"] == "triton"]
        torch_rows = {(r["B"], r["L"]): r for r in results["rows"] if r["op"] == op and r["path"] == "torch"}
        if not kernel:
            continue
        worst = max(r["fwdbwd_ms"] / r["floor_fwdbwd_ms"] for r in kernel)
        speedup = min(torch_rows[(r["B"], r["L"])]["fwdbwd_ms"] / r["fwdbwd_ms"] for r in kernel
                      if (r["B"], r["L"]) in torch_rows)
        verdict = "met" if worst <= 2 else f"missed by {worst / 2:.2f}x"
        print(f"{op}: forward+backward at worst {worst:.2f}x the floor (target 2x: {verdict}); "
              f"at least {speedup:.0f}x faster than the PyTorch path")


show_results(measured)
figure_path = ROOT / "figures" / "08_scan_kernels.png"
fig, ax = plt.subplots(figsize=(12, 4.6))
ax.imshow(plt.imread(figure_path))
ax.axis("off")
plt.show()

# %% [markdown]
# The target is missed. Where the time goes is in the profile committed next to the results
# (`kernels/results/cema_profile_h200.txt`, torch.profiler around forward+backward at 1 × 64K);
# its kernel rows:

# %%
for line in (ROOT / "kernels" / "results" / "cema_profile_h200.txt").read_text().splitlines():
    if " wall " in line:                      # e.g. "1 x 65536: wall ... ms per forward+backward"
        print(line.strip())
    elif line.strip().startswith("_cema_"):   # name, ..., CUDA total, CUDA time per call, calls
        name, *_, total, per_call, calls = line.split()
        print(f"    {name:28s} {per_call:>10} per call ({calls} calls in the 5 profiled steps)")

# %% [markdown]
# Each kernel runs several times slower than the bytes it moves would allow. They are bound by
# the latency of one step of their loop, not by bandwidth or arithmetic: a program walks its
# blocks one after the other, and each step is a dependent chain — the block's load (issued one
# step early since the second tuning session), a layout conversion through shared memory into the
# tensor cores' operand layout, three small $16\times16\times16$ products per channel, a
# shared-memory round trip for the store, the state update — while only a few programs fit on an
# SM at the register counts these need. Prefetching the next block and halving $C$ to 16 (a
# smaller Toeplitz product: $C + 4N$ multiply-adds per token) took the kernels from about 18× to
# about 12.5× the floor (`kernels/NOTES_cema.md` has every version and what it predicted). What
# the measurements point to next is more independent work per SM — a persistent kernel whose warps
# own different channels and streams, with the blocks of $x$ double-buffered in shared memory —
# rather than a different algorithm: the algebra above already moves each byte of $x$ and $y$ only
# a few times.

# %% [markdown]
# ## Summary
#
# * **CEMA** (`megalodon_lite.ops.cema`, exported from Part 1): `cema_triton(x, p, q, gamma, omega, h0)`
#   has the contract of chapter 04's forms — bf16/fp16/fp32 input, float32 state and
#   accumulation, initial state in, final state out, gradients to the input, the initial state and
#   every parameter — so a module can dispatch to it through `megalodon_lite.backend`; float64 stays
#   with `cema_chunked`. Inside, a block of $C$ tokens is a Toeplitz product and the state crosses
#   blocks in registers; 16 independent streams (rows or segments of a row) step in lockstep so that
#   every product is a tensor-core `tl.dot` batched over channels; a first pass of segment end
#   states makes one long row as parallel as a batch. The backward is the same scan backwards in
#   time for the input, and one forward pass of sums for the parameters, whose gradients only need
#   forward quantities (the state and its derivative in $q$).
# * Forward and backward are `torch.library` custom ops, opaque to `torch.compile`.
# * The checks above ran the kernels under the Triton interpreter against chapter 04's float64
#   recurrence; `tests/test_ops_cema.py` covers the shapes grid, and on a GPU bf16 and fp32 at the
#   benchmark shapes and a million-token sequence (`kernels/results/cema_gpu_tests_h200.txt`).

# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# They re-run the benchmark for this chapter's ops on the GPU at hand (into a temporary folder;
# the committed results stay as they are) and draw its figure.

# %% tags=["gpu"]
cuda = require_cuda()
import subprocess
import sys
import tempfile

env = {**os.environ, "PYTHONPATH": str(ROOT)}
listed = subprocess.run([sys.executable, "kernels/bench.py", "--list"], cwd=ROOT, env=env, check=True,
                        capture_output=True, text=True).stdout.split()
chapter_ops = [op for op in ("cema", "timestep_norm") if op in listed]
fresh = Path(tempfile.mkdtemp())
subprocess.run([sys.executable, "kernels/bench.py", "--ops", *chapter_ops, "--out", str(fresh)], cwd=ROOT, env=env,
               check=True)
fresh_json = next(fresh.glob("*.json"))
show_results(json.loads(fresh_json.read_text()))

# %% tags=["gpu"]
sys.path.insert(0, str(ROOT))
from kernels.plot import plot_results  # noqa: E402

fig, ax = plt.subplots(figsize=(12, 4.6))
ax.imshow(plt.imread(plot_results(fresh_json, directory=fresh)))
ax.axis("off")
plt.show()
