"""The one chain of engines that the live daemon, the Dask job and ``livescope process`` run."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest

from livescope.daemon import chain as chain_module
from livescope.daemon import distributed, pipeline, process
from livescope.daemon.chain import Chain, EngineSlot, event_record, number_events, slots_for
from livescope.engines import FrameInfo, StreamSpec, register_engine


@register_engine("test_chain_flaky")
class Flaky:
    """Doubles the frame, fails on the frames it is told to, says an event on every third."""

    name = "test_chain_flaky"
    outputs = ("doubled", "level")
    scalar_outputs = ("level",)

    def __init__(self, fail_on: tuple[int, ...] = (), nan_on: tuple[int, ...] = ()) -> None:
        self.fail_on, self.nan_on = set(fail_on), set(nan_on)
        self.seen = 0

    def setup(self, spec):
        self.spec = spec

    def process(self, frame, info):
        self.seen += 1
        if info.seq in self.fail_on:
            raise RuntimeError(f"cannot do seq {info.seq}")
        out = frame.astype(np.float32) * 2
        if info.seq in self.nan_on:
            out[0, 0] = np.nan
        res = {"doubled": out, "level": float(out.mean())}
        if info.seq % 3 == 0:
            res["events"] = [{"kind": "test", "score": np.float32(1.5)}]
        return res


def _spec(shape=(8, 8)):
    return StreamSpec(shape=shape, dtype="uint16", bits=16)


def _info(seq):
    return FrameInfo(seq=seq, timestamp=float(seq), index={"t": seq})


def test_a_frame_passes_down_the_chain_and_comes_back_as_images_scalars_and_events():
    chain = Chain.of(["test_chain_flaky", "passthrough"], {}, _spec())
    frame = np.full((8, 8), 3, np.uint16)
    made = chain.run(frame, _info(0))
    np.testing.assert_array_equal(made.images["doubled"], 6)
    # passthrough got what the first engine passes on (its first output), not the raw frame
    np.testing.assert_array_equal(made.images["passthrough"], 6)
    assert made.scalars == {"level": 6.0} and made.failed == []
    assert made.events == [{"kind": "test", "score": np.float32(1.5)}]
    assert made.outputs().keys() == {"doubled", "passthrough", "level"}


def test_offline_a_failing_engine_stops_the_run_with_its_error():
    chain = Chain.of(["test_chain_flaky"], {"test_chain_flaky": {"fail_on": (1,)}}, _spec())
    chain.run(np.ones((8, 8), np.uint16), _info(0))
    with pytest.raises(RuntimeError, match="cannot do seq 1"):
        chain.run(np.ones((8, 8), np.uint16), _info(1))


def test_live_a_failing_engine_passes_the_frame_on_and_is_disabled_after_failures_in_a_row(caplog):
    slots = slots_for(["test_chain_flaky", "passthrough"], {"test_chain_flaky": {"fail_on": (1, 3, 4, 5)}})
    disabled = []
    chain = Chain(
        slots,
        _spec(),
        strict=False,
        max_failures=3,
        on_disable=lambda slot, why: (disabled.append((slot.name, why)), slot.disable(why)),
    )
    frame = np.full((8, 8), 5, np.uint16)
    with caplog.at_level(logging.WARNING, logger=chain_module.__name__):
        made = chain.run(frame, _info(1))
    assert made.failed == ["doubled"]  # the image it owed; its scalar is just absent
    np.testing.assert_array_equal(made.images["passthrough"], frame)  # the raw frame went on
    assert "cannot do seq 1" in caplog.text
    assert chain.run(frame, _info(2)).failed == []  # a success resets the count
    assert slots[0].failures_in_row == 0 and slots[0].failures == 1 and slots[0].processed == 1
    for seq in (3, 4):
        chain.run(frame, _info(seq))
    assert slots[0].enabled
    chain.run(frame, _info(5))
    assert not slots[0].enabled and disabled and "3 failures in a row" in disabled[0][1]
    made = chain.run(frame, _info(6))  # disabled: skipped, nothing owed
    assert made.failed == [] and "doubled" not in made.images and "passthrough" in made.images


def test_live_refuses_non_finite_output_as_a_failure_offline_keeps_it():
    live = Chain(slots_for(["test_chain_flaky"], {"test_chain_flaky": {"nan_on": (2,)}}), _spec(), strict=False)
    made = live.run(np.ones((8, 8), np.uint16), _info(2))
    assert made.failed == ["doubled"] and "doubled" not in made.images
    offline = Chain.of(["test_chain_flaky"], {"test_chain_flaky": {"nan_on": (2,)}}, _spec())
    assert np.isnan(offline.run(np.ones((8, 8), np.uint16), _info(2)).images["doubled"][0, 0])


def test_live_a_slot_shared_by_two_chains_is_switched_off_for_both():
    slot = EngineSlot("passthrough")
    a, b = Chain([slot], _spec(), strict=False), Chain([slot], _spec((4, 4)), strict=False)
    slot.enabled = False
    assert a.run(np.ones((8, 8)), _info(0)).images == {} and b.run(np.ones((4, 4)), _info(0)).images == {}
    slot.enabled = True
    assert "passthrough" in b.run(np.ones((4, 4)), _info(1)).images
    assert slot.processed == 1


def test_a_chain_with_copied_slots_is_switched_on_and_off_on_its_own():
    """The completer's chains: a change reaches them at their own frame, not when the live one's does."""
    slot = EngineSlot("passthrough", {"delay_s": 0.0})
    live, behind = Chain([slot], _spec(), strict=False), Chain([slot.copy()], _spec(), strict=False)
    slot.enabled = False  # the live side: a disable command
    assert live.run(np.ones((8, 8)), _info(0)).images == {}
    assert "passthrough" in behind.run(np.ones((8, 8)), _info(0)).images  # still before the change
    behind.set_enabled("passthrough", False, "disabled by a control command")
    assert behind.run(np.ones((8, 8)), _info(1)).images == {} and behind.slots[0].reason
    assert behind.last_t == 1 and behind.slots[0].processed == 1 and slot.processed == 0
    assert behind.slots[0].params == slot.params and behind.slots[0].params is not slot.params


def test_an_unknown_engine_is_a_disabled_slot_that_says_why():
    slot = EngineSlot("no_such_engine")
    assert not slot.enabled and "unknown engine" in slot.reason
    assert Chain([slot], _spec(), strict=False).run(np.ones((8, 8)), _info(0)).images == {}


def test_state_fixed_on_a_first_frame_is_handed_to_a_chain_that_starts_later():
    from livescope.engines import create_engine
    from livescope.engines.base import CarriesState

    carriers = [n for n in ("deconvolve", "denoise") if isinstance(create_engine(n), CarriesState)]
    assert carriers, "an engine that carries state is needed for this test"
    spec = StreamSpec(shape=(32, 32), dtype="uint16", bits=16, pixel_size_um=0.1)
    first = Chain.of(["deconvolve"], {}, spec)
    rng = np.random.default_rng(0)
    first.run(rng.integers(100, 200, (32, 32)).astype(np.uint16), _info(0))
    state = first.first_frame_state()
    assert state and state[0]
    later = Chain.of(["deconvolve"], {}, spec, state=state)
    assert later.first_frame_state() == state


def test_events_carry_where_and_when_and_are_numbered_in_frame_order():
    rec = event_record(
        {"kind": "x", "v": np.int64(3)},
        seq=4,
        p=1,
        c=0,
        z=None,
        t=2,
        time_s=2.0,
        frame_shape=[8, 8],
        pixel_size_um=0.1,
        stream="camB",
    )
    assert rec["stream"] == "camB" and rec["v"] == 3 and type(rec["v"]) is int and "emitted" in rec
    assert "emitted" not in event_record(
        {}, seq=0, p=0, c=0, z=0, t=0, time_s=0, frame_shape=[1, 1], pixel_size_um=None, stamp=False
    )
    numbered = number_events(
        [{"_order": [2, 0, 0], "n": "b"}, {"_order": [1, 0, 1], "n": "a2"}, {"_order": [1, 0, 0], "n": "a1"}]
    )
    assert [(e["id"], e["n"]) for e in numbered] == [(1, "a1"), (2, "a2"), (3, "b")]


@pytest.mark.parametrize("module", [pipeline, distributed, process])
def test_the_live_the_dask_and_the_serial_runner_all_run_the_one_chain(module):
    source = inspect.getsource(module)
    assert "Chain" in source and ".run(" in source
    # no second copy of the chain's loop: nobody else calls an engine's process()
    assert "engine.process(" not in source and "eng.process(" not in source
