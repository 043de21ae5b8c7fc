# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · A Triton kernel for normalized chunk attention
#
# Chapter 06 wrote Megalodon's attention (Megalodon §3.3-3.4) out of PyTorch pieces: per head an
# RMS normalisation of the shared representation $z$, a learned scale and offset for queries and
# keys, rotary positions that restart in every chunk, and causal softmax attention with scale 1
# inside chunks of $c$ tokens. At the official shapes (chunk $c = 2048$, query/key head dim
# $z = 256$, value head dim $v = 2048$, one head) PyTorch's fast attention kernels turn it down:
# FlashAttention needs the value dim to equal the query dim, and `scaled_dot_product_attention`
# falls back to its memory-efficient kernel, which is far from what the hardware can do.
#
# This chapter writes the attention as six Triton kernels, forward and backward, and exports
# them to `megalodon_lite/ops/chunk_attention.py`. The plan:
#
# 1. count the work: the compute floor, and what each way of tiling costs on top of it;
# 2. why FlashAttention's tiling breaks at $v = 2048$, and what replaces it;
# 3. the kernels, each followed by a check of it alone under the Triton interpreter;
# 4. the whole operation against chapter 06 in float64, forward and every gradient;
# 5. what fusing the normalisation and RoPE saves;
# 6. what an H200 measured (committed results; the cells of the last section re-run it).
#
# Without a GPU the kernels run in Triton's interpreter on the CPU (`TRITON_INTERPRET=1`, set in
# the next cell before Triton is imported), at tiny sizes; the interpreter executes the same
# kernel code with NumPy, so every check below is a check of the real kernels.

# %%
import json
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from megalodon_lite.attention import ChunkAttention
from megalodon_lite.notebook import (describe_run, pick, pick_device, recorded_files, require_cuda, save_figure,
                                    seed_everything)

seed_everything(0)
device = pick_device()
describe_run(device)
print(f"Triton interpreter (the kernels run on the CPU): {os.environ.get('TRITON_INTERPRET') == '1'}")

# %% [markdown]
# ## 1. The compute floor, and what each tiling adds to it
#
# Inside one chunk, query $t$ attends to keys $s \le t$: there are $c(c+1)/2$ such pairs. Each
# pair costs a dot product over the $z$ channels for the score $S_{ts} = q_t \cdot k_s$ and a
# multiply-add over the $v$ channels for $O_t \mathrel{+}= P_{ts} V_s$: $2(z + v)$ floating-point
# operations (a multiply and an add per channel). Over a batch of $B$ sequences of $L$ tokens and
# $H$ heads,
#
# $$\text{FLOPs}_\text{fwd} = 2 \cdot B H \frac{L}{c} \cdot \frac{c(c+1)}{2} \cdot (z + v).$$
#
# Divided by the matmul rate of the GPU, that is the **compute floor**: no kernel that does this
# arithmetic in matmuls can be faster. The backward pass needs $dV = P^\top dO$,
# $dP = dO\,V^\top$, $dQ = dS\,K$ and $dK = dS^\top Q$ (with $dS$ below), and the convention for
# attention is forward+backward $= 3.5\times$ the forward floor (exercise 5 says where it comes
# from). The package keeps this floor next to chapter 08's floor of a scan, as
# `megalodon_lite.ops.attention_floor`, and `kernels/bench.py` writes it into every attention row:

# %% tags=["export:ops.attention_floor"]
"""The compute floor of causal attention within chunks (Megalodon §3.3-3.4; chapter 09, section 1).

Inside a chunk of c tokens query t attends to the keys s <= t: c(c + 1)/2 pairs, each costing
2(z + v) FLOPs (a multiply and an add per channel: z for the score q_t . k_s, v for its share of
the output). At the device's matmul rate that is the least time any kernel doing this arithmetic
in matmuls can take; chapter 08's ``megalodon_lite.ops.floors`` holds the device's ``Ceilings``.
"""

from megalodon_lite import validate
from megalodon_lite.ops.floors import Ceilings

BWD_OVER_FWD_ATTENTION = 3.5
"""Forward+backward FLOPs of attention, in forward FLOPs: the convention (FlashAttention's count for
equal query and value head dims, chapter 09 exercise 5)."""


def attention_floor_ms(batch: int, length: int, ceilings: Ceilings, *, heads: int, chunk: int, z_head_dim: int,
                       v_head_dim: int) -> float:
    """Forward compute floor, in milliseconds, of causal attention within chunks of ``chunk`` tokens::

        FLOPs = 2 * B * H * (L / c) * c (c + 1) / 2 * (z + v),    floor = FLOPs / (matmul_TFLOPs * 1e12) seconds

    for B = ``batch`` sequences of L = ``length`` tokens (a multiple of c = ``chunk``), H = ``heads``,
    and per head z = ``z_head_dim`` query/key and v = ``v_head_dim`` value channels.
    Forward+backward: ``BWD_OVER_FWD_ATTENTION`` times this.
    """
    validate.floor_inputs(ceilings, Ceilings, "matmul_TFLOPs", batch=batch, length=length, heads=heads, chunk=chunk,
                          z_head_dim=z_head_dim, v_head_dim=v_head_dim)
    validate.divides("chunk", chunk, "length", length)
    flops = 2 * batch * heads * (length // chunk) * chunk * (chunk + 1) / 2 * (z_head_dim + v_head_dim)
    return flops / (ceilings.matmul_TFLOPs * 1e12) * 1e3

# %% [markdown]
# At the official shapes and the rates an H200 measured in the committed benchmark run (section 6),
# for 65,536 tokens per call; the same formula wrote the floor of every attention row of that run:

# %%
def attention_results(device_slug: str = "nvidia_h200") -> dict | None:
    """The newest committed benchmark run with attention rows (the all-ops file or the attention-only one)."""
    runs = [json.loads(path.read_text())
            for name in (f"{device_slug}.json", f"{device_slug}_attention.json")
            for path in recorded_files(name)]   # the checkout's or the installed copy, if recorded
    runs = [run for run in runs if any(row["op"] == "attention" for row in run["rows"])]
    return max(runs, key=lambda run: run["date"], default=None)


results = attention_results()
MATMUL_TFLOPS = results["matmul_TFLOPs"] if results else 675.0  # 675: the H200's bf16 8192^3 median
HBM_TBPS = results["copy_TBps"] if results else 4.27
ceilings = Ceilings(copy_TBps=HBM_TBPS, matmul_TFLOPs=MATMUL_TFLOPS)
c, z_dim, v_dim, tokens = 2048, 256, 2048, 65_536  # official shapes, one head, 65,536 tokens per call
official_shapes = {"heads": 1, "chunk": c, "z_head_dim": z_dim, "v_head_dim": v_dim}
pairs = tokens // c * c * (c + 1) // 2                 # causal (query, key) pairs over all chunks
fwd_flops = 2 * pairs * (z_dim + v_dim)
floor_fwd_ms = attention_floor_ms(1, tokens, ceilings, **official_shapes)
print(f"{pairs / 1e6:.1f} M causal pairs, {fwd_flops / 1e9:.0f} GFLOP forward; at {MATMUL_TFLOPS:.0f} TFLOP/s "
      f"the floor is {floor_fwd_ms:.3f} ms forward, {BWD_OVER_FWD_ATTENTION * floor_fwd_ms:.2f} ms forward+backward")
attention_rows = [row for row in results["rows"] if row["op"] == "attention"] if results else []
for row in attention_rows:
    floor = attention_floor_ms(row["B"], row["L"], ceilings, **official_shapes)
    assert math.isclose(row["floor_fwd_ms"], floor, rel_tol=1e-12)
    assert math.isclose(row["floor_fwdbwd_ms"], BWD_OVER_FWD_ATTENTION * floor, rel_tol=1e-12)
print(f"the floors of the {len(attention_rows)} attention rows of the committed run: the same")

# %% [markdown]
# Three ways to organise the work (the next section says why each exists), counted at that shape.
# A program that owns a block of queries and a slice of $b_v$ value channels must see the whole
# score row, so every extra slice of the value dim recomputes $QK^\top$:
#
# - **(a) split $v$ into tiles of $b_v$, online softmax in each**: $S$ is computed $v / b_v$ times;
# - **(b) log-sum-exp first, then $P V$ per tile**: one pass over the keys for the row statistics,
#   then each value tile recomputes $S$ once more, but never rescales its accumulator;
# - **(c) write $P$ once per chunk, then a plain matmul $P V$**: $S$ is computed twice (once for
#   the statistics, once to write $P$), and $P$ costs bytes: 2 per causal pair to write, 2 to read.

# %%
def design_cost(name: str, score_passes: float, p_bytes: float) -> tuple[str, float, float]:
    """(name, forward FLOPs in floors, forward milliseconds at least) for a tiling of the forward."""
    flops = 2 * pairs * (score_passes * z_dim + v_dim)
    ms = max(flops / (MATMUL_TFLOPS * 1e12), p_bytes / (HBM_TBPS * 1e12)) * 1e3
    return name, flops / fwd_flops, ms


designs = [design_cost(f"(a) online softmax, v tiles of {bv}", v_dim / bv, 0) for bv in (128, 256)]
designs += [design_cost(f"(b) log-sum-exp first, v tiles of {bv}", v_dim / bv + 1, 0) for bv in (128, 256)]
designs += [design_cost("(c) P written once, then P V", 2, 2 * 2 * pairs)]
for name, floors, ms in designs:
    print(f"{name:<40} {floors:5.2f} x the forward FLOPs, at least {ms:.3f} ms")
p_mb = 2 * c * (c + 1) / 2 / 2**20
print(f"P of one chunk in bfloat16 (causal half): {p_mb:.1f} MiB; over {tokens // c} chunks "
      f"{2 * pairs / 1e6:.0f} MB written and read back: {2 * 2 * pairs / (HBM_TBPS * 1e12) * 1e3:.3f} ms of bandwidth")
assert min(designs, key=lambda d: d[2])[0].startswith("(c)")

# %% [markdown]
# Writing $P$ wins at these shapes because $z \ll v$: recomputing $S$ is cheap only when it is done
# a few times, and $P$ in bfloat16 is 4 MiB per chunk, a few hundredths of a millisecond of
# bandwidth for the whole batch. The backward pass follows the same idea. Written per chunk, with
# $\delta_t = \sum_j dO_{tj} O_{tj}$ (which equals $\sum_s P_{ts} dP_{ts}$),
#
# $$dP = dO\, V^\top, \qquad dS = P \circ (dP - \delta \mathbf{1}^\top), \qquad
#   dV = P^\top dO, \qquad dQ = dS\, K, \qquad dK = dS^\top Q,$$
#
# one kernel recomputes $S$ and $P$ from $Q$, $K$ and the saved log-sum-exp, computes $dP$ (a
# reduction over the $v$ channels, which needs no big accumulator) and writes $P$ and what $dS$ is
# made of (section 3.4); then the same triangular matmul kernel as the forward computes $dV$, $dQ$
# and $dK$. In floors that is
# $2(z + v)$ (recompute $S$, $dP$) $+\, 2v$ ($dV$) $+\, 4z$ ($dQ$, $dK$) per pair: the backward
# does $(6z + 4v)/(2z + 2v)$ of the forward's FLOPs,

# %%
bwd_floors = (3 * z_dim + 2 * v_dim) / (z_dim + v_dim)
fwd_floors = (2 * z_dim + v_dim) / (z_dim + v_dim)
print(f"forward {fwd_floors:.2f} + backward {bwd_floors:.2f} = {fwd_floors + bwd_floors:.2f} forward floors "
      f"of FLOPs, against the 3.5 of the convention")
assert fwd_floors + bwd_floors < 3.5

# %% [markdown]
# ## 2. Why FlashAttention's tiling breaks at $v = 2048$
#
# FlashAttention gives each program a block of $b_m$ query rows and walks over the key blocks,
# keeping the running output $O$ ($b_m \times v$, float32) in registers and rescaling it whenever
# the running row maximum grows. With $b_m = 64$ that accumulator is
# $64 \times 2048 \times 4$ bytes $= 512$ KiB, twice the register file of an H100 or H200 SM
# (65,536 32-bit registers, 256 KiB), before counting $Q$, the scores and the loads in flight.
# A smaller $b_m$ starves the tensor cores (an H100 warp group multiplies 64 rows at a time).
#
# So the value dim must be cut into slices, and each slice's program needs the softmax row
# statistics, which depend on all of $S$. Options (a) and (b) pay for that with recomputation of
# $QK^\top$; option (c) cuts the work differently:
#
# - the **softmax kernel** owns a block of query rows of one chunk: pass 1 over the key blocks
#   computes the row log-sum-exp (only $z = 256$ channels per dot product), pass 2 recomputes the
#   scores and writes $P = \exp(S - \mathrm{lse})$, in the input dtype, block-lower-triangular;
# - the **triangular matmul kernel** computes $O = P V$ per (query block, value tile): an ordinary
#   tiled matmul whose reduction stops at the diagonal, with the $b_m \times b_n$ accumulator of any
#   good GEMM.
#
# The picture: one chunk split in tiles of 128 (16 × 16). Left, the tiles of $P$ the softmax
# kernel writes (upper tiles are never touched; the diagonal tiles hold zeros above the
# diagonal). Right, one program of the matmul: its output tile (a block of query rows times a
# slice of value channels) reads a strip of $P$ up to the diagonal and the matching rows of $V$.

# %%
def draw_tiles() -> plt.Figure:
    n, row, vt = 16, 9, 3  # 2048 / 128 tiles per side; the program drawn: query block 9, value tile 3 of 8
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1, 1]})
    for i in range(n):
        for j in range(i + 1):
            left.add_patch(Rectangle((j, n - 1 - i), 1, 1, facecolor=plt.cm.viridis(i / n), edgecolor="white"))
            reads = i == row
            mid.add_patch(Rectangle((j, n - 1 - i), 1, 1, facecolor="tab:orange" if reads else "0.9", edgecolor="white"))
    for s_block in range(n):  # V: c rows x 8 value tiles of 256 channels (drawn 2 units wide)
        for t in range(8):
            reads = t == vt and s_block <= row
            right.add_patch(Rectangle((2 * t, n - 1 - s_block), 2, 1, facecolor="tab:blue" if reads else "0.9",
                                      edgecolor="white"))
    left.set(title="P: the tiles the softmax kernel writes\n(colour: the program, one per row block)",
             xlabel="key s (c = 2048, tiles of 128)", ylabel="query t")
    mid.set(title="O = P V, one program:\nthe strip of P it reads (orange)", xlabel="key s")
    right.set(title="...and the rows of V it reads (blue):\none value tile of 256 of the 2048 channels",
              xlabel="value channel", ylabel="key s")
    for ax, width in ((left, n), (mid, n), (right, n)):
        ax.set(xlim=(0, width), ylim=(0, n), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


fig = draw_tiles()
save_figure(fig, "09_attention_tiles")
plt.show()

# %% [markdown]
# ## 3. The kernels
#
# Five kernels, in the order a training step runs them:
#
# | kernel | grid | reads | writes |
# |---|---|---|---|
# | `_qk_prologue_kernel` | token blocks × heads | $z$, $\gamma$, $\beta$, cos/sin | $q$, $k$ |
# | `_softmax_kernel` | chunks × query blocks | $q$, $k$ | lse, $P$ |
# | `_tri_matmul_kernel` | chunks·column tiles × row blocks | $P$ (or $T$, $P$, $\delta$), $V$ (or $dO$, $K$, $Q$) | $O$ ($dV$, $dQ$, $dK$) |
# | `_score_grad_kernel` | tiles of the triangle × chunks | $q$, $k$, $V$, $dO$, lse | $P$, $T = P \circ dP$, row sums of $T$ |
# | `_qk_epilogue_kernel` | token blocks × heads | $z$, $\gamma$, $dq$, $dk$ | $dz$, $d\gamma$, $d\beta$ |
#
# The tile sizes are one frozen dataclass, with one set for 16-bit inputs on a GPU (chosen by
# `kernels/tune_attention.py`, see `kernels/NOTES_attention.md`), one for float32 (which needs
# smaller tiles: 4 bytes per element, and three TF32 products per float32 product), and tiny ones
# for the interpreter.

# %% tags=["export:ops.chunk_attention"]
"""Normalized chunk attention (Megalodon §3.3-3.4) as Triton kernels, forward and backward.

Per head: ``z_hat = RMSNorm(z_h)`` (no affine), ``q = z_hat (gamma[0] + 1) / sqrt(dz) + beta[0]``,
``k`` likewise with row 1, RoPE on adjacent channel pairs at position ``t mod c``, then causal
softmax attention with scale 1 inside each chunk of ``c`` tokens. Official code:
https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py

Design (chapter 09): the normalisation, affine and RoPE run in one pass over z (the prologue);
a softmax kernel writes the probabilities P of each chunk (block-lower-triangular, input dtype);
one triangular-matmul kernel then computes O = P V, and in the backward dV = P^T dO, dQ = dS K,
dK = dS^T Q from P and T = P dP (dP = dO V^T) written by a score-gradient kernel, which also sums
delta = rowsum(T) = rowsum(dO O); the z-wide products form dS = T - P delta tile by tile.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon_lite.attention import NORM_EPS, ChunkAttention

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_Z_HEAD_DIM = 256  # the softmax kernel keeps a block of query rows (BLOCK_M x dz) on chip


# %% [markdown]
# The tiles. `tile` is the granularity of the stored triangle of $P$ and $dS$ (section 3.2): the
# largest row or column block of any kernel, so that every kernel's blocks fit inside it.

# %% tags=["export:ops.chunk_attention"]
@dataclass(frozen=True)
class AttentionTiles:
    """Block sizes (powers of two, at least 16), warps and pipeline stages of the kernels.

    ``softmax_*``: query rows x key columns per step of the softmax kernel; ``grad_*``: the tile of
    the score-gradient kernel, with ``grad_v`` value channels per step of its dP = dO V^T reduction
    and ``grad_d`` z channels per step of S = Q K^T; ``mm_*``: the value-wide triangular matmuls
    (O, dV), ``mm_m`` output rows x ``mm_n`` output columns, ``mm_k`` reduction step; ``zmm_*``: the
    same for the z-wide ones (dQ, dK, which load two tiles of A per step: dS = T - P delta);
    ``prologue_tokens``, ``prologue_warps``: tokens and warps per program of the prologue and epilogue.
    """

    prologue_tokens: int = 16
    prologue_warps: int = 2
    softmax_m: int = 128
    softmax_n: int = 64
    softmax_warps: int = 8
    softmax_stages: int = 3
    grad_m: int = 128
    grad_n: int = 128
    grad_v: int = 64
    grad_d: int = 64
    grad_warps: int = 8
    grad_stages: int = 4
    mm_m: int = 128
    mm_n: int = 256
    mm_k: int = 64
    mm_warps: int = 8
    mm_stages: int = 4
    zmm_m: int = 128
    zmm_n: int = 256
    zmm_k: int = 64
    zmm_warps: int = 8
    zmm_stages: int = 3

    @property
    def tile(self) -> int:
        """Granularity of the stored triangle of P and dS: every row/column block size divides it."""
        return max(self.softmax_m, self.softmax_n, self.grad_m, self.grad_n, self.mm_m, self.mm_k, self.zmm_m,
                   self.zmm_k)

    def fitted(self, span: int) -> AttentionTiles:
        """These tiles with no block larger than the chunk (rounded up to a power of two, >= 16)."""
        cap = max(16, triton.next_power_of_2(span))
        names = ("softmax_m", "softmax_n", "grad_m", "grad_n", "mm_m", "mm_k", "zmm_m", "zmm_k")
        return replace(self, **{name: min(getattr(self, name), cap) for name in names})

    def matmul(self, z_wide: bool) -> tuple[int, int, int, int, int]:
        """(rows, columns, reduction step, warps, stages) of the value-wide or the z-wide matmuls."""
        if z_wide:
            return self.zmm_m, self.zmm_n, self.zmm_k, self.zmm_warps, self.zmm_stages
        return self.mm_m, self.mm_n, self.mm_k, self.mm_warps, self.mm_stages


GPU_TILES = AttentionTiles()  # 16-bit inputs on a GPU: the best of kernels/tune_attention.py on an H200
GPU_TILES_FP32 = AttentionTiles(prologue_tokens=8, prologue_warps=4, softmax_m=16, softmax_n=32, softmax_warps=4, grad_m=32, grad_n=32, grad_v=32,
                                grad_d=32, grad_warps=4, grad_stages=2, mm_m=64, mm_n=64, mm_k=32, mm_warps=4,
                                mm_stages=3, zmm_m=64, zmm_n=64, zmm_k=32, zmm_warps=4,
                                zmm_stages=3)  # fits shared memory and registers without spilling
INTERPRETER_TILES = AttentionTiles(prologue_tokens=16, softmax_m=16, softmax_n=16, grad_m=16, grad_n=16, grad_v=16,
                                   grad_d=16, mm_m=16, mm_n=16, mm_k=16, zmm_m=16, zmm_n=16, zmm_k=16)
TILES_ENV = "MEGALODON_ATTENTION_TILES"
"""JSON object of AttentionTiles fields that replace GPU_TILES, e.g. '{"grad_m": 64}' (for tuning)."""


def default_tiles(device: torch.device, dtype: torch.dtype) -> AttentionTiles:
    """The tiles the launchers use when none are given: 16-bit inputs on a GPU get GPU_TILES with the
    overrides of ``MEGALODON_ATTENTION_TILES`` (what kernels/tune_attention.py tunes)."""
    if device.type != "cuda":
        return INTERPRETER_TILES
    if dtype == torch.float32:
        return GPU_TILES_FP32
    return _overridden_gpu_tiles(os.environ.get(TILES_ENV) or "{}")


@functools.lru_cache(maxsize=8)
def _overridden_gpu_tiles(override_json: str) -> AttentionTiles:
    override = json.loads(override_json)
    unknown = set(override) - set(AttentionTiles.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{TILES_ENV} names unknown fields {sorted(unknown)}")
    return replace(GPU_TILES, **override)


# %% [markdown]
# Small helpers every launcher uses: argument checks that name what was expected, the scratch
# buffers (optionally *poisoned*: filled with NaN before the kernels run, so a test that finds no
# NaN proves that every element read was written), and the layout of the chunk programs. The
# buffers are $P$ (and $dS$ in the backward), `span` × `span` per chunk, with `span` the chunk
# length rounded up to the tile, and the log-sum-exp, `span` per chunk.

# %% tags=["export:ops.chunk_attention"]
def _require(ok: bool, message: str, *values: object) -> None:
    """Raise ValueError(message.format(*values)) unless ok (formatted only then: launchers are on the hot path)."""
    if not ok:
        raise ValueError(message.format(*values))


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    """float32 multiplies as three TF32 products (errors near float32 rounding); 16-bit ignores it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _empty(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None, poison: bool = False) -> Tensor:
    fill = torch.full if poison else (lambda shape, _, **kw: torch.empty(shape, **kw))
    return fill(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


def _layout(z: Tensor, num_heads: int, chunk_size: int, tiles: AttentionTiles) -> tuple[int, int, int, AttentionTiles]:
    """Chunks per sequence, chunk programs G = B * H * chunks, the padded span of P, the fitted tiles."""
    batch, length, _ = z.shape
    n_chunks, span, tiles = _chunk_layout(length, chunk_size, tiles)
    return n_chunks, batch * num_heads * n_chunks, span, tiles


@functools.lru_cache(maxsize=64)
def _chunk_layout(length: int, chunk_size: int, tiles: AttentionTiles) -> tuple[int, int, AttentionTiles]:
    tiles = tiles.fitted(min(chunk_size, length))
    return triton.cdiv(length, chunk_size), triton.cdiv(min(chunk_size, length), tiles.tile) * tiles.tile, tiles


# %% [markdown]
# ### 3.1 Normalisation, affine and RoPE in one pass: the prologue
#
# Each program takes a block of tokens of one head and loads their $z$ rows whole (contiguous,
# so the loads and stores are wide), normalises in float32, applies $(\gamma + 1)/\sqrt{d_z}$ and
# $\beta$, rotates, and writes $q$ and $k$ in the input dtype. RoPE turns each pair of channels
# $(x_{2i}, x_{2i+1})$ by the angle $p\,\theta_i$ of the row's position $p$ in its chunk,
#
# $$\mathrm{out}_{2i} = x_{2i} \cos p\theta_i - x_{2i+1} \sin p\theta_i, \qquad
#   \mathrm{out}_{2i+1} = x_{2i} \sin p\theta_i + x_{2i+1} \cos p\theta_i,$$
#
# so each output channel needs its partner. Nothing in memory has to move for that: the kernel
# loads whole rows, views each row of $d_z$ channels as $d_z/2$ pairs in registers (`tl.reshape`
# to `(rows, d_z/2, 2)`, then `tl.split` into the even and odd channels), rotates the pairs, and
# joins them back (`tl.join`) for a contiguous store. (A first version loaded the partner channels
# again at offsets `offs ^ 1`, the lowest bit flipped: correct, but those loads are gathers of
# single elements and ran the prologue at a quarter of the memory bandwidth.) The cos/sin table
# ($c \times d_z/2$, float32) is computed in float64 exactly as chapter 06's `RotaryEmbedding`
# does, so the angles carry no float32 error even at position 2047, and is cached per (chunk span,
# $d_z$, base, device).

# %% tags=["export:ops.chunk_attention"]
@triton.jit
def _normalized_rows(z_ptr, cos_ptr, sin_ptr, rows, n_rows, length, chunk_size, eps,
                     H: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr):
    """RMSNorm(z) (BLOCK_T, BLOCK_DZ) of BLOCK_T token rows of head program_id(1), rstd, the
    RoPE cos/sin (BLOCK_T, BLOCK_DZ / 2) of each row's position in its chunk, the offsets and the mask."""
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_DZ)
    mask = (rows < n_rows)[:, None] & (d < DZ)[None, :]
    offs = (rows.to(tl.int64) * H + h)[:, None] * DZ + d[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(z * z, 1) / DZ + eps)
    pair = tl.arange(0, BLOCK_DZ // 2)
    angle = ((rows % length) % chunk_size)[:, None] * (DZ // 2) + pair[None, :]
    pair_mask = (rows < n_rows)[:, None] & (pair < DZ // 2)[None, :]
    cos = tl.load(cos_ptr + angle, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=pair_mask, other=0.0)
    return z * rstd[:, None], rstd, cos, sin, offs, mask


@triton.jit
def _pairs(x, BLOCK_T: tl.constexpr, BLOCK_DZ: tl.constexpr):
    """The even and the odd channels (BLOCK_T, BLOCK_DZ / 2) of the rows x (BLOCK_T, BLOCK_DZ)."""
    return tl.split(tl.reshape(x, (BLOCK_T, BLOCK_DZ // 2, 2)))


@triton.jit
def _rotate(x, cos, sin, BLOCK_T: tl.constexpr, BLOCK_DZ: tl.constexpr):
    """RoPE on rows x (BLOCK_T, BLOCK_DZ): each pair (x_2i, x_2i+1) turned by the angle of (cos, sin)
    (BLOCK_T, BLOCK_DZ / 2). The pairs are split and joined in registers; memory stays contiguous."""
    even, odd = _pairs(x, BLOCK_T, BLOCK_DZ)
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_T, BLOCK_DZ))


@triton.jit
def _scale_shift(zh, which, h, gamma_ptr, beta_ptr, H: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr):
    """zh (gamma[which, h] + 1) / sqrt(dz) + beta[which, h]."""
    d = tl.arange(0, BLOCK_DZ)
    par = (which * H + h) * DZ + d
    g = tl.load(gamma_ptr + par, mask=d < DZ, other=0.0).to(tl.float32)
    b = tl.load(beta_ptr + par, mask=d < DZ, other=0.0).to(tl.float32)
    return zh * ((g + 1.0) / tl.sqrt(DZ * 1.0))[None, :] + b[None, :]


@triton.jit
def _qk_prologue_kernel(z_ptr, gamma_ptr, beta_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
                        n_rows, length, chunk_size, eps,
                        H: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr, BLOCK_T: tl.constexpr):
    """q, k (B*L, H, dz) = RoPE(RMSNorm(z_h) (gamma + 1) / sqrt(dz) + beta) for BLOCK_T tokens."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    zh, rstd, cos, sin, offs, mask = _normalized_rows(
        z_ptr, cos_ptr, sin_ptr, rows, n_rows, length, chunk_size, eps, H, DZ, BLOCK_DZ)
    h = tl.program_id(1)
    q = _rotate(_scale_shift(zh, 0, h, gamma_ptr, beta_ptr, H, DZ, BLOCK_DZ), cos, sin, BLOCK_T, BLOCK_DZ)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    k = _rotate(_scale_shift(zh, 1, h, gamma_ptr, beta_ptr, H, DZ, BLOCK_DZ), cos, sin, BLOCK_T, BLOCK_DZ)
    tl.store(k_ptr + offs, k.to(k_ptr.dtype.element_ty), mask=mask)


# %% [markdown]
# Launching it: the cos/sin table for the positions $0 \ldots$ `span` $- 1$, and one program per
# block of tokens and head.

# %% tags=["export:ops.chunk_attention"]
@functools.lru_cache(maxsize=16)
def _rope_tables(span: int, dz: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (span, dz/2) of the angles p * base**(-2i/dz): float64, then float32 (as chapter 06)."""
    exponents = torch.arange(0, dz, 2, dtype=torch.float64, device=device) / dz
    angles = torch.arange(span, dtype=torch.float64, device=device)[:, None] * base ** -exponents
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


def _launch_prologue(z, gamma, beta, tables, q, k, num_heads, chunk_size, eps, tiles):
    batch, length, z_dim = z.shape
    dz = z_dim // num_heads
    grid = (triton.cdiv(batch * length, tiles.prologue_tokens), num_heads)
    _qk_prologue_kernel[grid](z, gamma, beta, *tables, q, k, batch * length, length, chunk_size, eps,
                              H=num_heads, DZ=dz, BLOCK_DZ=_pow2(dz, 4), BLOCK_T=tiles.prologue_tokens,
                              num_warps=tiles.prologue_warps)


# %% [markdown]
# Spec → kernel → check. The prologue must give chapter 06's queries and keys; the reference is
# chapter 06's own code (`RMSNorm`, `normalized_qk`, `RotaryEmbedding`) run in float64. The
# sizes are tiny in smoke mode (the interpreter runs every program one after the other) and
# exercise what can go wrong: several heads, $d_z \ne d_v$, a partial last chunk. The kernel
# computes in float32 and stores float32 here, so the two agree to float32 rounding: values of
# order 1, a few $10^{-7}$ (asserted below $10^{-5}$).

# %%
from megalodon_lite.attention import RMSNorm, RotaryEmbedding, normalized_qk  # noqa: E402

B, H, dz, dv = 2, 2, pick(smoke=8, full=64), pick(smoke=24, full=160)   # dz != dv, several heads
chunk = pick(smoke=32, full=512)
L = pick(smoke=75, full=3 * 512 + 77)                                    # a partial last chunk


def reference_qk(z, gamma, beta, heads, chunk_size, base=10000.0):
    """Chapter 06's q, k in float64: (B, L, H, dz) each."""
    d = z.shape[-1] // heads
    z_hat = RMSNorm(d, affine=False)(z.double().unflatten(-1, (heads, d)))
    q, k = normalized_qk(z_hat, gamma.double(), beta.double())
    positions = torch.arange(z.shape[1], device=z.device) % chunk_size
    rope = RotaryEmbedding(d, base)
    return (rope(q.transpose(1, 2), positions).transpose(1, 2),
            rope(k.transpose(1, 2), positions).transpose(1, 2))


z = 2 * torch.randn(B, L, H * dz, device=device) + 0.5
v = torch.randn(B, L, H * dv, device=device)
gamma = 0.5 * torch.randn(2, H, dz, device=device)   # away from their zero init, so the check sees them
beta = 0.5 * torch.randn(2, H, dz, device=device)
n_chunks, n_programs, span, tiles = _layout(z, H, chunk, default_tiles(z.device, z.dtype))
print(f"B={B} L={L} H={H} dz={dz} dv={dv} c={chunk}: {n_programs} chunk programs, span {span}, tile {tiles.tile}")

q, k = torch.full_like(z, float("nan")), torch.full_like(z, float("nan"))  # poisoned: every element must be written
_launch_prologue(z, gamma, beta, _rope_tables(span, dz, 10000.0, z.device), q, k, H, chunk, 1e-5, tiles)
q_ref, k_ref = reference_qk(z, gamma, beta, H, chunk)
err = max((q.view_as(q_ref) - q_ref).abs().max().item(), (k.view_as(k_ref) - k_ref).abs().max().item())
print(f"prologue vs chapter 06 in float64: max abs error {err:.1e}")
assert err < 1e-5

# %% [markdown]
# ### 3.2 The softmax kernel: log-sum-exp, then $P$
#
# One program per (chunk, block of $b_m$ query rows); the longest rows (the last blocks of every
# chunk) get the first programs, so short programs fill the tail. Pass 1 runs the online
# maximum and sum over the key blocks up to the diagonal; pass 2 recomputes each score tile and
# writes $P = \exp(S - \mathrm{lse})$. It writes every tile of the block-lower-triangle of
# granularity `TILE` (zeros above the diagonal and outside a partial last chunk), so the matmul
# kernel reads whole tiles without masks, and never reads a tile nobody wrote: the triangle is the
# contract between the two kernels. The chunks are numbered batch, then head, then chunk index.
# The grid is one-dimensional (no 65,535 limit on the number of chunks), row block by row block
# across all chunks: numbered chunk by chunk instead, as the matmul kernel below is, this kernel
# measured 0.33-0.35 ms instead of 0.29 on an H200 (`kernels/NOTES_attention.md`, version 4).

# %% tags=["export:ops.chunk_attention"]
@triton.jit
def _chunk_of(g, length, chunk_size, n_chunks, H: tl.constexpr):
    """Head, first token (flat over B*L) and length of chunk g = (b * H + h) * n_chunks + index."""
    b = g // (H * n_chunks)
    h = (g // n_chunks) % H
    start = (g % n_chunks) * chunk_size
    return h, (b * length + start).to(tl.int64), tl.minimum(chunk_size, length - start)


@triton.jit
def _softmax_kernel(q_ptr, k_ptr, p_ptr, lse_ptr, length, chunk_size, n_chunks, span,
                    H: tl.constexpr, DZ: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """lse (G, span) and P (G, span, span) of BLOCK_M query rows; program_id(0) = i * G + chunk."""
    n_programs = tl.num_programs(0) // (span // BLOCK_M)  # G
    g = tl.program_id(0) % n_programs
    row0 = (span // BLOCK_M - 1 - tl.program_id(0) // n_programs) * BLOCK_M  # the longest rows first
    h, tok, chunk_len = _chunk_of(g, length, chunk_size, n_chunks, H)
    if row0 < tl.cdiv(chunk_len, TILE) * TILE:
        rows = row0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + ((tok + rows) * H + h)[:, None] * DZ + d[None, :],
                    mask=(rows < chunk_len)[:, None] & (d < DZ)[None, :], other=0.0)
        k_cols = k_ptr + (tok * H + h) * DZ + d[:, None]  # K^T: key s is column s, at + s * H * DZ
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        for col0 in range(0, tl.minimum(row0 + BLOCK_M, chunk_len), BLOCK_N):  # pass 1: statistics
            cols = col0 + tl.arange(0, BLOCK_N)
            kt = tl.load(k_cols + cols[None, :] * (H * DZ), mask=(cols < chunk_len)[None, :] & (d < DZ)[:, None],
                         other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION)
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < chunk_len)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            row_sum = row_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        lse = m + tl.log(row_sum)
        tl.store(lse_ptr + g.to(tl.int64) * span + rows, lse)
        p_rows = p_ptr + g.to(tl.int64) * span * span + rows[:, None] * span
        for col0 in range(0, (row0 // TILE + 1) * TILE, BLOCK_N):  # pass 2: P up to the tile's end
            cols = col0 + tl.arange(0, BLOCK_N)
            kt = tl.load(k_cols + cols[None, :] * (H * DZ), mask=(cols < chunk_len)[None, :] & (d < DZ)[:, None],
                         other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION)
            valid = (cols[None, :] <= rows[:, None]) & (rows < chunk_len)[:, None]
            tl.store(p_rows + cols[None, :], tl.where(valid, tl.exp(s - lse[:, None]), 0.0).to(p_ptr.dtype.element_ty))


# %% tags=["export:ops.chunk_attention"]
def _launch_softmax(q, k, p, lse, num_heads, chunk_size, tiles):
    batch, length, z_dim = q.shape
    span = p.shape[1]
    _softmax_kernel[(p.shape[0] * (span // tiles.softmax_m),)](
        q, k, p, lse, length, chunk_size, triton.cdiv(length, chunk_size), span, H=num_heads,
        DZ=z_dim // num_heads, BLOCK_D=_pow2(z_dim // num_heads), TILE=tiles.tile, BLOCK_M=tiles.softmax_m,
        BLOCK_N=tiles.softmax_n, PRECISION=_precision(q.dtype), num_warps=tiles.softmax_warps,
        num_stages=tiles.softmax_stages)


# %% [markdown]
# The check: per chunk, $P$ must be the row softmax of chapter 06's $q k^\top$ under the causal
# mask, and lse its log-normaliser. Beyond that, the contract: every tile of the block-lower
# triangle written (no NaN left from the poison), every tile above it untouched (still NaN).

# %%
def chunks(length: int, chunk_size: int):
    """(g, b, h, first token, tokens) of every chunk program, in the kernels' numbering."""
    n = -(-length // chunk_size)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                yield (b * H + h) * n + i, b, h, i * chunk_size, min(chunk_size, length - i * chunk_size)


def reference_probs(q_ref, k_ref, b, h, start, n):
    scores = q_ref[b, start:start + n, h] @ k_ref[b, start:start + n, h].T
    mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1), scores.masked_fill(~mask, float("-inf")).logsumexp(-1)


p = torch.full((n_programs, span, span), float("nan"), device=device)
lse = torch.full((n_programs, span), float("nan"), device=device)
_launch_softmax(q, k, p, lse, H, chunk, tiles)
err_p = err_lse = 0.0
for g, b, h, start, n in chunks(L, chunk):
    probs, log_norm = reference_probs(q_ref, k_ref, b, h, start, n)
    err_p = max(err_p, (p[g, :n, :n] - probs).abs().max().item())
    err_lse = max(err_lse, (lse[g, :n] - log_norm).abs().max().item())
t = tiles.tile
block_row = torch.arange(span, device=device)[:, None] // t
block_col = torch.arange(span, device=device)[None, :] // t
last_chunk_tiles = -(-(L - (n_chunks - 1) * chunk) // t)  # the partial last chunk writes fewer tile rows
written = torch.stack([(block_col <= block_row) & (block_row < (last_chunk_tiles if (g + 1) % n_chunks == 0 else span // t))
                       for g in range(n_programs)])
print(f"P max abs error {err_p:.1e}, lse max abs error {err_lse:.1e}; "
      f"{written.sum().item()} elements of the tile triangle written, {(~written).sum().item()} never touched")
assert err_p < 1e-5 and err_lse < 1e-5
assert not p[written].isnan().any() and p[~written].isnan().all()

# %% [markdown]
# ### 3.3 One triangular matmul for $O$, $dV$, $dQ$ and $dK$
#
# $O = P V$ inside each chunk: output row $t$ sums over $s \le t$, so the program for a block of
# rows stops its reduction at the end of the diagonal tile. With `TRANS_A` the same kernel computes
# $A^\top X$: $dV = P^\top dO$ and $dK = dS^\top Q$, where output row $s$ sums over rows $t \ge s$
# of $A$, from the start of $s$'s tile to the end of the chunk; it reads the tile of $A$ through
# transposed pointers (no copy). $X$ and the output are token-major `(B, L, H, N)`, read and
# written in place: no transposes around the kernel. Only the rows of $X$ past the end of a partial
# chunk are masked. For $dQ$ and $dK$ the kernel forms its $A = dS$ tile by tile from two stored
# tiles and a vector, $dS = T - P \circ \delta$ (`SHIFT`; section 3.4 says why).
#
# The order of the programs matters as much as their tiles. At the official shapes one chunk is
# 128 programs (16 row blocks of 128 rows times 8 column tiles of 256), about one per SM, and its
# $A$ (4 MiB) and $X$ (8 MiB) fit in the 50 MiB L2 cache. Numbered chunk by chunk, the programs that
# run together share each tile of $X$ and of $A$ through L2; numbered row block by row block across
# all chunks (our first order), every row block re-read its chunk's columns of $X$ from memory,
# about 4.5 times $X$ in all. On an H200 the chunk-by-chunk order took $O = PV$ from 0.60 to
# 0.50 ms at the best tiles of each (`kernels/NOTES_attention.md`, version 4).

# %% tags=["export:ops.chunk_attention"]
@triton.jit
def _tri_matmul_kernel(a_ptr, b_ptr, delta_ptr, x_ptr, c_ptr, length, chunk_size, n_chunks, span, n_col_tiles,
                       H: tl.constexpr, N: tl.constexpr, TRANS_A: tl.constexpr, SHIFT: tl.constexpr,
                       TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """C = A X inside every chunk (TRANS_A: C = A^T X); A (G, span, span) block-lower-triangular,
    X and C (B*L, H, N). SHIFT: A[t, s] - B[t, s] delta[t] in place of A, with B like A and delta
    (G, span). program_id(0) = (chunk * row blocks + row block) * n_col_tiles + column tile: chunk by
    chunk, so that the programs running together share their chunk's rows of A and columns of X in L2."""
    n_row_blocks = span // BLOCK_M
    g = tl.program_id(0) // (n_row_blocks * n_col_tiles)
    block = (tl.program_id(0) // n_col_tiles) % n_row_blocks
    n0 = (tl.program_id(0) % n_col_tiles) * BLOCK_N
    if TRANS_A:  # row s of A^T sums over rows t >= s of A: the first row blocks are the longest
        row0 = block * BLOCK_M
    else:
        row0 = (n_row_blocks - 1 - block) * BLOCK_M
    h, tok, chunk_len = _chunk_of(g, length, chunk_size, n_chunks, H)
    if row0 < chunk_len:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        a_chunk = g.to(tl.int64) * span * span
        if TRANS_A:  # A^T[r, s] = A[s, r]: s from the start of r's tile to the end of the chunk
            lo, hi = (row0 // TILE) * TILE, tl.cdiv(chunk_len, TILE) * TILE
            a_tile = a_chunk + (lo + ks)[None, :] * span + rows[:, None]
            a_step = BLOCK_K * span
        else:  # s from 0 to the end of r's tile
            lo, hi = 0, (row0 // TILE + 1) * TILE
            a_tile = a_chunk + rows[:, None] * span + ks[None, :]
            a_step = BLOCK_K
        if SHIFT and not TRANS_A:
            delta_rows = tl.load(delta_ptr + g.to(tl.int64) * span + rows)[:, None]
        x_tile = x_ptr + ((tok + lo + ks) * H + h)[:, None] * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            a = tl.load(a_ptr + a_tile)
            if SHIFT:  # dS = T - P delta, delta of A's rows: the output's rows, or (A^T) the reduced ones
                if TRANS_A:
                    shift = tl.load(delta_ptr + g.to(tl.int64) * span + k0 + ks)[None, :]
                else:
                    shift = delta_rows
                b = tl.load(b_ptr + a_tile).to(tl.float32)
                a = (a.to(tl.float32) - b * shift).to(x_ptr.dtype.element_ty)
            x = tl.load(x_tile, mask=(k0 + ks < chunk_len)[:, None] & (cols < N)[None, :], other=0.0)
            acc = tl.dot(a, x, acc, input_precision=PRECISION)
            a_tile += a_step
            x_tile += BLOCK_K * H * N
        tl.store(c_ptr + ((tok + rows) * H + h)[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rows < chunk_len)[:, None] & (cols < N)[None, :])


# %% tags=["export:ops.chunk_attention"]
def _launch_tri_matmul(a, x, out, num_heads, chunk_size, transpose, tiles, shift=None):
    """out (B, L, H*N) = A X (or A^T X) chunk by chunk, for A (G, span, span) from the scores kernels;
    shift = (B, delta): A - B delta (delta (G, span) scaling A's rows) in place of A, with the z-wide tiles."""
    batch, length, width = x.shape
    n = width // num_heads
    block_m, block_n, block_k, warps, stages = tiles.matmul(z_wide=shift is not None)
    block_n = min(block_n, _pow2(n))
    n_col_tiles = triton.cdiv(n, block_n)
    b, delta = shift if shift is not None else (a, a)  # without SHIFT the kernel never reads them
    _tri_matmul_kernel[(a.shape[0] * (a.shape[1] // block_m) * n_col_tiles,)](
        a, b, delta, x, out, length, chunk_size, triton.cdiv(length, chunk_size), a.shape[1], n_col_tiles,
        H=num_heads, N=n, TRANS_A=transpose, SHIFT=shift is not None, TILE=tiles.tile, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return out


# %% [markdown]
# The check of the matmul alone: against `torch` products with the kernel's own $P$ (in float64),
# both directions, for a value-wide output ($O = PV$) and a $z$-wide one ($dK$-like, $P^\top Q$),
# and with `SHIFT`, $A - B\,\delta$ for a random $\delta$ (here $A = B = P$).

# %%
def reference_tri(a, x, heads, chunk_size, transpose):
    """out[b, t, h] = sum_s A[g][t, s] x[b, s, h] inside each chunk (A^T with transpose), float64."""
    width = x.shape[-1] // heads
    out = torch.zeros(*x.shape[:2], heads, width, dtype=torch.float64, device=x.device)
    xs = x.double().unflatten(-1, (heads, width))
    for g, b, h, start, n in chunks(x.shape[1], chunk_size):
        mat = a[g, :n, :n].double().nan_to_num().tril()  # tiles above the diagonal were never written
        out[b, start:start + n, h] = (mat.T if transpose else mat) @ xs[b, start:start + n, h]
    return out.flatten(-2)


delta_test = torch.randn(p.shape[:2], device=device)   # (G, span), scaling the rows of P
for x in (v, q):
    for transpose in (False, True):
        for shift in (None, (p, delta_test)):
            out = _launch_tri_matmul(p, x, torch.full_like(x, float("nan")), H, chunk, transpose, tiles, shift)
            a = p if shift is None else p - p * delta_test[:, :, None]
            err = (out - reference_tri(a, x, H, chunk, transpose)).abs().max().item()
            name = ("P" if shift is None else "(P - P delta)") + ("^T" if transpose else "")
            print(f"{name} times a ({x.shape[-1] // H} wide) input: max abs error {err:.1e}")
            assert err < 1e-5

# %% [markdown]
# ### 3.4 The backward: score gradients, then back through RoPE and the norm
#
# The softmax backward needs, per query row $t$, $dS_{ts} = P_{ts}\,(dP_{ts} - \delta_t)$ with
# $dP = dO\,V^\top$ and $\delta_t = \sum_s P_{ts}\, dP_{ts}$. FlashAttention computes $\delta$ as
# $\mathrm{rowsum}(dO \circ O)$, the same number (since $O = PV$, $\sum_s P_{ts}\, dO_t \cdot V_s =
# dO_t \cdot O_t$), in a pass of its own over two $L \times v$ tensors before the scores are
# recomputed: at $v = 2048$ that pass reads 537 MB for 65,536 tokens, a tenth of a millisecond on an
# H200. Here no kernel needs $\delta$ before the score tiles are done, so the score-gradient kernel
# sums it from the tiles themselves, and $dS$ is formed later, where it is read.
#
# The score-gradient kernel has one program per $b_m \times b_n$ tile of a chunk's triangle, written
# like a matmul tile with a long reduction: $dP = dO\,V^\top$ accumulated over the value channels
# in steps of `BLOCK_V` (the accumulator is only $b_m \times b_n$), $S = Q K^\top$ over the $z$
# channels in steps of `BLOCK_D`, then $P = \exp(S - \mathrm{lse})$ and $T = P \circ dP$. It writes
# $P$ and $T$ over the same triangle as the forward's $P$, and the tile's row sums of $T$ (in
# float32) into a small table, one column per column block; one `sum` over that table gives
# $\delta$ — deterministic, no atomics. Programs whose tile lies above the triangle write zero row
# sums and return. The $z$-wide products $dQ = dS\,K$ and $dK = dS^\top Q$ then load a tile of $T$
# and the same tile of $P$ and form $dS = T - P\,\delta$ in registers (section 3.3's `SHIFT`):
# twice the bytes of $A$ for those two products, 0.27 GB, against the 0.54 GB of the pass it
# replaces. (Summing $\delta$ from $dO \circ O$ inside the tiles instead would load the same rows
# of $O$ in every tile of a row block, up to 16 times: measured, 1.8 to 3.3 times slower,
# `kernels/NOTES_attention.md`, version 3.)
#
# Rounding: $T$ and $P$ are stored in the input dtype, so in 16 bits $dS$ carries an error of a unit
# roundoff times $|P\,dP| + |P\,\delta|$ where the fused $P\,(dP - \delta)$ carried one times
# its own size; the two are of the same order when $dO$ is not tiny against its mean along the row
# (the GPU tests bound the result against float64).
# (A first version gave each program a whole block of query rows and looped over the key blocks,
# as the softmax kernel does; it ran at half the matmul rate of the others, see
# `kernels/NOTES_attention.md`.)

# %% tags=["export:ops.chunk_attention"]
@triton.jit
def _score_grad_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, p_ptr, t_ptr, row_sums_ptr,
                       length, chunk_size, n_chunks, span,
                       H: tl.constexpr, DZ: tl.constexpr, DV: tl.constexpr, TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_V: tl.constexpr, PRECISION: tl.constexpr):
    """P, T = P dP (dP = dO V^T) and the row sums of T (G, span / BLOCK_N, span) of one
    BLOCK_M x BLOCK_N tile; program_id(0) = (chunk * row blocks + row block) * column blocks + column block."""
    n_col_blocks = span // BLOCK_N
    g = tl.program_id(0) // ((span // BLOCK_M) * n_col_blocks)
    row0 = (tl.program_id(0) // n_col_blocks) % (span // BLOCK_M) * BLOCK_M
    col0 = (tl.program_id(0) % n_col_blocks) * BLOCK_N
    h, tok, chunk_len = _chunk_of(g, length, chunk_size, n_chunks, H)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_sums = row_sums_ptr + (g.to(tl.int64) * n_col_blocks + col0 // BLOCK_N) * span + rows
    if (row0 >= tl.cdiv(chunk_len, TILE) * TILE) | (col0 >= (row0 // TILE + 1) * TILE):
        tl.store(row_sums, tl.zeros((BLOCK_M,), tl.float32))  # a tile above the triangle: T = 0
    else:
        cols = col0 + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < chunk_len, cols < chunk_len
        e = tl.arange(0, BLOCK_V)
        do_rows = do_ptr + ((tok + rows) * H + h)[:, None] * DV + e[None, :]
        v_cols = v_ptr + ((tok + cols) * H + h)[None, :] * DV + e[:, None]
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for e0 in range(0, DV, BLOCK_V):  # dP = dO V^T, a reduction over the value channels
            do = tl.load(do_rows + e0, mask=row_ok[:, None] & (e0 + e < DV)[None, :], other=0.0)
            vt = tl.load(v_cols + e0, mask=col_ok[None, :] & (e0 + e < DV)[:, None], other=0.0)
            dp = tl.dot(do, vt, dp, input_precision=PRECISION)
        d = tl.arange(0, BLOCK_D)
        q_rows = q_ptr + ((tok + rows) * H + h)[:, None] * DZ + d[None, :]
        k_cols = k_ptr + ((tok + cols) * H + h)[None, :] * DZ + d[:, None]
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, DZ, BLOCK_D):  # S = Q K^T, recomputed
            q = tl.load(q_rows + d0, mask=row_ok[:, None] & (d0 + d < DZ)[None, :], other=0.0)
            kt = tl.load(k_cols + d0, mask=col_ok[None, :] & (d0 + d < DZ)[:, None], other=0.0)
            s = tl.dot(q, kt, s, input_precision=PRECISION)
        lse = tl.load(lse_ptr + g.to(tl.int64) * span + rows)
        p = tl.where((cols[None, :] <= rows[:, None]) & row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        t = p * dp
        out = g.to(tl.int64) * span * span + rows[:, None] * span + cols[None, :]
        tl.store(p_ptr + out, p.to(p_ptr.dtype.element_ty))
        tl.store(t_ptr + out, t.to(t_ptr.dtype.element_ty))
        tl.store(row_sums, tl.sum(t, 1))


# %% tags=["export:ops.chunk_attention"]
def _launch_score_grad(q, k, v, do, lse, p, t, row_sums, num_heads, chunk_size, tiles):
    """P, T (G, span, span) and the row sums of T (G, span / tiles.grad_n, span); delta = row_sums.sum(1)."""
    batch, length, z_dim = q.shape
    dz, dv, span = z_dim // num_heads, v.shape[-1] // num_heads, p.shape[1]
    _score_grad_kernel[(p.shape[0] * (span // tiles.grad_m) * (span // tiles.grad_n),)](
        q, k, v, do, lse, p, t, row_sums, length, chunk_size, triton.cdiv(length, chunk_size), span, H=num_heads,
        DZ=dz, DV=dv, TILE=tiles.tile, BLOCK_M=tiles.grad_m, BLOCK_N=tiles.grad_n,
        BLOCK_D=min(tiles.grad_d, _pow2(dz)), BLOCK_V=min(tiles.grad_v, _pow2(dv)), PRECISION=_precision(q.dtype),
        num_warps=tiles.grad_warps, num_stages=tiles.grad_stages)


# %% [markdown]
# Check: $P$, $\delta$ and $dS = T - P\delta$ against the formulas in float64, with the reference
# probabilities and a random upstream gradient $dO$ (never zeros); $\delta$ against FlashAttention's
# $\mathrm{rowsum}(dO \circ O)$, the other way to the same number. $dS$ has entries of the size of
# $dP$ (a sum of $d_v$ products), so the bound is relative to its largest entry.

# %%
grad_o = torch.randn_like(v)
p2, t = torch.full_like(p, float("nan")), torch.full_like(p, float("nan"))
row_sums = torch.full((n_programs, span // tiles.grad_n, span), float("nan"), device=device)
_launch_score_grad(q, k, v, grad_o, lse, p2, t, row_sums, H, chunk, tiles)
delta = row_sums.sum(1)                                  # (G, span)
ds = t - p2 * delta[:, :, None]                          # what the z-wide matmuls form tile by tile
err_p = err_ds = err_delta = 0.0
for g, b, h, start, n in chunks(L, chunk):
    probs, _ = reference_probs(q_ref, k_ref, b, h, start, n)
    v_h = v.double()[b, start:start + n].unflatten(-1, (H, dv))[:, h]
    do_h = grad_o.double()[b, start:start + n].unflatten(-1, (H, dv))[:, h]
    delta_ref = (do_h * (probs @ v_h)).sum(-1)           # rowsum(dO o O), O = P V
    ds_ref = probs * (do_h @ v_h.T - delta_ref[:, None])
    err_p = max(err_p, (p2[g, :n, :n] - probs).abs().max().item())
    err_delta = max(err_delta, ((delta[g, :n] - delta_ref).abs().max() / delta_ref.abs().max()).item())
    err_ds = max(err_ds, ((ds[g, :n, :n].nan_to_num() - ds_ref).abs().max() / ds_ref.abs().max()).item())
print(f"backward P max abs error {err_p:.1e}; delta and dS max error {err_delta:.1e}, {err_ds:.1e} of their largest entry")
assert err_p < 1e-5 and err_delta < 1e-5 and err_ds < 1e-5
assert torch.equal(p2.isnan(), p.isnan()) and torch.equal(t.isnan(), p.isnan())  # the same triangle as the forward
assert not row_sums.isnan().any()                        # every tile wrote its row sums, zeros above the triangle

# %% [markdown]
# After the triangular matmuls have produced $dq$ and $dk$ (accumulated in float32, stored in the
# input dtype), the epilogue walks the prologue backwards, per token: the rotation by
# $-p\,\theta_i$ (the transpose of a rotation), then $q = \hat z\,(\gamma_0 + 1)/\sqrt{d_z} +
# \beta_0$ gives $d\beta_0 = \sum_t dq_t$, $d\gamma_0 = \sum_t dq_t \hat z_t / \sqrt{d_z}$ and
# $d\hat z = dq\,(\gamma_0 + 1)/\sqrt{d_z} + dk\,(\gamma_1 + 1)/\sqrt{d_z}$, and the RMS norm
# without affine,
# $\hat z = z\, r$ with $r = (\overline{z^2} + \varepsilon)^{-1/2}$, gives
#
# $$dz = r\,\big(d\hat z - \hat z \cdot \overline{d\hat z \circ \hat z}\big).$$
#
# Each program writes its partial sums of $d\gamma, d\beta$; one `sum` over programs finishes them
# (deterministic: no atomics). The epilogue splits its three loaded rows ($z$, $dq$, $dk$) into
# even and odd channels once and works on the two halves until it joins them for the store: a
# version that joined after each rotation and then mixed the joined rows with $\hat z$ made the
# compiler shuffle registers through shared memory at every mix, and ran at a third of the
# bandwidth (`kernels/NOTES_attention.md`, version 3).

# %% tags=["export:ops.chunk_attention"]
@triton.jit
def _affine_rope_grad(grad_ptr, zh_even, zh_odd, cos, sin, offs, mask, which, h, pid, gamma_ptr, parts_ptr,
                      H: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr, BLOCK_T: tl.constexpr):
    """Back through RoPE and the affine of queries (which=0) or keys (1), channel pairs apart: stores
    this program's partial dgamma, dbeta (parts[pid, 0 or 1, which, h]) and returns the gradient to
    z_hat (even, odd channels)."""
    g_even, g_odd = _pairs(tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32), BLOCK_T, BLOCK_DZ)
    dx_even = g_even * cos + g_odd * sin  # the transposed rotation: by minus the angle
    dx_odd = g_odd * cos - g_even * sin
    even = 2 * tl.arange(0, BLOCK_DZ // 2)  # channel 2i; its partner 2i + 1
    ok = even < DZ
    inv_sqrt = 1.0 / tl.sqrt(DZ * 1.0)
    par = (which * H + h) * DZ + even
    scale_even = (tl.load(gamma_ptr + par, mask=ok, other=0.0).to(tl.float32) + 1.0) * inv_sqrt
    scale_odd = (tl.load(gamma_ptr + par + 1, mask=ok, other=0.0).to(tl.float32) + 1.0) * inv_sqrt
    dgamma = parts_ptr + ((pid * 4 + which) * H + h) * DZ + even  # parts (programs, 2, 2, H, dz)
    dbeta = dgamma + 2 * H * DZ
    tl.store(dgamma, tl.sum(dx_even * zh_even, 0) * inv_sqrt, mask=ok)
    tl.store(dgamma + 1, tl.sum(dx_odd * zh_odd, 0) * inv_sqrt, mask=ok)
    tl.store(dbeta, tl.sum(dx_even, 0), mask=ok)
    tl.store(dbeta + 1, tl.sum(dx_odd, 0), mask=ok)
    return dx_even * scale_even[None, :], dx_odd * scale_odd[None, :]


@triton.jit
def _qk_epilogue_kernel(z_ptr, gamma_ptr, cos_ptr, sin_ptr, dq_ptr, dk_ptr, dz_ptr, parts_ptr,
                        n_rows, length, chunk_size, eps,
                        H: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr, BLOCK_T: tl.constexpr):
    """dz (B*L, H, dz) and this program's partial dgamma, dbeta (parts: programs, 2, 2, H, dz) from dq, dk.
    Everything between the loads and the store works on the even and odd channels apart."""
    pid, h = tl.program_id(0), tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    zh, rstd, cos, sin, offs, mask = _normalized_rows(
        z_ptr, cos_ptr, sin_ptr, rows, n_rows, length, chunk_size, eps, H, DZ, BLOCK_DZ)
    zh_even, zh_odd = _pairs(zh, BLOCK_T, BLOCK_DZ)
    dq_even, dq_odd = _affine_rope_grad(dq_ptr, zh_even, zh_odd, cos, sin, offs, mask, 0, h, pid, gamma_ptr,
                                        parts_ptr, H, DZ, BLOCK_DZ, BLOCK_T)
    dk_even, dk_odd = _affine_rope_grad(dk_ptr, zh_even, zh_odd, cos, sin, offs, mask, 1, h, pid, gamma_ptr,
                                        parts_ptr, H, DZ, BLOCK_DZ, BLOCK_T)
    dzh_even, dzh_odd = dq_even + dk_even, dq_odd + dk_odd
    mean_dot = (tl.sum(dzh_even * zh_even, 1) + tl.sum(dzh_odd * zh_odd, 1)) / DZ  # RMSNorm backward:
    dz_even = rstd[:, None] * (dzh_even - zh_even * mean_dot[:, None])         # dz = rstd (dzh - zh mean(dzh zh))
    dz_odd = rstd[:, None] * (dzh_odd - zh_odd * mean_dot[:, None])
    dz = tl.reshape(tl.join(dz_even, dz_odd), (BLOCK_T, BLOCK_DZ))
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# %% tags=["export:ops.chunk_attention"]
def _launch_epilogue(z, gamma, tables, dq, dk, dz, parts, num_heads, chunk_size, eps, tiles):
    """dz, and the partial dgamma, dbeta of every program: parts (programs, 2, 2, H, dz), summed by the caller."""
    batch, length, z_dim = z.shape
    d = z_dim // num_heads
    _qk_epilogue_kernel[(parts.shape[0], num_heads)](
        z, gamma, *tables, dq, dk, dz, parts, batch * length, length, chunk_size, eps,
        H=num_heads, DZ=d, BLOCK_DZ=_pow2(d, 4), BLOCK_T=tiles.prologue_tokens, num_warps=tiles.prologue_warps)


# %% [markdown]
# Check: random $dq$, $dk$ pulled back through chapter 06's normalisation, affine and RoPE by
# autograd in float64 must give the epilogue's $dz$, $d\gamma$, $d\beta$.

# %%
dq, dk = torch.randn_like(z), torch.randn_like(z)
z64, gamma64, beta64 = (t.double().requires_grad_() for t in (z, gamma, beta))
refs = torch.autograd.grad(reference_qk(z64, gamma64, beta64, H, chunk),
                           (z64, gamma64, beta64), (dq.double().view_as(q_ref), dk.double().view_as(k_ref)))
parts = torch.full((-(-B * L // tiles.prologue_tokens), 2, 2, H, dz), float("nan"), device=device)
dz_kernel = torch.full_like(z, float("nan"))
_launch_epilogue(z, gamma, _rope_tables(span, dz, 10000.0, z.device), dq, dk, dz_kernel, parts, H, chunk, 1e-5, tiles)
dgamma_kernel, dbeta_kernel = parts.sum(0)
for name, got, ref in zip(("dz", "dgamma", "dbeta"), (dz_kernel, dgamma_kernel, dbeta_kernel), refs):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    print(f"{name}: max error {err:.1e} of its largest entry")
    assert err < 1e-5

# %% [markdown]
# ### 3.5 The forward and backward launchers
#
# They chain the launches: one line of shape checks each, inputs made contiguous, and two options,
# `tiles` (the tuning script passes its candidates) and `poison`.

# %% tags=["export:ops.chunk_attention"]
def chunk_attention_forward(z: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, num_heads: int, chunk_size: int,
                            eps: float = NORM_EPS, rope_base: float = 10000.0, *,
                            tiles: AttentionTiles | None = None, poison: bool = False
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward kernels (no argument checks beyond shapes: see `chunk_attention`).

    Args:
        z: (B, L, H*dz), v: (B, L, H*dv), gamma, beta: (2, H, dz).
        tiles: block sizes (default: `default_tiles`); poison: fill every buffer with NaN first.

    Returns:
        O (B, L, H*dv) in z's dtype, and for the backward q, k (B, L, H*dz) and the row
        log-sum-exp (G, span) in float32, G = B * H * ceil(L / chunk_size).
    """
    _require(z.dim() == 3 and v.dim() == 3 and z.shape[:2] == v.shape[:2], "z, v must be (B, L, *) alike, got {}, {}", tuple(z.shape), tuple(v.shape))
    _require(z.shape[-1] % num_heads == 0 and v.shape[-1] % num_heads == 0, "num_heads={} must divide {} and {}", num_heads, z.shape[-1], v.shape[-1])
    _require(gamma.shape == beta.shape == (2, num_heads, z.shape[-1] // num_heads), "gamma, beta must be (2, H, dz), got {}, {}", tuple(gamma.shape), tuple(beta.shape))
    z, v, gamma, beta = z.contiguous(), v.contiguous(), gamma.contiguous(), beta.contiguous()
    n_chunks, n_programs, span, tiles = _layout(z, num_heads, chunk_size, tiles or default_tiles(z.device, z.dtype))
    tables = _rope_tables(span, z.shape[-1] // num_heads, rope_base, z.device)
    q, k, o = _empty(z.shape, z, poison=poison), _empty(z.shape, z, poison=poison), _empty(v.shape, v, poison=poison)
    lse, p = _empty((n_programs, span), z, torch.float32, poison), _empty((n_programs, span, span), z, poison=poison)
    # the launches back to back, nothing between the short prologue and the next kernel to keep the GPU waiting
    _launch_prologue(z, gamma, beta, tables, q, k, num_heads, chunk_size, eps, tiles)
    _launch_softmax(q, k, p, lse, num_heads, chunk_size, tiles)
    _launch_tri_matmul(p, v, o, num_heads, chunk_size, False, tiles)
    return o, q, k, lse


def chunk_attention_backward(grad_out: Tensor, z: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                             gamma: Tensor, num_heads: int, chunk_size: int, eps: float = NORM_EPS,
                             rope_base: float = 10000.0, *, tiles: AttentionTiles | None = None,
                             poison: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward kernels from the forward's saved tensors.

    Returns:
        dz (B, L, H*dz) and dv (B, L, H*dv) in z's dtype; dgamma, dbeta (2, H, dz) in gamma's dtype.
    """
    _require(grad_out.shape == v.shape, "grad_out must have O's shape {}, got {}", tuple(v.shape), tuple(grad_out.shape))
    _require(q.shape == k.shape == z.shape, "q, k must have z's shape {}, got {}, {}", tuple(z.shape), tuple(q.shape), tuple(k.shape))
    grad_out, z, q, k, v, gamma = (t.contiguous() for t in (grad_out, z, q, k, v, gamma))  # no copy when they are
    n_chunks, n_programs, span, tiles = _layout(z, num_heads, chunk_size, tiles or default_tiles(z.device, z.dtype))
    _require(lse.shape == (n_programs, span), "lse must be ({}, {}) for these tiles, got {}", n_programs, span, tuple(lse.shape))
    p, t = _empty((n_programs, span, span), z, poison=poison), _empty((n_programs, span, span), z, poison=poison)
    row_sums = _empty((n_programs, span // tiles.grad_n, span), z, torch.float32, poison)
    _launch_score_grad(q, k, v, grad_out, lse, p, t, row_sums, num_heads, chunk_size, tiles)
    shift = (p, row_sums.sum(1))  # dS = T - P delta, with delta = rowsum(T) (G, span)
    dv = _launch_tri_matmul(p, grad_out, _empty(v.shape, v, poison=poison), num_heads, chunk_size, True, tiles)
    dq = _launch_tri_matmul(t, k, _empty(z.shape, z, poison=poison), num_heads, chunk_size, False, tiles, shift)
    dk = _launch_tri_matmul(t, q, _empty(z.shape, z, poison=poison), num_heads, chunk_size, True, tiles, shift)
    d = z.shape[-1] // num_heads
    parts = _empty((triton.cdiv(z.shape[0] * z.shape[1], tiles.prologue_tokens), 2, 2, num_heads, d), z,
                   torch.float32, poison)
    dz = _empty(z.shape, z, poison=poison)
    _launch_epilogue(z, gamma, _rope_tables(span, d, rope_base, z.device), dq, dk, dz, parts, num_heads,
                     chunk_size, eps, tiles)
    dgamma, dbeta = parts.sum(0).to(gamma.dtype)  # one reduction over the programs' partial sums
    return dz, dv, dgamma, dbeta.clone()  # a custom op's outputs may not be views of one tensor


# %% [markdown]
# ### 3.6 Autograd, a custom op, and the public function
#
# The two launchers become PyTorch custom ops (`torch.library.custom_op`), so `torch.compile`
# treats each as one opaque call instead of tracing into Triton, with "fake" implementations that
# give output shapes without running anything. A `torch.autograd.Function` ties them together:
# the forward saves $z$, $q$, $k$, $v$ and the log-sum-exp (not $P$: the backward recomputes it,
# which costs one extra $QK^\top$ and saves $c$ values per token of memory; nor $O$, which
# FlashAttention's $\delta$ would need).

# %% tags=["export:ops.chunk_attention"]
@torch.library.custom_op("megalodon_lite::chunk_attention_fwd", mutates_args=())
def _forward_op(z: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, num_heads: int, chunk_size: int, eps: float,
                rope_base: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return chunk_attention_forward(z, v, gamma, beta, num_heads, chunk_size, eps, rope_base)


@_forward_op.register_fake
def _(z, v, gamma, beta, num_heads, chunk_size, eps, rope_base):
    _, n_programs, span, _ = _layout(z, num_heads, chunk_size, default_tiles(z.device, z.dtype))
    return (v.new_empty(v.shape), z.new_empty(z.shape), z.new_empty(z.shape),  # contiguous, as the launchers'
            z.new_empty((n_programs, span), dtype=torch.float32))


@torch.library.custom_op("megalodon_lite::chunk_attention_bwd", mutates_args=())
def _backward_op(grad_out: Tensor, z: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                 gamma: Tensor, num_heads: int, chunk_size: int, eps: float, rope_base: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return chunk_attention_backward(grad_out, z, q, k, v, lse, gamma, num_heads, chunk_size, eps, rope_base)


@_backward_op.register_fake
def _(grad_out, z, q, k, v, lse, gamma, num_heads, chunk_size, eps, rope_base):
    return z.new_empty(z.shape), v.new_empty(v.shape), gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)


class ChunkAttentionFunction(torch.autograd.Function):
    """Autograd for `chunk_attention`: the forward and backward custom ops."""

    @staticmethod
    def forward(ctx, z: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, num_heads: int, chunk_size: int,
                eps: float, rope_base: float) -> Tensor:
        o, q, k, lse = torch.ops.megalodon_lite.chunk_attention_fwd(z, v, gamma, beta, num_heads, chunk_size,
                                                                    eps, rope_base)
        ctx.save_for_backward(z, q, k, v, lse, gamma)  # not O: the backward sums delta from P dP
        ctx.args = (num_heads, chunk_size, eps, rope_base)
        return o

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        dz, dv, dgamma, dbeta = torch.ops.megalodon_lite.chunk_attention_bwd(grad_out, *ctx.saved_tensors,
                                                                             *ctx.args)
        return dz, dv, dgamma, dbeta, None, None, None, None


# %% [markdown]
# The public function takes what `ChunkAttention.forward` has at hand and checks it the way the
# module does. What the kernels do not cover goes to chapter 06's PyTorch path by a stated rule,
# `unsupported_reason`: float64 (the kernels compute in float32 at most), head dims $d_z$ above
# 256, attention dropout during training (it would need a random mask in both passes; the
# official model trains without it), and a call that continues a cached, unfinished chunk (a
# streaming step: a few tokens against at most $c - 1$ cached keys, where launching the kernels
# buys nothing). A stream's first call, or any call after a chunk boundary, has no cache and runs
# the kernels. `megalodon_lite.backend.use_triton(..., supported=False, why_not=...)` turns the
# reason into a fallback under `"auto"` and an error under an explicit `"triton"`.

# %% tags=["export:ops.chunk_attention"]
def unsupported_reason(z: Tensor, num_heads: int, *, cached_tokens: int = 0, dropout_p: float = 0.0) -> str:
    """Why the kernels do not cover this call ("" when they do): the rule for falling back to PyTorch.

    Args:
        z: (B, L, z_dim), the call's shared representation.
        num_heads: H; the head dim is z_dim / H.
        cached_tokens: tokens of an unfinished chunk held in the streaming cache before this call.
        dropout_p: attention dropout applied by this call (0 outside training).
    """
    if z.dtype not in KERNEL_DTYPES:
        return f"dtype {z.dtype} (the kernels take bfloat16, float16 or float32)"
    if z.shape[-1] // num_heads > MAX_Z_HEAD_DIM:
        return f"z head dim {z.shape[-1] // num_heads} > {MAX_Z_HEAD_DIM}"
    if dropout_p > 0:
        return f"attention dropout {dropout_p}"
    if cached_tokens:
        return f"a streaming call continuing a cached chunk of {cached_tokens} tokens"
    return ""


def chunk_attention(z: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, num_heads: int, chunk_size: int,
                    eps: float = NORM_EPS, rope_base: float = 10000.0) -> Tensor:
    """Megalodon's normalized chunk attention (Megalodon §3.3-3.4) in Triton, forward and backward.

    Per head: ``z_hat = RMSNorm(z_h)`` without affine; ``q = z_hat (gamma[0] + 1) / sqrt(dz) +
    beta[0]``, ``k`` with row 1; RoPE on adjacent channel pairs at position ``t mod chunk_size``;
    causal softmax attention with scale 1 inside each chunk. Equals chapter 06's ``ChunkAttention``
    without a cache and without dropout (`chunk_attention_reference`). Gradients flow to z, v,
    gamma and beta. Calls the kernels do not cover are listed by `unsupported_reason`.

    Args:
        z: (B, L, H*dz) shared representation, bfloat16, float16 or float32; dz even, <= 256.
        v: (B, L, H*dv) values, z's dtype and device; L need not be a multiple of chunk_size.
        gamma, beta: (2, H, dz), row 0 for queries, row 1 for keys (stored as 0, applied as +1).
        num_heads: H. chunk_size: c, tokens per attention chunk. eps: of the RMS norm.
        rope_base: RoPE wavelength base.

    Returns:
        O: (B, L, H*dv) in z's dtype.
    """
    for name, t in (("z", z), ("v", v), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if z.dtype not in KERNEL_DTYPES or v.dtype != z.dtype or v.device != z.device:
        raise TypeError(f"z must be bfloat16, float16 or float32 and v alike on its device, got z {z.dtype} on "
                        f"{z.device}, v {v.dtype} on {v.device}")
    for name, value in (("num_heads", num_heads), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if z.dim() != 3 or v.dim() != 3 or z.shape[:2] != v.shape[:2]:
        raise ValueError(f"z and v must be (B, L, z_dim) and (B, L, v_dim), got {tuple(z.shape)} and {tuple(v.shape)}")
    if z.shape[-1] % num_heads or v.shape[-1] % num_heads or (z.shape[-1] // num_heads) % 2:
        raise ValueError(f"num_heads={num_heads} must divide z_dim={z.shape[-1]} into even head dims and "
                         f"divide v_dim={v.shape[-1]}")
    if z.shape[-1] // num_heads > MAX_Z_HEAD_DIM:
        raise ValueError(f"z head dim must be at most {MAX_Z_HEAD_DIM}, got {z.shape[-1] // num_heads}")
    expected = (2, num_heads, z.shape[-1] // num_heads)
    if gamma.shape != expected or beta.shape != expected or gamma.device != z.device or beta.device != z.device:
        raise ValueError(f"gamma and beta must be {expected} on {z.device}, got {tuple(gamma.shape)} on "
                         f"{gamma.device} and {tuple(beta.shape)} on {beta.device}")
    if not eps > 0 or not rope_base > 1:
        raise ValueError(f"eps must be positive and rope_base greater than 1, got {eps!r} and {rope_base!r}")
    if z.shape[1] == 0:
        return v.new_empty(v.shape)
    return ChunkAttentionFunction.apply(z, v, gamma, beta, num_heads, chunk_size, float(eps), float(rope_base))


def chunk_attention_reference(z: Tensor, v: Tensor, gamma: Tensor, beta: Tensor, num_heads: int, chunk_size: int,
                              eps: float = NORM_EPS, rope_base: float = 10000.0, *, use_sdpa: bool = True) -> Tensor:
    """The same function computed by chapter 06's ``ChunkAttention`` (PyTorch), with gamma and beta as given."""
    module = ChunkAttention(z.shape[-1], v.shape[-1], num_heads, chunk_size, rope_base=rope_base).to(z.device)
    module.z_norm.eps = float(eps)
    module.use_sdpa = use_sdpa
    module.backend = "torch"  # never this file's kernels: the reference must stay independent of them
    return torch.func.functional_call(module, {"gamma": gamma, "beta": beta}, (z, v))[0]


# %% [markdown]
# ## 4. The whole operation against chapter 06, in float64
#
# Forward and every gradient ($z$, $v$, $\gamma$, $\beta$) of `chunk_attention` against
# `chunk_attention_reference` (chapter 06's `ChunkAttention`, PyTorch) run in float64 on the same
# inputs, at the sizes of section 3, then at a length shorter than one chunk. (Every buffer the
# kernels write was poisoned in the checks of section 3.) In float32 the errors are float32
# rounding accumulated over sums of a chunk's length (relative $10^{-7}$ to $10^{-6}$); the bound
# is $10^{-5}$ of the reference's norm.

# %%
def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def check_against_chapter_06(z, v, gamma, beta, heads, chunk_size, bound=1e-5):
    leaves = [t.detach().clone().requires_grad_() for t in (z, v, gamma, beta)]
    out = chunk_attention(*leaves, heads, chunk_size)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = chunk_attention_reference(*leaves64, heads, chunk_size)
    ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
    errors = {"O": relative_error(out, ref)}
    errors |= {f"d{name}": relative_error(g, r) for name, g, r in zip(("z", "v", "gamma", "beta"), grads, ref_grads)}
    print(f"L={z.shape[1]}, c={chunk_size}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert max(errors.values()) < bound, errors


check_against_chapter_06(z, v, gamma, beta, H, chunk)
check_against_chapter_06(z[:, : chunk // 2 + 3], v[:, : chunk // 2 + 3], gamma, beta, H, chunk)  # L < c

# %% [markdown]
# `tests/test_ops_chunk_attention.py` runs the same comparison over a grid of shapes (one chunk, a
# partial chunk, several heads, $z \ne v$, $L < c$, several chunks, odd $L$), the error messages,
# the fallback rule, and `torch.compile` of a function that calls the op; on a GPU it adds the
# official shapes in bfloat16, float16 and float32.
#
# ## 5. What fusing the normalisation and RoPE saves
#
# Chapter 06 computes $q$ and $k$ with a dozen PyTorch operations, each reading its inputs from
# memory and writing its output back. Counting the bytes each operation touches (its input and
# output tensors; views cost nothing) gives the traffic of that path, per element of $z$, against
# the prologue's: read $z$, write $q$ and $k$.

# %%
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


class CountBytes(TorchDispatchMode):
    """Bytes read and written by every PyTorch operation run inside it (views excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        if outputs and all(t.untyped_storage().data_ptr() in storages for t in outputs):
            return out  # a view: no data moves
        self.ops += 1
        self.bytes += sum(t.numel() * t.element_size() for t in inputs + outputs)
        return out


zb = torch.randn(1, 2048, 256, dtype=torch.bfloat16)  # one chunk of one head at the official sizes
gb = torch.zeros(2, 1, 256)
module06 = ChunkAttention(256, 256, 1, 2048)
positions = torch.arange(2048)
with CountBytes() as counter:  # the first lines of chapter 06's ChunkAttention.forward
    q_t, k_t = normalized_qk(module06.z_norm(zb.unflatten(-1, (1, 256))), gb, gb)
    q_t, k_t = module06.rope(q_t.transpose(1, 2), positions), module06.rope(k_t.transpose(1, 2), positions)
per_element = counter.bytes / zb.numel()
fused = 2 + 2 * 2  # read z, write q and k, bfloat16
print(f"PyTorch: {counter.ops} operations, {per_element:.0f} bytes per element of z; the prologue: {fused} bytes "
      f"({per_element / fused:.0f}x less)")
at_scale_ms = (per_element - fused) * tokens * z_dim / (HBM_TBPS * 1e12) * 1e3
print(f"at 65,536 tokens and z = 256 that is {at_scale_ms:.3f} ms of bandwidth saved per forward")
further_ms = 8 * tokens * z_dim / (HBM_TBPS * 1e12) * 1e3  # q and k written once and read once, bfloat16
print(f"fusing further, into the attention loops, would save at most 8 bytes per element: {further_ms:.3f} ms, "
      f"{100 * further_ms / (3.5 * floor_fwd_ms):.0f} % of the forward+backward floor")
assert per_element > 3 * fused

# %% [markdown]
# Fusing one step further, into the attention's inner loop, would save writing and re-reading $q$
# and $k$: 8 more bytes per element of $z$, a few hundredths of a millisecond (printed above). But
# each block of keys would then be normalised and rotated once for
# every block of queries that reads it ($c / b_m = 16$ times per chunk), in float32, with the
# channel-pair shuffles of RoPE in the innermost loop: more work than the bytes it saves. So the
# normalisation, affine and RoPE are fused into one pass over $z$ (where fusing pays: many
# operations become one), and the attention kernels read the finished $q$ and $k$.
#
# ## 6. Measured on a GPU
#
# `kernels/tune_attention.py` timed each kernel's tile candidates and the designs of section 1 on
# an H200, once per version of the kernels (`kernels/NOTES_attention.md` keeps each version with
# its prediction and outcome); `kernels/bench.py` then measured the chosen kernels, through the
# public function (custom ops inside autograd), against chapter 06's PyTorch path: 65,536 tokens
# per call, bfloat16, official shapes. Everything below is read from the committed results in `kernels/results/`.
# First the three designs, forward only: (c) is the fastest by about a factor of two, a little
# more than its FLOP count alone predicted (section 1): the recomputing designs also carry a
# $b_m \times 256$ accumulator and the scores in registers at once.

# %%
def read_result(name: str) -> dict | None:
    """A committed result, read, or None when it was not recorded."""
    found = recorded_files(name)   # the file, or nothing
    return json.loads(found[0].read_text()) if found else None


tune, tune_v1 = read_result("tune_attention_nvidia_h200.json"), read_result("tune_attention_nvidia_h200_v1.json")
if tune:
    print(f"{tune['device']}, torch {tune['torch']}, triton {tune['triton']}, {tune['date']}: forward designs")
    design_c = tune["designs"][-1]["ms"]
    for row in tune["designs"]:
        print(f"  {row['design']:<58} {row['ms']:7.3f} ms  ({row['tflops']:.0f} TFLOP/s of useful work, "
              f"{row['ms'] / design_c:.2f} x design (c))")
else:
    print("no committed tuning results")

# %% [markdown]
# Then the whole operation, and the PyTorch path beside it:

# %%
OFFICIAL_H100_MS = {"fwd": 0.97, "fwdbwd": 2.87}  # the official CUDA kernels on one H100, as reported to this project
if results:
    print(f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}; "
          f"measured ceilings {results['matmul_TFLOPs']:.0f} TFLOP/s, {results['copy_TBps']:.2f} TB/s")
    print(f"{'B x L':>10} {'path':>7} {'fwd ms':>8} {'x floor':>8} {'fwd+bwd ms':>11} {'x floor':>8}")
    for row in (r for r in results["rows"] if r["op"] == "attention"):
        print(f"{row['B']:>4} x {row['L']:<5} {row['path']:>6} {row['fwd_ms']:8.3f} {row['fwd_ms'] / row['floor_fwd_ms']:8.2f} "
              f"{row['fwdbwd_ms']:11.3f} {row['fwdbwd_ms'] / row['floor_fwdbwd_ms']:8.2f}")
    triton_rows = [r for r in results["rows"] if r["op"] == "attention" and r["path"] == "triton"]
    worst = max(triton_rows, key=lambda r: r["fwdbwd_ms"])
    print(f"official CUDA kernels on an H100: {OFFICIAL_H100_MS['fwd']} ms forward, {OFFICIAL_H100_MS['fwdbwd']} ms "
          f"forward+backward; target 1.7 x floor = {1.7 * worst['floor_fwdbwd_ms']:.2f} ms")
    print(f"slowest Triton forward+backward: {worst['fwdbwd_ms']:.2f} ms = {worst['fwdbwd_ms'] / worst['floor_fwdbwd_ms']:.2f} "
          f"x floor, {worst['fwdbwd_ms'] / OFFICIAL_H100_MS['fwdbwd']:.2f} x the official H100 time")
    for row in triton_rows:
        torch_row = next(r for r in results["rows"] if r["op"] == "attention" and r["path"] == "torch"
                         and (r["B"], r["L"]) == (row["B"], row["L"]))
        print(f"  {row['B']} x {row['L']}: {torch_row['fwd_ms'] / row['fwd_ms']:.1f}x faster than PyTorch forward, "
              f"{torch_row['fwdbwd_ms'] / row['fwdbwd_ms']:.1f}x forward+backward")
else:
    print("no committed benchmark results")

# %% [markdown]
# Forward+backward runs about 13 times faster than chapter 06's PyTorch path, faster than the
# official kernels on an H100 (an H200 has the H100's matmul rate and more memory bandwidth, so
# that comparison favours us), and within 1.7 times the compute floor of this run (the ratios
# are printed above). Where the time goes, kernel by kernel, each at its best
# tiles, against its own floor (FLOPs at the matmul rate for the matmul kernels, bytes at the copy
# bandwidth for the two memory-bound ones):

# %%
if tune and results:
    n_tok, n_z, n_v = tokens, z_dim, v_dim
    work = {  # kernel: (what it does, FLOPs executed, bytes moved at the least)
        "prologue": ("RMS norm, affine, RoPE -> q, k", 0, 6 * n_tok * n_z),
        "softmax": ("lse, then P (S twice)", 4 * pairs * n_z, 0),
        "pv": ("O = P V", 2 * pairs * n_v, 0),
        "grad": ("P, T = P dP, rowsum(T) (S and dP = dO V^T)", 2 * pairs * (n_z + n_v), 0),
        "pv_t": ("dV = P^T dO", 2 * pairs * n_v, 0),
        "zgrad": ("dQ = (T - P delta) K (and dK = dS^T Q: the same again)", 2 * pairs * n_z, 0),
        "epilogue": ("back to dz, dgamma, dbeta", 0, 8 * n_tok * n_z),
    }
    total = 0.0
    print(f"{'kernel':>9} {'ms':>7} {'floor ms':>9} {'x floor':>8}  what")
    for kernel, (what, flops, nbytes) in work.items():
        ms = min(t["ms"] for t in tune["kernels"] if t["kernel"] == kernel and t["ms"])
        floor = flops / (results["matmul_TFLOPs"] * 1e9) + nbytes / (results["copy_TBps"] * 1e9)
        total += ms * (2 if kernel == "zgrad" else 1)
        print(f"{kernel:>9} {ms:7.3f} {floor:9.3f} {ms / floor:8.2f}  {what}")
    print(f"sum {total:.2f} ms; the launchers back to back: forward {tune['whole']['best']['fwd_ms']:.3f} ms, "
          f"forward+backward {tune['whole']['best']['fwdbwd_ms']:.3f} ms; a call of 16 tokens {tune['whole']['tiny_call_ms']:.3f} ms")
    cublas = 2 * 32 * 2048**3 / (tune["cublas_bmm_full_square_ms"] * 1e9)
    print(f"cuBLAS on the full square P V (twice the causal work): {tune['cublas_bmm_full_square_ms']:.3f} ms, {cublas:.0f} TFLOP/s")
if tune_v1:
    v1_grad = min((t for t in tune_v1["kernels"] if t["kernel"] == "grad" and t["ms"]), key=lambda t: t["ms"])
    print(f"first version of the score-gradient kernel (a block of rows per program, looping over key blocks): "
          f"{v1_grad['ms']:.3f} ms, {v1_grad['tflops']:.0f} TFLOP/s")

# %% [markdown]
# Reading that table:
#
# - **The triangular matmuls** ($O$, $dV$) are the largest share. Numbering their programs chunk
#   by chunk (section 3.3) took them from 0.60 to about 0.50 ms; counting the upper half of each
#   diagonal tile they compute, that is about three quarters of cuBLAS's rate on the full square.
#   The rest is the causal shape: a row block reduces only over the keys up to its diagonal (half
#   the chunk on average, a single tile at the start), so the software pipeline spends a larger
#   share of each program filling and draining, and the loads are plain `cp.async` rather than the
#   Hopper tensor-memory-accelerator copies cuBLAS uses.
# - **The score-gradient kernel** went from a block of query rows per program (the first version)
#   to one tile of the triangle per program: a plain matmul tile with a reduction of $v + z$
#   channels, nearly twice as fast. The $z$-wide products after it run further from their floor:
#   they are short (a reduction of at most one chunk into 256 columns) and each step loads two
#   tiles of $A$ to form $dS$.
# - **The memory-bound kernels** moved towards their floors once the RoPE pairs were split in
#   registers (the version that gathered the partner channels took two to three times as long);
#   the epilogue, with its three row loads and partial sums, is still over twice its floor, a few
#   hundredths of a millisecond. The pass for $\delta$ is gone.
#
# The benchmark measures a little more than the kernels add up to. A profile of one call
# (`kernels/profile_attention.py`) compares three ways of calling the same kernels:

# %%
profile = read_result("profile_attention_nvidia_h200.json")
if profile:
    kernel_ms = profile["profile"]["kernel_ms"]
    floor_note = f" = {kernel_ms / worst['floor_fwdbwd_ms']:.2f} x the floor above" if results else ""
    print(f"{profile['device']}, {profile['date']}: the kernels of one call take {kernel_ms:.3f} ms on the GPU, "
          f"back to back{floor_note}")
    for name, row in profile["paths"].items():
        print(f"  {name:>16}: {row['fwdbwd_ms']:.3f} ms measured, {row['cpu_enqueue_ms_median']:.3f} ms of CPU to "
              f"enqueue it")
else:
    print("no committed profile")

# %% [markdown]
# The three ways of calling the same kernels cost about the same on the GPU clock, so the custom
# ops and autograd add little there, and each enqueues a call in less CPU time than the GPU takes
# to run it: in the benchmark's loop Python keeps ahead and the GPU does not wait for it. (The
# profiled call started from an idle GPU, and there it did wait: the short prologue finished
# before the softmax kernel was launched.) The few per cent between the kernels' sum and the
# benchmark are the GPU's own, not measured apart here: the benchmark empties the L2 cache before
# every repeat and the profiled call did not. What would take the kernels further, none of it
# done here: a persistent schedule with tensor-descriptor (TMA) loads for the triangular matmuls,
# $dQ$ and $dK$ in one launch, and a softmax kernel nearer its floor.

# %%
def plot_attention_results(data: dict) -> plt.Figure:
    rows = [r for r in data["rows"] if r["op"] == "attention"]
    shapes = sorted({(r["B"], r["L"]) for r in rows}, key=lambda s: s[1])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, key, floor_key in ((axes[0], "fwd_ms", "floor_fwd_ms"), (axes[1], "fwdbwd_ms", "floor_fwdbwd_ms")):
        for offset, (path, colour) in enumerate((("torch", "tab:gray"), ("triton", "tab:orange"))):
            values = [next(r[key] for r in rows if (r["B"], r["L"]) == s and r["path"] == path) for s in shapes]
            ax.bar([i + 0.38 * offset for i in range(len(shapes))], values, width=0.36, color=colour,
                   label="PyTorch (chapter 06, SDPA)" if path == "torch" else "Triton (this chapter)")
        floor = rows[0][floor_key]
        ax.axhline(floor, color="k", lw=1, ls="--", label=f"compute floor {floor:.2f} ms")
        official = OFFICIAL_H100_MS["fwd" if key == "fwd_ms" else "fwdbwd"]
        ax.axhline(official, color="tab:blue", lw=1, ls=":", label=f"official CUDA kernels, H100: {official} ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_yticks([0.3, 0.5, 1, 2, 3, 5, 10, 20, 40])
        ax.set_ylim(0.3, 300)  # room above the bars for the legend
        ax.set_xticks([i + 0.19 for i in range(len(shapes))], [f"{b} x {length // 1024}K" for b, length in shapes])
        ax.set(title=("forward" if key == "fwd_ms" else "forward + backward"), ylabel="ms per call (log scale)",
               xlabel="B x L (65,536 tokens)")
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle(f"chunk attention, c = 2048, z = 256, v = 2048, bfloat16, {data['device']}", fontsize=10)
    fig.tight_layout()
    return fig


if results:
    fig = plot_attention_results(results)
    save_figure(fig, "09_attention_kernel")
    plt.show()

# %% [markdown]
# ## Summary
#
# - At the official shapes the work is two matmuls over the causal pairs of each chunk, and the
#   value dim ($v = 2048$) is 8 times the query/key dim: recomputing $QK^\top$ per value tile
#   (FlashAttention with a split value dim) multiplies the forward FLOPs, while writing $P$ once
#   per chunk costs a few hundredths of a millisecond of bandwidth.
# - Five kernels: a prologue (RMS norm, affine and RoPE in one pass over $z$, the RoPE pairs split
#   in registers), a softmax kernel (log-sum-exp, then $P$), one triangular matmul for $O$, $dV$,
#   $dQ$, $dK$ (the last two forming $dS = T - P\delta$ as they load it), a score-gradient kernel
#   ($P$, $T = P \circ dP$ and $\delta$'s partial sums, one tile of the triangle per program), and
#   an epilogue back to $dz$, $d\gamma$, $d\beta$.
# - Each kernel is checked alone, and the whole against chapter 06 in float64, forward and every
#   gradient, with poisoned buffers, under the Triton interpreter on a CPU.
# - `chunk_attention` is a custom op with autograd; `unsupported_reason` is the rule for the cases
#   left to PyTorch (float64, dropout, streaming steps with a cache).
# - On an H200 (section 6), forward+backward runs about an order of magnitude faster than chapter
#   06's PyTorch path and faster than the official CUDA kernels on an H100, within 1.7 times the
#   compute floor; section 6 prints by how much, kernel by kernel, with the next steps.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the book's own code on random inputs and prints a pass, "not yet implemented",
# or what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** One row of scores in float32, $S = (100, 99, 0)$. What does the
# textbook softmax `torch.exp(S) / torch.exp(S).sum()` give? And the log-sum-exp form of section
# 3.2, $\mathrm{lse} = m + \log \sum_s e^{S_s - m}$ with $m = \max_s S_s$, then
# $P_s = e^{S_s - \mathrm{lse}}$? (float32's largest number is about $3.4 \cdot 10^{38} \approx e^{88.7}$.)
# Would bfloat16 scores fare better? Then run the cell.
#
# ### BEGIN SOLUTION
# $e^{100}$ and $e^{99}$ overflow float32 to infinity, so the first two probabilities are
# $\infty / \infty$ = NaN and the third $1/\infty = 0$: the row is lost. The log-sum-exp form only
# ever takes $e^{x}$ of $x \le 0$: $\mathrm{lse} = 100 + \log(1 + e^{-1} + e^{-100})$, and
# $P = (1, e^{-1}, e^{-100}) / (1 + e^{-1} + e^{-100})$, about $(0.73, 0.27, 0)$. bfloat16 has
# float32's 8 exponent bits, so the same range and the same overflow (float16 overflows already
# past $e^{11}$). The kernel stores only lse per row: one number that both normalises and shifts,
# so pass 2 writes $P = e^{S - \mathrm{lse}} \le 1$ directly, and the backward recomputes $P$ from it.
# ### END SOLUTION

# %%
import math

import torch

from megalodon_lite.attention import causal_attention
from megalodon_lite.exercises import check
from megalodon_lite.ops.attention_floor import attention_floor_ms
from megalodon_lite.ops.floors import Ceilings

BENCHMARK_SHAPES = {"heads": 1, "chunk": 2048, "z_head_dim": 256, "v_head_dim": 2048}   # kernels/bench.py's ATTENTION

score_row = torch.tensor([100.0, 99.0, 0.0])
textbook = torch.exp(score_row) / torch.exp(score_row).sum()
row_lse = score_row.max() + torch.log(torch.exp(score_row - score_row.max()).sum())
print(f"textbook softmax: {textbook.tolist()}")
print(f"log-sum-exp:      lse = {row_lse.item():.4f}, P = {torch.exp(score_row - row_lse).tolist()}")
print(f"largest float32 {torch.finfo(torch.float32).max:.2e}, bfloat16 {torch.finfo(torch.bfloat16).max:.2e}, "
      f"float16 {torch.finfo(torch.float16).max:.2e}")

# %% [markdown]
# **2. Write the compute floor.** `my_attention_floor_ms(batch, length, ceilings)` returns the
# forward compute floor of section 1 in milliseconds, at the benchmark's shapes
# (`BENCHMARK_SHAPES`: chunks of $c$ = 2,048 tokens, $z$ = 256, $v$ = 2,048, one head), for a
# `length` that is a multiple of $c$, at the matmul rate `ceilings.matmul_TFLOPs` ($10^{12}$
# floating-point operations per second). The check compares it with the package's
# `attention_floor_ms` (section 1), the floor `kernels/bench.py` wrote into every attention row of
# section 6.

# %%
def my_attention_floor_ms(batch: int, length: int, ceilings: Ceilings) -> float:
    """Milliseconds of the forward's causal-pair FLOPs at the matmul rate (c = 2048, z = 256, v = 2048, H = 1)."""
    ### BEGIN SOLUTION
    chunk, z_dim, v_dim, heads = 2048, 256, 2048, 1
    pairs = batch * heads * (length // chunk) * chunk * (chunk + 1) // 2   # (query, key) pairs with key <= query
    return 2 * pairs * (z_dim + v_dim) / (ceilings.matmul_TFLOPs * 1e12) * 1e3
    ### END SOLUTION


# %% tags=["check"]
def benchmark_attention_floor_ms(batch: int, length: int, ceilings: Ceilings) -> float:
    """The floor kernels/bench.py records in each attention row: the package's, at the benchmark's shapes."""
    return attention_floor_ms(batch, length, ceilings, **BENCHMARK_SHAPES)


def floor_inputs(generator: torch.Generator) -> tuple:
    batch, chunks = (int(n) for n in torch.randint(1, 33, (2,), generator=generator))
    rate = 100 + 1900 * float(torch.rand((), generator=generator, dtype=torch.float64))
    return batch, chunks * BENCHMARK_SHAPES["chunk"], Ceilings(copy_TBps=4.0, matmul_TFLOPs=rate)


check(my_attention_floor_ms, reference=benchmark_attention_floor_ms, make_inputs=floor_inputs,
      hint="a chunk of c tokens has c (c + 1) / 2 causal pairs, there are B H L / c chunks, and each pair costs "
           "2 z FLOPs for its score and 2 v for its share of the output; 1 TFLOP/s = 1e12 FLOP/s, the answer in ms")

# %% [markdown]
# **3. Derive: why $v = 2048$ breaks a register accumulator.** A FlashAttention program keeps its
# output block $O$, $b_m \times v$ in float32, in registers while it walks over the keys; an H200
# SM has 65,536 32-bit registers (256 KiB) for all the programs it runs. (a) How many bytes is
# $O$ at $b_m = 64$ for $v = 128$ (a Llama head) and for $v = 2048$? (b) What is the largest $b_m$
# whose $O$ takes at most half the register file at $v = 2048$, and why is that too small?
# (c) The triangular matmul of section 3.3 keeps a $b_m \times b_n$ accumulator: why can it, when
# FlashAttention cannot split $v$ the same way for free?
#
# ### BEGIN SOLUTION
# (a) $64 \cdot 128 \cdot 4$ B = 32 KiB, an eighth of the register file; $64 \cdot 2048 \cdot 4$ B
# = 512 KiB, twice the whole file, before $Q$, the scores and the loads in flight. (b) Half the file
# is 128 KiB $= b_m \cdot 2048 \cdot 4$ B, so $b_m = 16$: the tensor cores multiply 64 rows at a
# time (a Hopper warp group), so three quarters of each product would be wasted, and every block of
# keys and values loaded would serve only 16 queries. (c) FlashAttention's output tile needs the
# softmax's row statistics, which it learns only as it walks the keys, so it must hold the whole row
# of $O$ to rescale it; a program that owned a slice of $v$ would have to recompute $S = QK^\top$
# for every slice (design (a)). Design (c) computes the row statistics first and writes
# $P = e^{S - \mathrm{lse}}$, already normalised: $O = PV$ is then an ordinary matrix product, and
# $v$ is just its $N$ dimension, cut into slices of $b_n$ independent programs with no rescaling.
# The price is $P$'s bytes, written once and read once per value slice.
# ### END SOLUTION

# %% [markdown]
# **4. Write causal attention through the log-sum-exp.** `my_lse_attention(q, k, v)` takes $q$, $k$
# (N, H, L, $d_z$) and $v$ (N, H, L, $d_v$) and returns $O$ (N, H, L, $d_v$): causal attention with
# scale 1 as the kernels compute it: scores $S = q k^\top$, masked above the diagonal, each row's
# lse as in exercise 1, then $O = e^{S - \mathrm{lse}} v$. Some inputs have scores of a few
# thousand, whose exponential overflows even float64. The check compares it with chapter 06's
# `causal_attention`.

# %%
def my_lse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, H, L, dz), (N, H, L, dz), (N, H, L, dv) -> (N, H, L, dv): causal softmax attention, scale 1."""
    ### BEGIN SOLUTION
    scores = q @ k.transpose(-1, -2)
    length = scores.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)               # finite: the diagonal is never masked
    lse = row_max + torch.log(torch.exp(scores - row_max).sum(dim=-1, keepdim=True))
    return torch.exp(scores - lse) @ v
    ### END SOLUTION


# %% tags=["check"]
def attention_inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads = (int(n) for n in torch.randint(1, 4, (2,), generator=generator))
    length = int(torch.randint(1, 40, (), generator=generator))
    z_dim, v_dim = (2 * int(n) for n in torch.randint(1, 9, (2,), generator=generator))
    scale = (1.0, 4.0, 12.0)[int(torch.randint(0, 3, (), generator=generator))]   # scores up to a few thousand
    q, k = (scale * torch.randn(batch, heads, length, z_dim, generator=generator, dtype=torch.float64)
            for _ in range(2))
    return q, k, torch.randn(batch, heads, length, v_dim, generator=generator, dtype=torch.float64)


check(my_lse_attention, reference=causal_attention, make_inputs=attention_inputs,
      hint="mask the keys after each query with -inf before the softmax; take exp only of S - max (or S - lse), "
           "never of S itself, or large scores give inf / inf = nan")

# %% [markdown]
# **5. Derive, then run.** Section 1 took forward+backward as 3.5 forward floors, "the convention
# for attention". Count the FLOPs per causal pair, in units of the forward floor's $2(z + v)$, of
# FlashAttention (forward: $S$ and $PV$ once; backward: recompute $S$, then $dP$, $dV$, $dQ$, $dK$)
# and of design (c) (forward: $S$ twice, then $PV$; backward as section 1 says). Show where 3.5
# comes from, and compare the two designs at $z = v$ and at the official $z = 256$, $v = 2048$.
# Then run the cell, which evaluates both counts.
#
# ### BEGIN SOLUTION
# Per pair: $S$ costs $2z$, $PV$ $2v$, $dP = dO\,V^\top$ $2v$, $dV = P^\top dO$ $2v$, $dQ = dS\,K$ and
# $dK = dS^\top Q$ $2z$ each. FlashAttention: forward $2z + 2v$ = 1 floor; backward $2z + 2v + 2v +
# 4z = 6z + 4v$, that is $(3z + 2v)/(z + v)$ floors. At $z = v$ that is 2.5, so forward+backward is
# 3.5: the convention is FlashAttention's count for equal head dims. Design (c) has the same
# backward (it recomputes $S$ too) and a forward of $4z + 2v$, $(2z + v)/(z + v)$ floors: 1.5 at
# $z = v$, so 4 in all, worse than the convention. In FLOPs FlashAttention is always ahead by that
# one extra $S$, $z/(z + v)$ of a floor: half a floor at $z = v$, a ninth at $z = 256$, $v = 2048$,
# where design (c) comes to $(5z + 3v)/(z + v)$ floors, below 3.5, and where FlashAttention's count
# assumes an accumulator it cannot hold (exercise 3). The extra $S$ is cheap exactly when $z \ll v$.
# ### END SOLUTION

# %%
def pair_floors(z_dim: int, v_dim: int) -> dict[str, tuple[float, float]]:
    """(forward, backward) FLOPs per causal pair in forward floors 2(z + v), for the two designs."""
    backward = (6 * z_dim + 4 * v_dim) / (2 * (z_dim + v_dim))
    return {"FlashAttention": (1.0, backward), "design (c)": ((4 * z_dim + 2 * v_dim) / (2 * (z_dim + v_dim)), backward)}


for dz, dv in ((128, 128), (256, 2048)):
    for design, (forward, backward) in pair_floors(dz, dv).items():
        print(f"z = {dz:>4}, v = {dv:>4}, {design:<15}: forward {forward:.2f} + backward {backward:.2f} "
              f"= {forward + backward:.2f} forward floors")

# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# Re-run the benchmark (`kernels/bench.py --ops attention`, about a minute on an H200) into a
# temporary folder and print its table.

# %% tags=["gpu"]
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from megalodon_lite.notebook import repository_script  # noqa: E402

cuda = require_cuda()
bench_script = repository_script("kernels/bench.py")   # a clone's; from an installed wheel, one line says so
with tempfile.TemporaryDirectory() as out_dir:
    run = subprocess.run([sys.executable, str(bench_script), "--ops", "attention", "--out", out_dir],
                         capture_output=True, text=True)
    print(run.stdout[-4000:], run.stderr[-2000:])
    assert run.returncode == 0

# %% [markdown]
# The official shapes in bfloat16 against float64: two chunks and a partial one. bfloat16 keeps 8
# significant bits; $q$, $k$, $P$, $T$ and $dq$, $dk$ are each rounded once to bfloat16 on the
# way, so the output and the gradients carry relative errors of a few $2^{-8} \approx 4 \cdot 10^{-3}$
# (bounds: $10^{-2}$ for $O$, $2 \cdot 10^{-2}$ for the gradients, as in the tests).

# %% tags=["gpu"]
zg = (2 * torch.randn(1, 2 * 2048 + 333, 256, device=cuda) + 0.5).bfloat16()
vg = torch.randn(1, 2 * 2048 + 333, 2048, device=cuda).bfloat16()
gg, bg = 0.5 * torch.randn(2, 1, 256, device=cuda), 0.5 * torch.randn(2, 1, 256, device=cuda)
leaves = [t.clone().requires_grad_() for t in (zg, vg, gg, bg)]
out = chunk_attention(*leaves, 1, 2048)
grad_out = torch.randn_like(out)
grads = torch.autograd.grad(out, leaves, grad_out)
leaves64 = [t.detach().double().requires_grad_() for t in leaves]
ref = chunk_attention_reference(*leaves64, 1, 2048)
ref_grads = torch.autograd.grad(ref, leaves64, grad_out.double())
errors = [relative_error(out, ref)] + [relative_error(g, r) for g, r in zip(grads, ref_grads)]
print("relative errors O, dz, dv, dgamma, dbeta: " + ", ".join(f"{e:.1e}" for e in errors))
assert errors[0] < 1e-2 and max(errors[1:]) < 2e-2
