"""What the viewer's telemetry says of completion and resolution (ui/telemetry.py), from a daemon status."""

from __future__ import annotations

from livescope.ui.telemetry import COLORS, completion_text, status_line


def _st(state="running", **comp):
    return {"state": state, "completion": comp}


def test_frames_to_go_with_time_left_in_warning_colour():
    text, colour = completion_text(_st(mode="during", frames_to_go=120, frames_completed=30, eta_s=12.4))
    assert text == "120 to go, ~12 s" and colour == COLORS["warn"]


def test_after_mode_says_it_waits_for_the_end_of_the_run():
    text, _ = completion_text(_st(mode="after", frames_to_go=40, frames_completed=0, eta_s=None))
    assert text == "40 to go after the run"
    text, _ = completion_text(_st("completing", mode="after", frames_to_go=40, frames_completed=3, eta_s=4.0))
    assert text == "40 to go, ~4 s"


def test_complete_and_off_and_an_old_daemon():
    assert completion_text(_st(mode="during", frames_to_go=0, frames_completed=59)) == (
        "complete (59 caught up)",
        COLORS["ok"],
    )
    assert completion_text(_st(mode="off")) == ("off", None)
    assert completion_text({"state": "running"}) == ("–", None)  # a daemon without completion


def test_the_status_line_mentions_products_only_while_frames_are_to_go():
    base = {"frames": {}, "fps": {}}
    assert "products" not in status_line({**base, **_st(mode="during", frames_to_go=0)}, 30)
    assert "products: 7 to go" in status_line({**base, **_st(mode="during", frames_to_go=7, eta_s=1.0)}, 30)


def test_the_resolution_readout_from_a_status_raw_first_without_nan():
    from livescope.ui.telemetry import resolution_points

    st = {"scalars": {"resolution_deconvolved_nm": 280.5, "resolution_raw_nm": 541.0, "resolution_x_nm": float("nan"),
                      "novelty": 0.3}}  # fmt: skip
    assert resolution_points(st) == [("raw", 541.0), ("deconvolved", 280.5)]
    assert resolution_points({}) == []
