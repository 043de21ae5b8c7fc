"""Chapter 01's EMA widget: its contract, checked here rather than in the chapter (on the chapter's
own ``build_ema_widget``): each control redraws the picture, and coming back to a state draws the
same picture again."""

from __future__ import annotations

import pytest
from chapter_code import chapter_definitions

ipywidgets = pytest.importorskip("ipywidgets")


def test_each_control_redraws_and_a_state_always_draws_the_same_picture():
    widget = chapter_definitions("01")["build_ema_widget"]()
    (alpha, signal), image = widget.children[0].children, widget.children[1]
    assert isinstance(alpha, ipywidgets.FloatLogSlider) and alpha.description == "α"
    assert isinstance(signal, ipywidgets.SelectionSlider) and "step" in signal.options
    first = image.value
    assert first[:4] == b"\x89PNG"
    alpha.value = 0.5
    assert image.value != first
    alpha.value, signal.value = 0.1, "step"
    assert image.value not in (first, b"")
    signal.value = "noisy sine"
    assert image.value == first
