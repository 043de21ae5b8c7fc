# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Why Megalodon
#
# A Transformer decoder lets every token look at every earlier token. For a sequence of $L$ tokens
# causal softmax attention computes, per head,
#
# $$O = \operatorname{softmax}\!\Big(\frac{QK^\top}{\sqrt{d}} + M\Big)\,V, \qquad
# M_{ts} = \begin{cases} 0 & s \le t \\ -\infty & s > t \end{cases}$$
#
# with $Q, K, V \in \mathbb{R}^{L \times d}$. The score matrix $QK^\top$ has $L^2$ entries: the work
# grows as $L^2 d$, and so does the memory if the matrix is materialised. Fused kernels
# (FlashAttention, PyTorch's `scaled_dot_product_attention`) never store it, which makes the memory
# linear, but they still do the $L^2 d$ work. Doubling the context quadruples the cost.
#
# Megalodon (Ma et al. 2024, arXiv 2404.08801) keeps softmax attention but only **inside chunks**
# of $c$ tokens, which costs $L \cdot c$ instead of $L^2$, and carries information across chunks
# with a **moving average** (CEMA), a recurrence with a fixed-size state that costs $O(L)$ and needs
# constant memory however long the stream. This chapter measures the wall that motivates all of
# that, on whatever device runs the notebook.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from megalodon_lite.notebook import (SMOKE, describe_run, pick, pick_device, require_cuda, save_figure,
                                     seed_everything, time_call)

seed_everything(0)
device = pick_device()
describe_run(device)
on_gpu = device.type == "cuda"
dtype = torch.bfloat16 if on_gpu else torch.float32
heads, head_dim = pick(smoke=2, full=8), 64
chunk = pick(smoke=128, full=2048 if on_gpu else 512)   # Megalodon-7B uses 4096 (paper), the repo 2048
if on_gpu:
    lengths = pick(smoke=[256, 512, 1024, 2048], full=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
else:
    lengths = pick(smoke=[128, 256, 512, 1024, 2048], full=[256, 512, 1024, 2048, 4096, 8192])
print(f"dtype={dtype}  heads={heads}  head_dim={head_dim}  chunk={chunk}")
print(f"sequence lengths: {lengths}")

# %% [markdown]
# ## Four ways to mix tokens
#
# - **naive attention** materialises the $L \times L$ scores, masks, softmaxes and multiplies by $V$:
#   the textbook formula, $O(L^2)$ time and memory;
# - **SDPA**: PyTorch's fused `scaled_dot_product_attention(..., is_causal=True)`, the same numbers
#   without storing the scores (on a GPU a FlashAttention kernel): $O(L^2)$ time, $O(L)$ memory;
# - **chunked attention**: the same SDPA, but each token only sees earlier tokens of its own chunk
#   of $c$ tokens, as in Megalodon: $O(L c)$ time;
# - **cumulative mean**, the cheapest causal mixer there is: $y_t = \frac{1}{t+1}\sum_{s \le t} v_s$,
#   one running sum, $O(L)$. It is exactly attention with *equal* scores (all $q = 0$), so it
#   mixes the same tokens; what attention pays $L^2$ for is choosing the weights from the data.
#   Chapter 01's moving average is the same kind of linear-time operation, with decaying instead
#   of equal weights.
#
# First, the check that these compute what we say: naive attention equals SDPA, and attention with
# $q = 0$ equals the cumulative mean (float64 on the CPU, where both are exact up to rounding).

# %%
def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with the (B, H, L, L) score matrix materialised. q, k, v: (B, H, L, d)."""
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                  # (B, H, L, L)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through PyTorch's fused kernel, which never stores the scores."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = chunk) -> torch.Tensor:
    """Causal attention restricted to non-overlapping chunks of ``chunk_size`` tokens (L divisible by it)."""
    batch, n_heads, length, dim = q.shape
    size = min(chunk_size, length)

    def split(t: torch.Tensor) -> torch.Tensor:                                 # (B, H, L, d) -> (B*L/c, H, c, d)
        return t.view(batch, n_heads, length // size, size, dim).transpose(1, 2).reshape(-1, n_heads, size, dim)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.view(batch, length // size, n_heads, size, dim).transpose(1, 2).reshape(batch, n_heads, length, dim)


def cumulative_mean(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y_t = mean of v_0..v_t: linear time. Takes (q, k) only to share the others' signature."""
    accumulate = torch.promote_types(v.dtype, torch.float32)                    # bf16 sums would drift
    counts = torch.arange(1, v.shape[-2] + 1, device=v.device, dtype=accumulate)
    # Scan with time as the last, contiguous dimension: PyTorch's fast path for cumsum.
    running_sum = v.transpose(-2, -1).to(accumulate).cumsum(dim=-1)             # (B, H, d, L)
    return (running_sum / counts).transpose(-2, -1).to(v.dtype)


q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))
err_sdpa = (naive_attention(q, k, v) - sdpa_attention(q, k, v)).abs().max().item()
err_uniform = (naive_attention(torch.zeros_like(q), k, v) - cumulative_mean(q, k, v)).abs().max().item()
print(f"naive vs SDPA: {err_sdpa:.1e}    attention with q = 0 vs cumulative mean: {err_uniform:.1e}")
assert err_sdpa < 1e-12 and err_uniform < 1e-12   # float64, sums of 300 terms of size ~1

# %% [markdown]
# ## The measurement
#
# Forward time (the best of a few calls) for each method as the sequence grows, with one batch,
# `heads` heads of dimension 64. Naive attention is run only where its score matrix fits: on a GPU
# we skip the sizes whose scores (and the masked and softmaxed copies of them) cannot fit in the
# free memory, and catch an out-of-memory error if the estimate was optimistic. Next to the times,
# the bytes of the materialised $L \times L$ score matrix ($B \cdot H \cdot L^2 \cdot$ bytes per
# element), computed. On a CPU under Linux we also **measure** how much each call grows the
# process's peak resident memory: writing `5` to `/proc/self/clear_refs` resets the kernel's
# high-water mark `VmHWM`, and after the call `VmHWM` minus the resident size before it is what the
# call needed on top. It is a lower bound: memory the allocator already holds from earlier calls is
# reused without growing the process, so small sizes read close to 0 (and a log axis cannot draw
# a 0: those points are left out of the plot). On a GPU the cell at the end
# of the chapter (*On a GPU*) measures the peak with `torch.cuda.max_memory_allocated` instead.

# %%
def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_growth(fn) -> float:
    """Bytes by which ``fn()`` raised this process's peak resident memory (Linux), else nan."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")                                 # reset the high-water mark VmHWM
        before = _status_bytes("VmRSS")
        fn()
        return float(max(0, _status_bytes("VmHWM") - before))   # freeing may shrink the RSS below before
    except OSError:                                               # not Linux, or /proc not writable
        return float("nan")


def naive_fits(length: int) -> bool:
    """Whether the naive version's three (B, H, L, L) temporaries fit (CPU: cap at 2 GiB)."""
    needed = 3 * heads * length**2 * torch.finfo(dtype).bits // 8
    budget = torch.cuda.mem_get_info(device)[0] if on_gpu else 2 * 2**30
    return needed < 0.9 * budget


methods = {"naive": naive_attention, "SDPA": sdpa_attention, "chunked": chunked_attention,
           "cumulative mean": cumulative_mean}
repeats = pick(smoke=3, full=5)
seconds = {name: [] for name in methods}
cpu_peak = {name: [] for name in methods}                         # measured, CPU only
score_bytes = []
for length in lengths:
    q, k, v = (torch.randn(1, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    for name, fn in methods.items():
        elapsed = peak = float("nan")
        if name != "naive" or naive_fits(length):
            try:
                elapsed = time_call(lambda: fn(q, k, v), repeats=repeats, device=device, reduce="min")
                if not on_gpu:
                    peak = cpu_peak_growth(lambda: fn(q, k, v))
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        seconds[name].append(elapsed)
        cpu_peak[name].append(peak)
    score_bytes.append(heads * length**2 * torch.finfo(dtype).bits // 8)
    del q, k, v

def cell(value: float, scale: float) -> str:
    return f"{value * scale:>19.3f}" if np.isfinite(value) else f"{'does not fit':>19}"


print(f"{'L':>7} " + " ".join(f"{name + ' ms':>19}" for name in methods) + f" {'L×L scores (MiB)':>18}")
for i, length in enumerate(lengths):
    print(f"{length:>7} " + " ".join(cell(seconds[name][i], 1e3) for name in methods)
          + f" {score_bytes[i] / 2**20:>18.1f}")
if not on_gpu:
    print("\npeak resident memory growth, measured (MiB):")
    print(f"{'L':>7} " + " ".join(f"{name:>19}" for name in methods))
    for i, length in enumerate(lengths):
        print(f"{length:>7} " + " ".join(cell(cpu_peak[name][i], 2**-20) for name in methods))

# %% [markdown]
# On log-log axes a cost $\propto L^p$ is a straight line of slope $p$. We fit the slope of each
# curve over the larger sizes (at small sizes fixed overheads such as kernel launches dominate and
# flatten every curve). Full attention should approach slope 2, the chunked version and the
# cumulative mean slope 1 (or less while they are still dominated by overhead). The slopes are
# printed and plotted, not asserted: a timing is whatever the machine measured, and other work on
# it bends the curves (in smoke mode the sizes are also too small for the slopes to mean much).
# `tests/test_chapter_timings.py` checks the ordering on these four functions, with a margin.

# %%
fit_from = pick(smoke=256, full=16384 if on_gpu else 1024)


def fitted_slope(times: list[float]) -> float:
    points = [(np.log(n), np.log(t)) for n, t in zip(lengths, times) if n >= fit_from and np.isfinite(t)]
    if len(points) < 2:
        return float("nan")
    return float(np.polyfit(*zip(*points), deg=1)[0])


slopes = {name: fitted_slope(seconds[name]) for name in methods}
print(f"time ∝ L^p, fitted over L >= {fit_from}: " + ", ".join(f"{n} p = {s:.2f}" for n, s in slopes.items()))

fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
for name, style in zip(methods, ["o-", "x--", "s:", "d-"]):
    ax_time.loglog(lengths, seconds[name], style, label=f"{name} (slope {slopes[name]:.2f})")
ax_time.set(xlabel="sequence length L", ylabel="forward time (s)", title=f"time on {device.type}, {dtype}")
ax_time.legend()
activation_bytes = [heads * n * head_dim * torch.finfo(dtype).bits // 8 for n in lengths]
ax_mem.loglog(lengths, score_bytes, "k--", label="L×L score matrix (computed)")
ax_mem.loglog(lengths, activation_bytes, "k:", label="one (B, H, L, d) activation (computed)")
if not on_gpu:
    for name, style in zip(methods, ["o-", "x--", "s:", "d-"]):
        measured = [b if b > 0 else float("nan") for b in cpu_peak[name]]   # 0 cannot go on a log axis
        ax_mem.loglog(lengths, measured, style, label=f"{name}: peak RSS growth (measured)")
ax_mem.set(xlabel="sequence length L", ylabel="bytes", title="memory: what the naive version must store")
for ax in (ax_time, ax_mem):
    ax.xaxis.set_minor_formatter(plt.NullFormatter())             # label only the powers of ten
ax_mem.legend()
fig.tight_layout()
save_figure(fig, "00_quadratic_wall")
plt.show()

if not SMOKE and not on_gpu:
    # At full size, the largest length that ran: the naive version really holds the L×L scores, SDPA
    # does not. (Smoke sizes are too small: the allocator reuses memory it already holds.)
    largest = max(i for i, t in enumerate(seconds["naive"]) if np.isfinite(t))
    if np.isfinite(cpu_peak["naive"][largest]):
        assert cpu_peak["naive"][largest] >= score_bytes[largest] > cpu_peak["SDPA"][largest]

# %% [markdown]
# ## What Megalodon claims, and what this book checks
#
# The paper (Ma et al. 2024) reports, for a 7B-parameter model trained on 2 trillion tokens in a
# controlled comparison with Llama2:
#
# - **training loss 1.70** for Megalodon-7B against **1.75** for Llama2-7B (and 1.67 for Llama2-13B);
# - **speed**: about **6% slower** than Llama2-7B at a 4K context but about **32% faster** at 32K,
#   because the attention cost stays linear in the context;
# - **unlimited context length**: the model reads a stream of any length with memory that does
#   not grow, since everything that crosses a chunk boundary is a fixed-size state.
#
# Those are the paper's numbers; nothing in this notebook reproduces a 7B run. The book builds the
# architecture piece by piece, checks every piece against a slow reference, and then tests the
# claims at a scale one GPU can afford:
#
# | chapter | topic | what it establishes |
# |---|---|---|
# | 00 | why Megalodon | the quadratic wall, measured (this chapter) |
# | 01 | the exponential moving average | recurrence = convolution = FFT; `fft_causal_conv` |
# | 02 | MEGA's damped, multi-dimensional EMA | several decays per channel, its kernel |
# | 03 | MEGA's gated attention | the MEGA layer around the EMA |
# | 04 | CEMA, the complex EMA | the rotating, decaying kernel Megalodon uses |
# | 05 | timestep normalization | causal group norm with running statistics |
# | 06 | normalized chunk attention | attention inside chunks, normalised q and k |
# | 07 | the model and streaming | the full model; pieces of a stream give the same logits as the whole, at constant memory |
# | 08 | Triton kernels for the scans | CEMA and TimestepNorm as fused GPU kernels, against their memory floor |
# | 09 | a Triton kernel for chunk attention | attention with a value dim of 2048, against its compute floor |
# | 10 | training against a Llama-style baseline | loss, tokens per second and memory as the context grows; the `train` command |
# | 11 | chunk parallelism | splitting one long sequence across processes or GPUs |
#
# The "unlimited context" claim is tested directly in chapter 07 (streaming equals one long call,
# with a state whose size does not depend on the stream length); the loss and speed claims are
# tested, in direction rather than in magnitude, by the training run of chapter 10.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against a reference on random inputs and prints a pass, "not yet implemented", or what
# differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** In the measurement above, by about what factor does the time of naive
# attention grow when $L$ doubles from 512 to 1024, and that of the cumulative mean? Write down your
# prediction, then read both rows of the table. Why can the smallest sizes disagree with it?
#
# ### BEGIN SOLUTION
# About $2^2 = 4$ for naive attention (its work and its score matrix grow as $L^2$) and about 2 for
# the cumulative mean (one pass over the tokens). At the smallest sizes both grow more slowly than
# that: fixed costs per call (Python, dispatch, kernel launches) that do not depend on $L$ are a
# large share of a short call, which flattens every curve. That is why the slopes are fitted over
# the larger sizes only.
# ### END SOLUTION

# %% [markdown]
# **2. Derive.** Llama-2-7B has 32 attention heads in each layer. In bfloat16 (2 bytes per number),
# how many bytes would the materialised causal scores of one layer take for one sequence of
# $L = 32{,}768$ tokens? And with attention only inside chunks of $c = 4096$ tokens, as in
# Megalodon-7B? What is the ratio of the two in general?
#
# ### BEGIN SOLUTION
# Full attention: $B H L^2 \cdot 2 = 32 \cdot 32768^2 \cdot 2 = 2^{36}$ bytes $= 64$ GiB, for one
# layer of one sequence. Inside chunks there are $L/c$ score matrices of $c \times c$, so
# $B H (L/c) c^2 \cdot 2 = B H L c \cdot 2 = 32 \cdot 32768 \cdot 4096 \cdot 2 = 2^{33}$ bytes
# $= 8$ GiB. The ratio is $L / c$ (here 8): it grows with the context, because the chunked cost is
# linear in $L$ and the full one quadratic. (Fused kernels store neither; the work keeps the same
# ratio.)
# ### END SOLUTION

# %% [markdown]
# **3. Write the memory formula.** `score_matrix_bytes(batch, heads, length, dtype)` returns the
# bytes of the $(B, H, L, L)$ score tensor that naive attention materialises, for a floating torch
# dtype. The check compares it with the bytes of the tensor PyTorch itself produces for
# `q @ k.transpose(-2, -1)`, built on the `meta` device (shapes and dtypes, no memory), for random
# sizes and dtypes.

# %%
import torch
import torch.nn.functional as F

from megalodon_lite.exercises import check


def score_matrix_bytes(batch: int, heads: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of the (batch, heads, length, length) attention scores held in ``dtype``."""
    ### BEGIN SOLUTION
    return batch * heads * length**2 * (torch.finfo(dtype).bits // 8)
    ### END SOLUTION


# %% tags=["check"]
def materialised_score_bytes(batch: int, heads: int, length: int, dtype: torch.dtype) -> int:
    """The bytes of q @ k^T as PyTorch builds it, on the meta device (no memory is allocated)."""
    q = torch.empty(batch, heads, length, 64, dtype=dtype, device="meta")
    return (q @ q.transpose(-2, -1)).nbytes


def score_sizes(generator: torch.Generator) -> tuple[int, int, int, torch.dtype]:
    batch, heads = (int(n) for n in torch.randint(1, 9, (2,), generator=generator))
    length = int(torch.randint(1, 70_000, (), generator=generator))
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return batch, heads, length, dtypes[int(torch.randint(len(dtypes), (), generator=generator))]


check(score_matrix_bytes, reference=materialised_score_bytes, make_inputs=score_sizes,
      hint="B · H · L² numbers, each of torch.finfo(dtype).bits // 8 bytes")

# %% [markdown]
# **4. Write the cheapest causal mixer.** `causal_mean(v)` takes values of shape (B, H, L, d) and
# returns, at every position $t$, the mean of $v_0, \dots, v_t$, in $O(L)$: one running sum, no
# $L \times L$ matrix. The check compares it with PyTorch's fused causal attention whose scores are
# all equal ($q = 0$): attention that cannot choose its weights is a running mean.

# %%
def causal_mean(v: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, H, L, d): position t holds the mean of v[..., :t + 1, :]."""
    ### BEGIN SOLUTION
    counts = torch.arange(1, v.shape[-2] + 1, dtype=v.dtype, device=v.device)
    return v.cumsum(dim=-2) / counts[:, None]
    ### END SOLUTION


# %% tags=["check"]
def attention_with_equal_scores(v: torch.Tensor) -> torch.Tensor:
    zeros = torch.zeros_like(v)
    return F.scaled_dot_product_attention(zeros, zeros, v, is_causal=True)


def random_values(generator: torch.Generator) -> tuple[torch.Tensor]:
    batch, heads, length, dim = (int(n) for n in torch.randint(1, 33, (4,), generator=generator))
    return (torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64),)


check(causal_mean, reference=attention_with_equal_scores, make_inputs=random_values,
      hint="torch.cumsum along the length dimension (-2), then divide position t by t + 1")


# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# The peak memory each method allocates beyond its inputs, at the lengths timed in the measurement
# section, read from PyTorch's CUDA allocator (`torch.cuda.max_memory_allocated`): exact, unlike
# the CPU's resident-memory lower bound. The naive version's peak grows as $L^2$ and soon exceeds
# the device; the fused kernels stay linear.

# %% tags=["gpu"]
cuda = require_cuda()


def peak_bytes(fn, q, k, v) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(q, k, v)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


gpu_peak = {name: [] for name in methods}
for length in lengths:
    q, k, v = (torch.randn(1, heads, length, head_dim, device=cuda, dtype=dtype) for _ in range(3))
    for name, fn in methods.items():
        peak = float("nan")
        if name != "naive" or naive_fits(length):
            try:
                peak = peak_bytes(fn, q, k, v)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        gpu_peak[name].append(peak)
    del q, k, v
    torch.cuda.empty_cache()

print(f"{'L':>7} " + " ".join(f"{name + ' MiB':>19}" for name in methods) + f" {'naive / L×L scores':>19}")
for i, length in enumerate(lengths):
    print(f"{length:>7} " + " ".join(cell(gpu_peak[name][i], 2**-20) for name in methods)
          + cell(gpu_peak["naive"][i] / score_bytes[i], 1.0))
fig_gpu, ax_gpu = plt.subplots(figsize=(6, 4.5))
for name, style in zip(methods, ["o-", "x--", "s:", "d-"]):
    ax_gpu.loglog(lengths, gpu_peak[name], style, label=name)
ax_gpu.loglog(lengths, score_bytes, "k--", label="L×L score matrix (computed)")
ax_gpu.set(xlabel="sequence length L", ylabel="peak bytes beyond the inputs",
           title=f"measured peak memory, {torch.cuda.get_device_name(cuda)}")
ax_gpu.legend()
save_figure(fig_gpu, "00_gpu_peak_memory")
plt.show()
for i, length in enumerate(lengths):
    if np.isfinite(gpu_peak["naive"][i]):
        assert gpu_peak["naive"][i] >= score_bytes[i]               # it really stores the L×L scores
    assert gpu_peak["SDPA"][i] < score_bytes[i]                 # the fused kernel does not
