"""The viewer's state and its table of actions, without Qt: what is shown, paused, overlaid,
levelled and focused, what the banner says, what the settings file keeps, and every action's
key and toolbar entry. Nothing here imports Qt (these tests run where PySide6 is missing)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from livescope.ui.actions import ACTIONS, BY_ID, STREAM_ITEMS, TOOLBAR, actions_markdown, shortcut_list
from livescope.ui.state import (
    EVENT_MARK_S,
    LEVELS_EVERY_S,
    SETTINGS_DEFAULTS,
    PanelLevels,
    ViewerState,
    best_columns,
    panel_order,
)

UI = Path(__file__).resolve().parents[2] / "ui"


def _header(**extra):
    return {"v": 1, **extra}


def _shown(state: ViewerState, stream: str = "s", now: float = 0.0, **axes) -> ViewerState:
    """A state showing ``stream``, which sent one raw preview at ``now``."""
    key = (stream, "raw", axes.get("p", 0), axes.get("c", 0), axes.get("z", 0))
    state.note_previews([(key, _header())], now)
    state.show_stream(stream, keys=[key])
    return state


# -- Qt stays out ------------------------------------------------------------------------------------


def test_the_state_and_the_actions_import_no_qt():
    import subprocess

    code = (
        "import sys, livescope.ui.state, livescope.ui.actions; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'pyqtgraph', 'zmq')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- frames in view ----------------------------------------------------------------------------------


def test_a_frame_updates_the_panels_only_when_it_is_the_shown_streams_selected_position_channel_and_z():
    st = ViewerState()
    key = ("camA", "raw", 0, 0, 0)
    assert not st.accept_frame(key)  # no stream shown yet
    _shown(st, "camA")
    assert st.accept_frame(key)
    assert not st.accept_frame(("camB", "raw", 0, 0, 0))  # another camera
    assert not st.accept_frame(("camA", "raw", 0, 1, 0))  # another channel
    assert not st.accept_frame(("camA", "raw", 0, 0, 2))  # another z
    assert not st.accept_frame(("camA", "trust_raw", 0, 0, 0))  # a trust map tints, it is no panel
    assert st.in_view(("camA", "trust_raw", 0, 0, 0))
    st.set_paused(True)
    assert not st.accept_frame(key) and st.in_view(key)  # paused: the display is frozen


def test_previews_record_each_streams_axis_values_channel_names_and_products():
    st = ViewerState()
    noted = st.note_previews(
        [(("camA", "raw", 0, 0, 0), _header(channel="GFP")), (("camA", "raw", 0, 1, 0), _header(channel="mCherry"))],
        now=1.0,
    )
    assert noted.streams_changed and noted.axes == set()  # nothing shown yet: no selector to refill
    assert st.last_frame_at == 1.0
    st.show_stream("camA", keys=[("camA", "raw", 0, 0, 0)])
    assert st.seen["c"] == {0: "GFP", 1: "mCherry"} and st.products == {"raw"}
    noted = st.note_previews([(("camA", "deconvolved", 0, 0, 3), _header())], now=2.0)
    assert noted.axes == {"z"} and not noted.streams_changed
    assert st.products == {"raw", "deconvolved"} and 3 in st.seen["z"]
    noted = st.note_previews([(("snap", "raw", 0, 0, 0), _header(live=True))], now=2.0)
    assert noted.streams_changed and st.stream_labels == [("camA", "camA"), ("snap", "snap (live)")]


def test_the_overlay_takes_every_channel_at_the_selected_position_and_z():
    st = _shown(ViewerState(), "camA")
    assert not st.in_overlay(("camA", "raw", 0, 1, 0))  # off
    st.set_overlay(True)
    assert st.in_overlay(("camA", "raw", 0, 1, 0)) and st.in_overlay(("camA", "raw", 0, 0, 0))
    assert not st.in_overlay(("camA", "raw", 1, 1, 0)) and not st.in_overlay(("camB", "raw", 0, 1, 0))
    assert "one channel so far" in st.messages["overlay"][0]


# -- streams and selection ---------------------------------------------------------------------------


def test_each_stream_keeps_its_selection_and_a_pick_by_hand_stops_following():
    st = ViewerState()
    st.note_previews(
        [(("camA", "raw", 0, c, 0), _header()) for c in (0, 1)] + [(("camB", "raw", 0, 2, 0), _header())], now=0.0
    )
    start = st.selection
    assert st.show_stream("camA")
    assert st.selection is start  # the first stream shown keeps the viewer's starting selection
    assert st.select("c", 1) and not st.select("c", 1) and not st.select("c", None)
    assert st.show_stream("camB", by_user=True)
    assert st.selection == {"p": 0, "c": 2, "z": 0} and not st.follow
    assert not st.show_stream("camB")  # already shown
    st.show_stream("camA")
    assert st.selection["c"] == 1


def test_switching_streams_forgets_auto_levels_but_keeps_fixed_ones():
    st = _shown(ViewerState(), "camA")
    st.note_previews([(("camB", "raw", 0, 0, 0), _header())], now=0.0)
    st.set_levels("raw", (10, 20))
    st.set_levels("fast", (1, 2), fixed=True)
    st.note_seq("raw", 5)
    st.show_stream("camB")
    assert st.levels["raw"].values is None and st.levels["fast"].values == (1.0, 2.0)
    assert st.last_seq == {}


def test_following_live_mode_never_switches_while_paused():
    st = _shown(ViewerState(), "mmcore", now=0.0)
    st.note_previews([(("mmcore-live", "raw", 0, 0, 0), _header(live=True))], now=5.0)
    st.set_paused(True)
    assert st.follow_pick(5.0) is None
    st.set_paused(False)
    assert st.follow_pick(5.0) == "mmcore-live"
    st.say_followed("mmcore", "mmcore-live")
    assert st.messages["follow"][0].startswith("Now showing mmcore-live (live): mmcore sent nothing for 2 s")
    st.set_follow(False)
    assert "follow" not in st.messages and st.follow_pick(5.0) is None


def test_stepping_moves_among_the_values_seen_and_stops_at_the_ends():
    st = ViewerState()
    st.note_previews([(("s", "raw", 0, 0, z), _header()) for z in (0, 2, 5)], now=0.0)
    st.show_stream("s")
    assert st.step_target("z", +1) == 2
    st.select("z", 5)
    assert st.step_target("z", +1) == 5 and st.step_target("z", -1) == 2
    assert st.step_target("p", -1) == 0
    assert ViewerState().step_target("c", 1) is None  # nothing seen


# -- panels ------------------------------------------------------------------------------------------


def test_panels_show_in_order_when_not_hidden_and_their_product_is_in_the_shown_stream():
    st = _shown(ViewerState(), "s")
    st.products |= {"deconvolved", "slow", "residual"}
    names = ["slow", "composite", "residual", "deconvolved", "raw", "other"]
    assert st.visible_panels(names) == ["raw", "deconvolved", "slow", "composite"]  # residual hidden by default
    assert sorted(names, key=panel_order) == ["raw", "deconvolved", "slow", "composite", "residual", "other"]
    assert st.toggle_panel_number(names, 2) == ("deconvolved", False)
    assert "deconvolved" in st.hidden and st.toggle_panel_number(names, 2) == ("deconvolved", True)
    assert st.toggle_panel_number(names, 9) is None
    assert st.roi_product(names) == "deconvolved" and st.roi_product(["raw"]) is None


def test_the_grid_picks_the_column_count_that_makes_panels_largest():
    assert best_columns(1, 1600, 900) == 1
    assert best_columns(4, 1600, 900) == 2
    assert best_columns(3, 1600, 500) == 3  # a wide, low grid: one row
    assert best_columns(3, 500, 1600) == 1  # a tall one: one column


# -- levels ------------------------------------------------------------------------------------------


def test_levels_fixed_by_hand_stay_until_auto_contrast_or_auto_levels_on():
    st = ViewerState()
    lv = st.panel_levels("raw")
    assert lv is st.panel_levels("raw") and lv == PanelLevels(auto=True, values=None)
    st.set_levels("raw", (100, 900), fixed=True)
    assert not st.follows_auto_levels("raw") and lv.values == (100.0, 900.0)
    st.auto_contrast()
    assert st.follows_auto_levels("raw")
    st.set_levels("raw", (1, 2), fixed=True)
    st.set_auto_levels(False)
    assert not st.follows_auto_levels("raw")
    st.set_auto_levels(True)
    assert lv.auto and st.last_levels == 0.0  # recomputed at the next redraw


def test_levels_are_recomputed_once_a_second_not_per_frame():
    st = ViewerState()
    assert st.levels_due(10.0)
    assert not st.levels_due(10.0 + LEVELS_EVERY_S / 2)
    assert st.levels_due(10.0 + LEVELS_EVERY_S * 1.01)


# -- pause and the event in focus --------------------------------------------------------------------


def test_pause_toggles_and_going_live_clears_the_focused_event():
    st = ViewerState()
    st.toggle_pause()
    assert st.paused and "paused" in st.messages
    assert st.go_live() and not st.paused and "paused" not in st.messages
    assert not st.go_live()  # already live


def test_focusing_an_event_pauses_on_it_and_says_which_frame_is_shown():
    st = ViewerState()
    assert st.focus_event({"id": 1}) is None and not st.paused  # no seq: nothing happens
    event = {"id": 3, "seq": 40, "t": 40, "score": 9.0}
    assert st.focus_event(event) == 40
    assert st.paused and st.focused_event == event
    st.say_event(event, [37, 42], "assumed", 256)
    text = st.messages["event"][0]
    assert "event 3 at t 40 (seq 40, score 9.00)" in text and "seq 42" in text and "assumed scale" in text
    st.say_event(event, [], None, 256)
    assert (
        st.messages["event"][1] == "warn" and "no longer in the recent-frame buffer (256 MB)" in st.messages["event"][0]
    )
    st.go_live()
    assert st.focused_event is None and "event" not in st.messages


def test_the_newest_event_is_ringed_only_in_the_shown_view_and_for_a_few_seconds():
    st = _shown(ViewerState(), "s")
    assert st.event_to_mark([{"id": 1}]) is None  # no centroid
    ringed = {"id": 2, "centroid": [3, 4]}
    assert st.event_to_mark([ringed, {"id": 3}]) is ringed
    assert st.event_to_mark([{"id": 4, "centroid": [1, 1], "stream": "other"}]) is None
    assert st.event_to_mark([{"id": 5, "centroid": [1, 1], "z": 3}]) is None
    st.mark_event(100.0)
    assert not st.event_mark_expired(100.0 + EVENT_MARK_S - 0.1)
    assert st.event_mark_expired(100.0 + EVENT_MARK_S + 0.1)
    assert st.event_mark_until == 0.0 and not st.event_mark_expired(1e9)


# -- what the frames carry ---------------------------------------------------------------------------


def test_a_seq_that_goes_back_is_a_restart_and_is_said():
    st = ViewerState()
    assert not st.note_seq("raw", 10) and not st.note_seq("raw", 11) and not st.note_seq("raw", 10)
    assert st.note_seq("raw", 3)
    assert "restarted (seq 10 → 3)" in st.messages["stream"][0]


def test_trust_scores_keep_the_newest_sampled_checks():
    st = ViewerState()
    assert st.note_trust("denoised", {}) is None
    assert st.note_trust(
        "denoised", {"trust_denoised_score": 0.8, "trust_denoised_ok": 1.0, "trust_denoised_tta": 0.9}
    ) == (0.8, 1.0, {"tta": 0.9})
    assert st.note_trust("denoised", {"trust_denoised_score": 0.3, "trust_denoised_features": 0.2}) == (
        0.3,
        None,
        {"tta": 0.9, "features": 0.2},
    )
    assert ViewerState.consistency("restored", {"consistency": 0.2, "consistency_threshold": 0.4}) == (0.2, 0.4)
    assert ViewerState.consistency("denoised", {"consistency": 0.2}) is None


def test_novelty_is_taken_from_one_decomposition_product_only():
    st = _shown(ViewerState(), "s")
    st.products |= {"slow", "fast"}
    header = {"scalars": {"novelty": 2.5}, "index": {"t": 7}}
    assert st.novelty_point("slow", header, 70) == (7.0, 2.5)
    assert st.novelty_point("fast", header, 70) is None
    assert st.novelty_point("slow", {"scalars": {}}, 70) is None
    assert st.novelty_point("slow", {"scalars": {"novelty": 1.0}}, 70) == (70.0, 1.0)  # no t: the seq


def test_trust_overlay_says_when_no_trust_map_came_yet():
    st = _shown(ViewerState(), "s")
    st.set_trust_overlay(True, keys=[("s", "raw", 0, 0, 0)])
    assert "--engines trust" in st.messages["trust"][0]
    st.set_trust_overlay(False)
    assert "trust" not in st.messages
    st.set_trust_overlay(True, keys=[("s", "trust_denoised", 0, 0, 0)])
    assert st.trust_overlay and "trust" not in st.messages
    assert st.trust_map_key("denoised") == ("s", "trust_denoised", 0, 0, 0)


# -- the banner --------------------------------------------------------------------------------------


def test_the_banner_lists_the_most_severe_message_first_and_drops_expired_ones():
    st = ViewerState()
    assert st.banner(0.0) is None
    st.say("a", "info one", "info", now=0.0)
    st.say("b", "an error", "error", now=0.0)
    st.say("c", "for a second", "warn", seconds=1.0, now=0.0)
    assert st.banner(0.5) == ("error", "an error   ·   for a second   ·   info one")
    version = st.messages_version
    assert st.banner(2.0) == ("error", "an error   ·   info one")
    assert st.messages_version > version  # the expired one went: the banner is drawn again
    assert st.unsay("b") and not st.unsay("b")
    assert st.banner(2.0) == ("info", "info one")


def test_idle_and_a_quiet_stream_are_said_and_unsaid():
    st = ViewerState(started=0.0)
    st.check_idle(1.0, connected=True)
    assert "idle" not in st.messages
    st.check_idle(5.0, connected=True)
    assert "sends no frames yet" in st.messages["idle"][0]
    st = _shown(ViewerState(started=0.0), "camA", now=0.0)
    st.check_idle(5.0, connected=True)
    assert "No new frames for 5 s" in st.messages["idle"][0]
    st.note_previews([(("camB", "raw", 0, 0, 0), _header())], now=6.0)
    st.check_idle(6.0, connected=True)
    assert "idle" not in st.messages and "camA sent nothing for 6 s" in st.messages["quiet"][0]
    st.note_previews([(("camA", "raw", 0, 0, 0), _header())], now=7.0)
    st.check_idle(7.0, connected=True)
    assert "quiet" not in st.messages


def test_the_daemons_news_go_to_the_banner_and_events_are_bounded():
    st = ViewerState(control="tcp://x:1")
    st.note_link("down", "tcp://x:1")
    assert (
        st.messages["daemon"][1] == "error" and "No livescope daemon answers at tcp://x:1" in st.messages["daemon"][0]
    )
    st.note_link("up", None)
    assert st.messages["daemon"][0] == "Connected to the daemon again."
    st.note_link("refused", "bad token")
    assert "tcp://x:1 refuses this viewer: bad token" in st.messages["daemon"][0]
    st.note_link("reply", ({"cmd": "set", "engine": "denoise"}, {"ok": False, "error": "no"}))
    assert st.messages["reply"][0] == "The daemon refused set denoise: no"
    st.note_link("status", {"uptime_s": 3})
    assert st.status == {"uptime_s": 3}
    st.note_link("events", [{"id": i} for i in range(1500)])
    assert len(st.events) == 1000 and st.events[-1] == {"id": 1499}
    st.note_link("restarted", None)
    assert st.events == [] and "restarted" in st.messages["daemon"][0]


def test_the_display_rate_counts_redraws_over_two_seconds():
    st = ViewerState()
    for i in range(10):
        st.note_drawn(3, 10.0 + i * 0.1)
    st.note_drawn(0, 11.0)  # nothing drawn: not a redraw
    assert st.redraws == 10 and st.frames_drawn == 30
    assert st.display_fps(11.0) == 5.0
    assert st.display_fps(13.0) == 0.0


# -- the settings file -------------------------------------------------------------------------------


def test_a_layout_saved_by_the_earlier_viewer_loads_unchanged():
    saved = {
        "panels/hidden": ["fast", "residual"],
        "panels/cmaps": {"raw": "HiLo"},
        "levels/continuous": False,
        "view/overlay": True,
        "view/trust": False,
        "roi/visible": False,
        "roi/rect": [1, 2, 30, 40],
    }
    st = ViewerState.from_settings(saved)
    assert st.hidden == {"fast", "residual"} and st.cmaps == {"raw": "HiLo"} and not st.auto_levels
    assert st.overlay and not st.trust_overlay and not st.roi_visible and st.roi_rect == [1.0, 2.0, 30.0, 40.0]
    assert st.to_settings() == {**saved, "roi/rect": [1.0, 2.0, 30.0, 40.0]}


def test_missing_or_malformed_settings_fall_back_to_the_defaults():
    st = ViewerState.from_settings({})
    assert st.to_settings() == {k: v for k, v in SETTINGS_DEFAULTS.items() if k != "roi/rect"}
    st = ViewerState.from_settings({"panels/hidden": 3, "panels/cmaps": [], "roi/rect": [1, 2]})
    assert st.hidden == {"residual"} and st.cmaps == {} and st.roi_rect is None


# -- the table of actions ----------------------------------------------------------------------------


def test_the_f1_list_is_the_one_the_viewer_always_showed():
    assert shortcut_list() == [
        ("Space", "pause / resume the live display"),
        ("Esc", "back to live (after viewing an event)"),
        ("A", "auto-contrast every panel now"),
        ("L", "continuous auto-levels on/off"),
        ("F", "fit the image to the panels"),
        ("R", "show / hide the ROI"),
        ("1 … 9", "show / hide panel 1 … 9"),
        ("[  ]", "previous / next channel"),
        ("O", "overlay all channels in their colours on/off"),
        ("T", "trust map on/off: tint regions the trust engine does not vouch for"),
        ("PgUp  PgDn", "previous / next z plane"),
        ("Ctrl+S", "snapshot of the window to PNG"),
        ("Ctrl+T", "telemetry panel"),
        ("Ctrl+E", "engine controls"),
        ("Ctrl+B", "time strips (novelty, ROI)"),
        ("F1", "this list"),
        ("Ctrl+Q", "quit"),
    ]


def test_every_action_has_a_unique_id_and_key():
    ids = [a.id for a in ACTIONS]
    keys = [a.shortcut for a in ACTIONS if a.shortcut]
    assert len(ids) == len(set(ids)) == len(BY_ID)
    assert len(keys) == len(set(keys))
    assert {str(i) for i in range(1, 10)} <= set(keys)


def test_every_toolbar_entry_is_an_action_with_a_label_and_a_tooltip_naming_its_key():
    placed = [item for item in TOOLBAR if item != "|" and not item.startswith("@")]
    assert sorted(placed) == sorted(a.id for a in ACTIONS if a.widget)
    assert set(STREAM_ITEMS) <= set(TOOLBAR)
    for item in placed:
        action = BY_ID[item]
        assert action.label and action.tooltip and action.widget in ("button", "checkbox")
        if action.shortcut:
            assert f"({action.shortcut}" in action.tooltip, action.tooltip


def test_every_toggle_shows_a_viewer_state_attribute_and_every_state_name_exists():
    st = ViewerState()
    for action in ACTIONS:
        if action.toggle:
            assert isinstance(getattr(st, action.checked), bool), action.id
        if action.state:
            assert hasattr(st, action.state), (action.id, action.state)


def test_every_action_calls_a_method_the_viewer_has():
    tree = ast.parse((UI / "viewer.py").read_text(encoding="utf-8"))
    viewer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LiveViewer")
    methods = {n.name: n for n in viewer.body if isinstance(n, ast.FunctionDef)}
    for action in ACTIONS:
        assert action.method in methods, action.method
        signature = methods[action.method].args
        params = [a.arg for a in signature.args][1:]
        given = len(action.args) + action.toggle
        assert len(params) - len(signature.defaults) <= given <= len(params), (action.id, params)


def test_the_docs_list_every_action_as_the_table_says():
    docs = (UI.parent / "docs" / "viewer.md").read_text(encoding="utf-8")
    assert actions_markdown() in docs


@pytest.mark.parametrize("action_id", ["pause", "auto_levels", "roi", "overlay", "trust_map", "follow_live"])
def test_a_toggles_key_flips_its_state(action_id):
    """What the viewer's ``trigger`` does for a toggle, on the state alone."""
    st = _shown(ViewerState(), "s")
    action = BY_ID[action_id]
    before = getattr(st, action.checked)
    state_method = getattr(st, action.state)
    state_method(*action.args, not before)
    assert getattr(st, action.checked) is (not before)
