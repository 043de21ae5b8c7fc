"""The exercises of chapters 08-10: their shape, both editions, and checks that catch the usual mistakes.

Each chapter ends its CPU part with `## Exercises` (CONTRIBUTING.md): 3-5 numbered exercises, each in
its own markdown cell, at least one cell tagged ``check``, solution regions only there, and the
section runs on its own. The teacher edition (the chapter as written) is run whole by nbval with
checks that must pass; here the student edition's section runs in a Jupyter kernel (everything
before it is the teacher edition's code: no solution region lies outside the section) and every
check says "not yet implemented"; the solutions put back into the stubs make every check pass.
Finally each checkable exercise's check rejects a typical wrong answer, so no check passes anything.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import math
import re

import nbformat
import pytest
import torch
import torch.nn.functional as F
from test_student import check_outputs, execute

import megalodon_lite.exercises
from megalodon_lite import book, student
from megalodon_lite.chapters import chapter_files, default_chapters_dir
from megalodon_lite.exercises import MUST_PASS_VARIABLE, NOT_IMPLEMENTED, run_check

CHAPTERS = {path.name[:2]: path for path in chapter_files(default_chapters_dir())}
NUMBERS = ["08", "09", "10"]
EXERCISE_NUMBER = re.compile(r"^\*\*(\d+)\. ", re.MULTILINE)  # "**2. Write the floors.** ..." opens exercise 2


def section_bounds(cells: list) -> tuple[int, int]:
    """[start, end) of the `## Exercises` section: its heading up to the next `## ` heading."""
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises"))
    end = next((i for i in range(start + 1, len(cells))
                if cells[i].cell_type == "markdown" and cells[i].source.startswith("## ")), len(cells))
    return start, end


def section(number: str) -> list:
    cells = book.read_chapter(CHAPTERS[number]).cells
    start, end = section_bounds(cells)
    return cells[start:end]


def test_student_sections_run_alone_and_the_solutions_make_every_check_pass(tmp_path, monkeypatch):
    """The student edition's sections in a fresh kernel: every check says "not yet implemented";
    then, in the same kernel, the teacher's cells in place of the stubs, where checks must pass.
    (One kernel for the three chapters: each section imports what it uses.)"""
    monkeypatch.delenv(MUST_PASS_VARIABLE, raising=False)  # a reader's kernel
    student_cells, teacher_cells, names = [], [], []
    for number in NUMBERS:
        notebook = student.student_notebook(CHAPTERS[number], "megalodon-lite")
        start, end = section_bounds(notebook.cells)
        cleared = notebook.cells[start:end]
        assert not any(student.BEGIN_SOLUTION in c.source for c in cleared), number
        stubs = [c for c in cleared if c.cell_type == "code" and "raise NotImplementedError()" in c.source]
        assert stubs and not any("raise NotImplementedError()" in c.source for c in section(number)), number
        student_cells += cleared
        teacher_cells += section(number)
        names += [re.search(r"^def (my_\w+)", c.source, re.MULTILINE).group(1) for c in stubs]
    must_pass = nbformat.v4.new_code_cell(f"import os\nos.environ[{MUST_PASS_VARIABLE!r}] = '1'")
    notebook.cells = student_cells + [must_pass] + teacher_cells
    outputs = check_outputs(execute(notebook, tmp_path))
    assert len(outputs) == 2 * len(names), outputs
    assert all(line.startswith(f"… {name}: {NOT_IMPLEMENTED}") for name, line in zip(names, outputs)), outputs
    assert all(line.startswith(f"✓ {name} agrees with ") for name, line in zip(names, outputs[len(names):])), outputs


# --- each check rejects a typical wrong answer


def recorded_checks(number: str, monkeypatch) -> dict:
    """Run chapter ``number``'s section (solutions in) in this process; return its checks by the
    reader's function name: (reference, make_inputs, options), as the section passed them."""
    recorded = {}
    real_check = megalodon_lite.exercises.check

    def recording_check(fn, reference, make_inputs, **options):
        recorded[fn.__name__] = (reference, make_inputs, options)
        real_check(fn, reference, make_inputs, **options)

    monkeypatch.setattr(megalodon_lite.exercises, "check", recording_check)
    monkeypatch.setenv(MUST_PASS_VARIABLE, "1")
    namespace: dict = {"__name__": f"exercises_{number}"}
    for index, cell in enumerate(section(number)):
        if cell.cell_type == "code":
            filename = f"<chapter {number} exercises cell {index}>"  # in linecache, as IPython does: triton.jit reads it
            linecache.cache[filename] = (len(cell.source), None, cell.source.splitlines(True), filename)
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(cell.source, filename, "exec"), namespace)  # noqa: S102 - the book's own chapter
    return recorded


def rejects(recorded: dict, name: str, wrong) -> str:
    reference, make_inputs, options = recorded[name]
    result = run_check(wrong, reference, make_inputs, **options)
    assert not result.passed and "Hint:" in result.message, result.message
    return result.message


def test_chapter_08_checks_reject_wrong_answers(monkeypatch):
    recorded = recorded_checks("08", monkeypatch)

    def floors_without_the_backward(batch, length, ceilings, bytes_per_element):
        forward = 2 * batch * length * 1024 * bytes_per_element / (ceilings.copy_TBps * 1e12) * 1e3
        return forward, 2 * forward

    rejects(recorded, "my_scan_floors_ms", floors_without_the_backward)

    def prefix(count0, mean0, var0, tile_count, tile_mean, tile_q, *, keep_var0=True, old_mean=True):
        count, mean, sum_sq = count0, mean0, count0[:, None] * var0
        counts, means, variances = [count0], [mean0], [var0]
        for j in range(tile_count.shape[1]):
            k, total = tile_count[:, j], count + tile_count[:, j]
            weight = (k / total.clamp_min(1))[:, None]
            new_mean = mean + weight * (tile_mean[:, j] - mean)
            gap = tile_mean[:, j] - (mean if old_mean else new_mean)
            sum_sq = sum_sq + tile_q[:, j] + count[:, None] * weight * gap.square()
            mean, count = new_mean, total
            var = sum_sq / count.clamp_min(1)[:, None]
            counts.append(count)
            means.append(mean)
            variances.append(torch.where(count[:, None] > 0, var, var0) if keep_var0 else var)
        return torch.stack(counts, 1), torch.stack(means, 1), torch.stack(variances, 1)

    assert run_check(prefix, *recorded["my_states_before_tiles"][:2], **recorded["my_states_before_tiles"][2]).passed
    rejects(recorded, "my_states_before_tiles", lambda *a: prefix(*a, keep_var0=False))
    rejects(recorded, "my_states_before_tiles", lambda *a: prefix(*a, old_mean=False))

    import triton
    import triton.language as tl

    @triton.jit
    def block_mean_kernel(x_ptr, y_ptr, length, channels, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        for start in range(0, length, BLOCK_T):  # forgets the sum of the blocks before
            t = start + tl.arange(0, BLOCK_T)
            inside = (t < length)[:, None] & (d < channels)[None, :]
            offsets = row * length * channels + t[:, None] * channels + d[None, :]
            sums = tl.cumsum(tl.load(x_ptr + offsets, mask=inside, other=0.0), 0)
            tl.store(y_ptr + offsets, sums / (t + 1).to(tl.float32)[:, None], mask=inside)

    def running_mean_of_each_block(x):
        y = torch.empty_like(x)
        block_mean_kernel[(x.shape[0], triton.cdiv(x.shape[2], 16))](x, y, x.shape[1], x.shape[2], BLOCK_T=16,
                                                                      BLOCK_D=16)
        return y

    rejects(recorded, "my_running_mean", running_mean_of_each_block)


def test_chapter_09_checks_reject_wrong_answers(monkeypatch):
    recorded = recorded_checks("09", monkeypatch)
    rejects(recorded, "my_attention_floor_ms",  # the full c x c square instead of the causal pairs
            lambda batch, length, ceilings: 2 * batch * length * 2048 * 2304 / (ceilings.matmul_TFLOPs * 1e12) * 1e3)

    def textbook_softmax(q, k, v):
        weights = torch.exp(q @ k.transpose(-1, -2)).tril()
        return weights / weights.sum(-1, keepdim=True) @ v

    assert "nan" in rejects(recorded, "my_lse_attention", textbook_softmax)
    rejects(recorded, "my_lse_attention", lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)  # no mask


def test_chapter_10_checks_reject_wrong_answers(monkeypatch):
    recorded = recorded_checks("10", monkeypatch)

    def scores(model, windows, *, bits=True, shift=True):
        with torch.no_grad():
            logits, _ = model(windows[:, :-1])
            targets = windows[:, 1:] if shift else windows[:, :-1]
            losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").double().mean(0)
        per_position = losses / (math.log(2) if bits else 1.0)
        return float(per_position.mean()), per_position

    assert run_check(scores, *recorded["my_bits_per_byte"][:2]).passed
    rejects(recorded, "my_bits_per_byte", lambda model, windows: scores(model, windows, bits=False))
    rejects(recorded, "my_bits_per_byte", lambda model, windows: scores(model, windows, shift=False))

    def cosine_to_zero(step, config):
        if step < config.warmup:
            return config.lr * (config.init_lr_ratio + (1 - config.init_lr_ratio) * step / config.warmup)
        progress = min(1.0, (step - config.warmup) / (config.steps - config.warmup))
        return config.lr * (1 + math.cos(math.pi * progress)) / 2

    rejects(recorded, "my_learning_rate", cosine_to_zero)

    def untied_count(config):
        D, V = config.model_dim, config.vocab_size
        return 2 * V * D + config.num_layers * (2 * D + 4 * D * D + 3 * D * config.ffn_hidden_dim) + D

    rejects(recorded, "my_llama_parameters", untied_count)
