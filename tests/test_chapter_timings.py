"""The cost claims of chapters 00 and 06, checked here rather than in the chapters.

A chapter prints and plots its timings; whether one curve grows faster than another is asserted
here, where the sizes can be chosen for the claim (large enough that the quadratic term dominates,
small enough to take a second or two) and the margins for a busy 2-core machine:

- one thread (a second one only adds waiting on a shared machine);
- rounds over all calls rather than all repeats of one call in a row, so a burst of other work
  slows one call of every size instead of every call of one size;
- the fastest of several rounds (other work on the machine only ever adds time);
- slopes compared with a margin of 0.5 on log-log axes, where the claims predict a gap of 1.

Chapter 06's claim is also checked by counting floating-point operations, which do not depend
on the machine at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chapter_code import chapter_definitions
from torch.utils.flop_counter import FlopCounterMode

from megalodon_lite.attention import ChunkAttention
from megalodon_lite.notebook import time_call

ROUNDS = 7
SLOPE_MARGIN = 0.5  # the claims predict slope 2 against slope 1 (or less, where overhead still counts)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fastest_of_rounds(calls: dict, rounds: int = ROUNDS) -> dict:
    """Seconds per call, the fastest of ``rounds`` interleaved rounds (round 0 warms up, untimed)."""
    samples = {key: [] for key in calls}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for key, call in calls.items():
                seconds = time_call(call, repeats=1, warmup=0, device="cpu")
                if round_:
                    samples[key].append(seconds)
    return {key: min(values) for key, values in samples.items()}


def slope(lengths: list[int], values: list[float]) -> float:
    """The exponent p of values ∝ L^p, fitted on log-log axes."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def test_chapter_00_attention_time_grows_faster_than_the_linear_mixers(one_thread):
    """Chapter 00: naive attention and SDPA grow as L^2, chunked attention and the cumulative mean
    at most linearly (the chapter's own four functions)."""
    chunk = 64
    chapter = chapter_definitions("00", chunk=chunk)
    names = ("naive_attention", "sdpa_attention", "chunked_attention", "cumulative_mean")
    methods = {name: chapter[name] for name in names}
    lengths = [128, 256, 512, 1024]  # at longer lengths PyTorch's CPU causal SDPA switches block sizes
    calls = {}
    for length in lengths:
        q, k, v = (torch.randn(1, 2, length, 64) for _ in range(3))
        for name, fn in methods.items():
            calls[name, length] = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)
    seconds = fastest_of_rounds(calls)
    slopes = {name: slope(lengths, [seconds[name, n] for n in lengths]) for name in names}
    for quadratic in ("naive_attention", "sdpa_attention"):
        for linear in ("chunked_attention", "cumulative_mean"):
            assert slopes[quadratic] > slopes[linear] + SLOPE_MARGIN, (quadratic, linear, slopes)


def chunk_and_full(length: int, chunk: int, dim: int, use_sdpa: bool = True):
    z, v = torch.randn(1, length, dim), torch.randn(1, length, dim)
    modules = {"chunk attention": ChunkAttention(dim, dim, 1, chunk), "full causal attention": ChunkAttention(dim, dim, 1, length)}
    for module in modules.values():
        module.use_sdpa = use_sdpa
    return {name: (lambda module=module: module(z, v)) for name, module in modules.items()}


def test_chapter_06_chunk_attention_time_grows_slower_than_full_attention(one_thread):
    """Chapter 06: at a fixed chunk the cost of ChunkAttention grows linearly in L, that of full
    causal attention (the same module with one chunk) quadratically."""
    lengths, chunk, dim = [2048, 4096, 8192], 64, 32
    calls = {(name, length): call for length in lengths for name, call in chunk_and_full(length, chunk, dim).items()}
    seconds = fastest_of_rounds(calls)
    slopes = {name: slope(lengths, [seconds[name, n] for n in lengths])
              for name in ("chunk attention", "full causal attention")}
    assert slopes["chunk attention"] < slopes["full causal attention"] - SLOPE_MARGIN, slopes


def test_chapter_06_chunk_attention_work_is_linear_and_full_attention_quadratic():
    """The same claim in floating-point operations (the explicit path, whose matmuls PyTorch's
    FlopCounterMode counts): exactly L c d and L^2 d up to a constant, whatever the machine."""
    lengths, chunk, dim = [256, 512, 1024], 64, 32
    flops = {"chunk attention": [], "full causal attention": []}
    for length in lengths:
        for name, call in chunk_and_full(length, chunk, dim, use_sdpa=False).items():
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                call()
            flops[name].append(counter.get_total_flops())
    assert all(count > 0 for counts in flops.values() for count in counts), flops
    assert slope(lengths, flops["chunk attention"]) == pytest.approx(1.0, abs=1e-6), flops
    assert slope(lengths, flops["full causal attention"]) == pytest.approx(2.0, abs=1e-6), flops
