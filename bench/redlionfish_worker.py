"""RedLionfish side of bench/bench_deconvolve.py: runs in RedLionfish's own venv, imports nothing
of livescope, and answers one JSON request per stdin line with one JSON line on stdout.

    python bench/redlionfish_worker.py DIR      # DIR holds data.npy (z, y, x) and psf.npy (z, y, x)

Requests: ``{"load": true}`` (read DIR/data.npy and DIR/psf.npy), then ``{"path": P, "niter":
N, "save": bool}``; the reply gives the seconds the call took, timed here (no pipe or file
transfer in it), and, if ``save``, writes DIR/out.npy. Paths:

- ``opencl``: RedLionfish's user-facing ``doRLDeconvolutionFromNpArrays(method="gpu")``, which
  builds its OpenCL context, kernels and FFT plan on every call (Reikna complex FFTs);
- ``opencl-warm``: its ``RLDeconv3DReiknaOCL`` object made and given the PSF once, then only
  ``doRLDeconvolution`` per call: the best a live tool built on it could do;
- ``scipy``: ``method="cpu"`` (scipy.fft, the DeconvolutionLab2-style loop).

All three are classic RL (matched back projector, the data as the first estimate), periodic
boundaries (the PSF is padded to the data's shape and circulated). On a machine without a GPU
the OpenCL device is pocl's CPU driver (pocl-binary-distribution).

Set up (Python 3.11): ``python -m venv /tmp/rlf-venv && /tmp/rlf-venv/bin/pip install
redlionfish pyopencl pocl-binary-distribution``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import pyopencl as cl
    import RedLionfishDeconv as rl
    from RedLionfishDeconv import RLDeconv3DReiknaOCL as rlo

    folder = Path(sys.argv[1])
    device = cl.get_platforms()[0].get_devices()[0]
    print(json.dumps({"ready": True, "opencl_device": f"{device.platform.name}: {device.name}"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("load"):  # (re)read the inputs; the warm object is set up outside any timing
            data = np.load(folder / "data.npy").astype(np.float32)
            psf = np.load(folder / "psf.npy").astype(np.float32)
            warm = rlo.RLDeconv3DReiknaOCL(data.shape)
            warm.setPSF(psf)
            warm.doRLDeconvolution(data, niter=1)  # kernels compiled, plan made
            print(json.dumps({"loaded": list(data.shape)}), flush=True)
            continue
        n = int(req["niter"])
        t = time.perf_counter()
        if req["path"] == "opencl":
            out = rl.doRLDeconvolutionFromNpArrays(data, psf, niter=n, method="gpu", resAsUint8=False)
        elif req["path"] == "opencl-warm":
            out = warm.doRLDeconvolution(data, niter=n)
        elif req["path"] == "scipy":
            out = rl.doRLDeconvolutionFromNpArrays(data, psf, niter=n, method="cpu", resAsUint8=False)
        else:
            raise ValueError(f"unknown path {req['path']!r}")
        seconds = time.perf_counter() - t
        if req.get("save"):
            np.save(folder / "out.npy", np.asarray(out, np.float32))
        print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
