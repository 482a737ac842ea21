"""livescope: a live companion for microscopes.

Subpackages (imports point one way):

- ``livescope.engines``: pure compute on arrays (deconvolution, denoising, decomposition, ...)
- ``livescope.bridges``: everything that talks to the outside (wire protocol, sources, stores)
- ``livescope.daemon``: composes engines and bridges (pipeline, control socket, CLI)
- ``livescope.ui``: the live viewer, a separate process subscribing to the daemon
"""

from __future__ import annotations

__version__ = "0.1.0"
