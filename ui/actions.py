"""Every user action of the viewer in one table: its toolbar entry, its key, and what it calls.

Plain Python (no Qt), so the table is tested alone. :class:`~.viewer.LiveViewer` builds its
toolbar (in the order of :data:`TOOLBAR`), its key shortcuts and the F1 list from :data:`ACTIONS`;
``docs/viewer.md`` lists them from :func:`actions_markdown`.

Each row names the ``LiveViewer`` method it calls (``method`` with ``args``). That method hands the
decision to :class:`~.state.ViewerState` (the row's ``state``: the ViewerState method or attribute
behind it; empty for actions on widgets alone: fit, snapshot, docks, the list, quit) and then
draws what the state says. A *toggle* (``checked`` set) shows the ViewerState attribute of that
name: its toolbar widget is ticked when the attribute is true, and its key calls ``method`` with
the attribute's opposite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Action", "ACTIONS", "BY_ID", "TOOLBAR", "STREAM_ITEMS", "shortcut_list", "actions_markdown"]


@dataclasses.dataclass(frozen=True)
class Action:
    """One user action.

    - ``label``: its text in the toolbar ("" for a key alone);
    - ``tooltip``: its tooltip there (``{quiet_s}`` is filled in with the stream chooser's);
    - ``shortcut``: its key, as Qt's QKeySequence reads it ("" for none);
    - ``method`` / ``args``: the LiveViewer method called (a toggle's value is added after ``args``);
    - ``state``: the ViewerState method or attribute behind it;
    - ``checked``: for a toggle, the ViewerState attribute it shows and flips;
    - ``widget``: "button" (a tool button), "checkbox", or "" (not in the toolbar);
    - ``help``: its line in the list of shortcuts (F1, docs/viewer.md); ``help_key``: the key as
      that list writes it (None: ``shortcut``; "": not listed, a neighbouring row says it).
    """

    id: str
    method: str
    args: tuple[Any, ...] = ()
    label: str = ""
    tooltip: str = ""
    shortcut: str = ""
    help: str = ""
    help_key: str | None = None
    state: str = ""
    checked: str = ""
    widget: str = ""

    @property
    def toggle(self) -> bool:
        return bool(self.checked)

    @property
    def listed_key(self) -> str:
        """The key as the list of shortcuts writes it ("" when the row is not listed)."""
        if not self.help or not self.shortcut:
            return ""
        return self.shortcut if self.help_key is None else self.help_key


def _panels() -> list[Action]:
    return [
        Action(
            f"panel_{i}",
            "toggle_panel_number",
            (i,),
            shortcut=str(i),
            state="toggle_panel_number",
            help="show / hide panel 1 … 9" if i == 1 else "",
            help_key="1 … 9" if i == 1 else "",
        )
        for i in range(1, 10)
    ]


# in the order of the list of shortcuts (F1)
ACTIONS: tuple[Action, ...] = (
    Action(
        "pause",
        "set_paused",
        label="Pause",
        tooltip="pause / resume the live display (Space)",
        shortcut="Space",
        help="pause / resume the live display",
        state="set_paused",
        checked="paused",
        widget="button",
    ),
    Action("go_live", "go_live", shortcut="Esc", help="back to live (after viewing an event)", state="go_live"),
    Action(
        "auto_contrast",
        "auto_contrast",
        label="Auto-contrast",
        tooltip="set every panel's levels from its current frame (A)",
        shortcut="A",
        help="auto-contrast every panel now",
        state="auto_contrast",
        widget="button",
    ),
    Action(
        "auto_levels",
        "set_auto_levels",
        label="Auto levels",
        tooltip="continuous percentile auto-levels (L)",
        shortcut="L",
        help="continuous auto-levels on/off",
        state="set_auto_levels",
        checked="auto_levels",
        widget="button",
    ),
    Action(
        "fit",
        "fit",
        label="Fit",
        tooltip="fit the image to the panels (F)",
        shortcut="F",
        help="fit the image to the panels",
        widget="button",
    ),
    Action(
        "roi",
        "set_roi_visible",
        label="ROI",
        tooltip="mean intensity in a rectangle over time (R)",
        shortcut="R",
        help="show / hide the ROI",
        state="set_roi_visible",
        checked="roi_visible",
        widget="button",
    ),
    *_panels(),
    Action(
        "channel_prev",
        "step",
        ("c", -1),
        shortcut="[",
        help="previous / next channel",
        help_key="[  ]",
        state="step_target",
    ),
    Action(
        "channel_next",
        "step",
        ("c", +1),
        shortcut="]",
        help="previous / next channel",
        help_key="",
        state="step_target",
    ),
    Action(
        "overlay",
        "set_overlay",
        label="Overlay channels",
        tooltip="every channel of this position and z in its colour, each at its own levels (O)",
        shortcut="O",
        help="overlay all channels in their colours on/off",
        state="set_overlay",
        checked="overlay",
        widget="checkbox",
    ),
    Action(
        "trust_map",
        "set_trust_overlay",
        label="Trust map",
        tooltip="tint in amber the regions a trust engine does not vouch for: the stronger, the lower their "
        "trust (T; docs/trust.md)",
        shortcut="T",
        help="trust map on/off: tint regions the trust engine does not vouch for",
        state="set_trust_overlay",
        checked="trust_overlay",
        widget="checkbox",
    ),
    Action(
        "z_prev",
        "step",
        ("z", -1),
        shortcut="PgUp",
        help="previous / next z plane",
        help_key="PgUp  PgDn",
        state="step_target",
    ),
    Action(
        "z_next", "step", ("z", +1), shortcut="PgDown", help="previous / next z plane", help_key="", state="step_target"
    ),
    Action(
        "snapshot",
        "snapshot",
        label="Snapshot",
        tooltip="save the window as PNG (Ctrl+S)",
        shortcut="Ctrl+S",
        help="snapshot of the window to PNG",
        widget="button",
    ),
    Action("telemetry", "toggle_dock", ("telemetry",), shortcut="Ctrl+T", help="telemetry panel"),
    Action("engines", "toggle_dock", ("engines",), shortcut="Ctrl+E", help="engine controls"),
    Action("time", "toggle_dock", ("time",), shortcut="Ctrl+B", help="time strips (novelty, ROI)"),
    Action("help", "show_help", shortcut="F1", help="this list"),
    Action("quit", "quit", shortcut="Ctrl+Q", help="quit"),
    Action(
        "follow_live",
        "set_follow",
        label="Follow live",
        tooltip="show a live-mode stream when it sends and the shown stream has been quiet for {quiet_s:g} s, "
        "and the acquisition again when live mode stops; off once you pick a stream",
        state="set_follow",
        checked="follow",
        widget="checkbox",
    ),
)

BY_ID: dict[str, Action] = {a.id: a for a in ACTIONS}

# The toolbar from left to right: action ids, "|" a separator, and the viewer's own widgets:
# "@panels" the Panels menu button, "@stream" the Stream label and selector, "@selectors" the
# position / channel / z selectors, "@spacer" a stretch, "@source" the preview address.
TOOLBAR: tuple[str, ...] = (
    "@panels",
    "|",
    "@stream",
    "follow_live",
    "|",
    "@selectors",
    "overlay",
    "trust_map",
    "|",
    "auto_levels",
    "auto_contrast",
    "fit",
    "|",
    "roi",
    "pause",
    "snapshot",
    "@spacer",
    "@source",
)
# shown only once a second stream was seen (with the separator that follows them)
STREAM_ITEMS: tuple[str, ...] = ("@stream", "follow_live")


def shortcut_list() -> list[tuple[str, str]]:
    """(key, what it does) for the F1 list, in the table's order; keys that share a line are listed once."""
    return [(a.listed_key, a.help) for a in ACTIONS if a.listed_key]


def actions_markdown() -> str:
    """The table of actions for docs/viewer.md (the ``ACTIONS`` rows, in order)."""
    rows = ["| action | toolbar | key | calls | ViewerState |", "|---|---|---|---|---|"]
    for a in ACTIONS:
        where = f"{a.label} ({a.widget})" if a.widget else ""
        args = ", ".join(repr(x) for x in a.args)
        call = f"`{a.method}({args}{', on' if a.toggle and args else 'on' if a.toggle else ''})`"
        state = f"`{a.state}`" if a.state else ""
        if a.checked and a.checked != a.state:
            state += f" (shows `{a.checked}`)"
        rows.append(f"| {a.id} | {where} | {a.shortcut} | {call} | {state} |")
    return "\n".join(rows) + "\n"
