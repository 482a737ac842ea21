"""The viewer's choice of stream, without Qt: first-seen order, following live mode, a pick by
hand that sticks, each stream's own position / channel / z."""

from __future__ import annotations

import pytest

from livescope.ui.streams import StreamChooser


def test_follows_the_first_stream_then_live_mode_once_the_shown_one_is_quiet():
    ch = StreamChooser(quiet_s=2.0)
    assert ch.auto_pick(0.0) is None  # nothing seen yet
    ch.note("camA", 0.0)
    ch.note("camB", 0.1)
    assert ch.auto_pick(0.1) == "camA"
    ch.select("camA")
    assert ch.names() == ["camA", "camB"] and ch.several
    # live mode starts while camA still sends: camA stays
    ch.note("mmcore-live", 1.0, live=True)
    ch.note("camA", 1.5)
    assert ch.label("mmcore-live") == "mmcore-live (live)" and ch.label("camA") == "camA"
    assert ch.auto_pick(3.4) is None  # camA quiet for 1.9 s: not yet
    # camA quiet for more than 2 s, live still sending: show live
    ch.note("mmcore-live", 3.4, live=True)
    assert ch.auto_pick(3.6) == "mmcore-live"
    # but not a live stream that itself went quiet
    assert ch.auto_pick(5.5) is None
    ch.select("mmcore-live")
    ch.note("mmcore-live", 5.0, live=True)
    ch.note("camA", 5.0)
    assert ch.auto_pick(5.5) is None  # live sends: it stays, though camA sends again
    # live mode stops, the acquisition goes on: back to it (the first-seen stream that sends)
    ch.note("camB", 8.0)
    ch.note("camA", 8.0)
    assert ch.auto_pick(6.9) is None and ch.auto_pick(8.0) == "camA"


def test_an_ordinary_stream_never_replaces_another_by_itself():
    ch = StreamChooser(quiet_s=2.0)
    ch.note("camA", 0.0)
    ch.select("camA")
    ch.note("camB", 9.0)  # camA between two time points of a time-lapse, camB streaming
    assert ch.auto_pick(9.0) is None


def test_a_pick_by_hand_sticks_and_following_can_be_turned_on_again():
    ch = StreamChooser(quiet_s=2.0)
    ch.note("camA", 0.0)
    ch.note("mmcore-live", 0.0, live=True)
    ch.select("camA", by_user=True)
    assert not ch.follow
    ch.note("mmcore-live", 10.0, live=True)
    assert ch.auto_pick(10.0) is None  # camA quiet for 10 s, live sending: the user's pick stays
    ch.follow = True
    assert ch.auto_pick(10.0) == "mmcore-live"
    with pytest.raises(KeyError, match="seen: camA, mmcore-live"):
        ch.select("camC")


def test_each_stream_keeps_its_own_position_channel_and_z():
    ch = StreamChooser()
    a = ch.note("camA", 0.0)
    a.seen["c"].update({0: "GFP", 1: "mCherry"})
    b = ch.note("camB", 0.0)
    b.seen["c"][2] = "Cy5"  # camB has channel 2 only: shown at its own first channel
    b.seen["p"][0] = "0"
    sel_a = ch.select("camA")
    assert sel_a == {"p": 0, "c": 0, "z": 0}
    sel_a["c"] = 1  # what the viewer's channel selector does
    assert ch.select("camB") == {"p": 0, "c": 2, "z": 0}
    assert ch.select("camA") == {"p": 0, "c": 1, "z": 0}  # restored
    assert ch.info().name == "camA" and ch.info("camB") is b
