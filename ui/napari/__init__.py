"""livescope inside napari: a reader for livescope stores and a live dock widget.

The npe2 manifest (``napari.yaml``, entry point ``napari.manifest``: ``livescope``) contributes

- a reader: ``viewer.open(STORE, plugin="livescope")`` (or File > Open Folder… and pick
  livescope) opens every image of a store as a layer, with its frames not saved and its events
  (``_reader.py``);
- a dock widget, *Plugins > livescope live*: subscribes to a running daemon's previews and
  control socket and updates one layer per product in place (``_widget.py``); *Attach to the
  Micro-Manager core* streams the pymmcore-plus core of napari-micromanager (or
  ``CMMCorePlus.instance()``) to that daemon, starting one when none runs (``_attach.py``).

napari is imported here only, never by the rest of livescope: ``pip install "livescope[napari]"``.
"""

from __future__ import annotations

__all__ = ["napari_get_reader", "read_store", "LiveWidget"]


def __getattr__(name: str) -> object:
    # the reader and the widget load on first use, as napari asks for them
    if name in ("napari_get_reader", "read_store"):
        from . import _reader

        return getattr(_reader, name)
    if name == "LiveWidget":
        from ._widget import LiveWidget

        return LiveWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
