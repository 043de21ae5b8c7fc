"""kernels/cema_arithmetic.py: the multiply-adds it counts follow the kernels' product shapes, and the
committed record (kernels/results/cema_arithmetic_h200_v4.json, which chapter 08 and the README quote)
is what the script computes from the committed tuning file it names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.test_floors import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def arithmetic():
    return load_script("cema_arithmetic")


def test_multiply_adds_per_token_channel_follow_the_product_shapes(arithmetic):
    config = {"chunk": 16, "chunk_grad": 16}
    macs = arithmetic.macs_per_token_channel(config, n_states=16)
    # a complex table is 2 NP per token; the Toeplitz product and the lag correlation C per token
    assert macs["forward"] == {"_cema_segment_end_kernel": 64, "_cema_scan_kernel": 16 + 64}
    assert macs["backward"] == {"_cema_segment_end_kernel": 32, "_cema_scan_kernel": 80,
                                "_cema_grad_sums_kernel": 16 + 128}
    padded = arithmetic.macs_per_token_channel({"chunk": 32, "chunk_grad": 16}, n_states=12)   # NP = 16
    assert padded["forward"]["_cema_scan_kernel"] == 32 + 64


def test_the_committed_record_is_what_the_script_computes(arithmetic):
    record = json.loads((ROOT / "kernels" / "results" / "cema_arithmetic_h200_v4.json").read_text())
    tuning = json.loads((ROOT / record["source"]["file"]).read_text())
    assert record["source"]["date"] == tuning["date"] and record["source"]["command"] == tuning["command"]
    fresh = arithmetic.analyse(tuning, record["variant"], record["n_states"])
    assert fresh["config"] == record["config"]
    for mine, theirs in zip(fresh["shapes"], record["shapes"], strict=True):
        for key, value in theirs.items():
            if key == "kernels":
                assert [k["kernel"] for k in mine[key]] == [k["kernel"] for k in value]
                for a, b in zip(mine[key], value):
                    assert a["macs_per_token_channel"] == b["macs_per_token_channel"]
                    assert math.isclose(a["TFLOPs"], b["TFLOPs"], rel_tol=1e-12)
            elif isinstance(value, float):
                assert math.isclose(mine[key], value, rel_tol=1e-12), key
            else:
                assert mine[key] == value, key
    rates = [k["TFLOPs"] for shape in record["shapes"] for k in shape["kernels"]]
    assert 30 < min(rates) and max(rates) < 50      # the "about 40 TFLOP/s in every kernel" chapter 08 reads
