"""A compact 2-D U-Net sized for live frames (torch).

The current frame comes in on channel 0, the ``k`` past frames of the same position and channel
on channels 1..k (most recent first; never a future frame). Height and width must be multiples
of ``2**depth``; :func:`pad_multiple` in ``inference`` takes care of that.

Only imported where torch is needed (training, the torch backend, ONNX export), so that
``import livescope.engines.denoise`` stays light.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MultiLag", "UNet", "build", "flops_and_traffic", "export_onnx"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skips; channels double per level up to ``max_channels``.

    No residual connection to the input: Noise2Void trains with the centre pixel replaced by a
    neighbour, and an identity path would learn to trust a value it never sees at inference.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 16,
        depth: int = 2,
        max_channels: int = 64,
        out_channels: int = 1,
        unshuffle: int = 1,
        skip: str = "cat",
    ):
        super().__init__()
        if skip not in ("cat", "add"):
            raise ValueError(f"skip must be 'cat' or 'add', not {skip!r}")
        self.in_channels = in_channels
        # skip "cat": the decoder block sees [upsampled, skip] (2w channels); "add": their sum
        # (w channels), which halves the FLOPs of each decoder block's first convolution, the
        # largest layers of the network (19 % of the shipped denoiser's FLOPs).
        self.skip = skip
        self.base = base
        self.max_channels = max_channels
        # unshuffle > 1: the levels run at 1/unshuffle of the resolution on unshuffle**2 times
        # the input channels (pixel unshuffle, shuffled back at the head): every pixel still
        # counts, with no full-resolution layer, which cuts the memory traffic that bounds
        # these thin convolutions on a CPU. ``depth`` counts the levels; ``self.depth`` also
        # counts the unshuffle, so that 2**self.depth is the size multiple either way.
        self.unshuffle = int(unshuffle)
        self.levels = depth
        self.depth = depth + (self.unshuffle.bit_length() - 1)
        f2 = self.unshuffle * self.unshuffle
        self.shuffle_in = nn.PixelUnshuffle(self.unshuffle) if self.unshuffle > 1 else nn.Identity()
        self.shuffle_out = nn.PixelShuffle(self.unshuffle) if self.unshuffle > 1 else nn.Identity()
        in_channels, out_channels = in_channels * f2, out_channels * f2
        widths = [min(base * 2**i, max_channels) for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(_block(cin, w))
            cin = w
        self.pool = nn.AvgPool2d(2)
        self.bottom = _block(widths[-2] if depth else in_channels, widths[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.merge.append(_block(widths[i] * (2 if skip == "cat" else 1), widths[i]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle_in(x)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1) if self.skip == "cat" else up(x) + skip)
        return self.shuffle_out(self.head(x))


class MultiLag(nn.Module):
    """Learned multi-lag predictors as a residual cascade: one small U-Net per lag.

    Input channels are the lagged inputs, longest lag first: for lag k the mean of the frames
    t-k ... t-2k+1 (its octave: t-1; t-2..t-3; t-4..t-7; t-8..t-15, so every past frame counts
    once and the long lags are less noisy). The first network predicts frame t from the longest
    lag alone (as its input plus a correction); each next one sees its own lag's input and the
    sum predicted so far, and predicts what is left. Output channel i is lag i's share;
    their sum is the prediction of frame t. The cascade decides which lag explains what: the t-1
    network never gets the chance to learn the background, because the t-8 network has
    already taken it.
    """

    def __init__(self, lags: int = 4, base: int = 8, depth: int = 2, max_channels: int = 32, unshuffle: int = 2):
        super().__init__()
        self.in_channels = lags
        self.base = base
        self.max_channels = max_channels
        self.unshuffle = unshuffle
        # Each stage works at 1/unshuffle of the resolution on unshuffle**2 times the channels
        # (pixel unshuffle, then shuffle back): every pixel still counts, at about a quarter of
        # the memory traffic, which is what bounds these thin layers on a CPU.
        f2 = unshuffle * unshuffle
        self.nets = nn.ModuleList(
            UNet(2 * f2, base=base, depth=depth, max_channels=max_channels, out_channels=f2) for _ in range(lags)
        )
        self.depth = depth + (unshuffle.bit_length() - 1)  # size multiple 2**depth, as UNet
        self.down = nn.PixelUnshuffle(unshuffle) if unshuffle > 1 else nn.Identity()
        self.up = nn.PixelShuffle(unshuffle) if unshuffle > 1 else nn.Identity()

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        # upto: run only the first stages (fitting them one after the other); the earlier,
        # frozen ones then run without gradients.
        n = len(self.nets) if upto is None else int(upto)
        cum = torch.zeros_like(x[:, :1])
        outs = []
        for i, net in enumerate(self.nets[:n]):
            frozen = upto is not None and i < n - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                share = self.up(net(self.down(torch.cat([x[:, i : i + 1], cum], dim=1))))
                if i == 0:
                    # The longest lag's input (the mean of its octave of frames) is already
                    # nearly the background: the network learns the correction, and converges
                    # fast. A slow start here would leave background for the shorter lags.
                    share = share + x[:, :1]
            outs.append(share)
            cum = cum + share
        return torch.cat(outs, dim=1)


def build(arch: dict[str, Any]) -> nn.Module:
    """The network described by a model file's ``architecture`` entry."""
    if arch.get("name") == "multilag2d":
        unshuffle = int(arch.get("unshuffle", 1))
        return MultiLag(
            lags=len(arch["lags"]),
            base=int(arch["base"]),
            depth=int(arch["depth"]) - (unshuffle.bit_length() - 1),
            max_channels=int(arch.get("max_channels", 32)),
            unshuffle=unshuffle,
        )
    if arch.get("name") != "unet2d":
        raise ValueError(f"unknown architecture {arch.get('name')!r}; this livescope knows 'unet2d' and 'multilag2d'")
    unshuffle = int(arch.get("unshuffle", 1))
    return UNet(
        in_channels=int(arch["in_channels"]),
        base=int(arch["base"]),
        depth=int(arch["depth"]) - (unshuffle.bit_length() - 1),
        max_channels=int(arch.get("max_channels", 64)),
        unshuffle=unshuffle,
        skip=str(arch.get("skip", "cat")),
    )


def flops_and_traffic(net: UNet, height: int = 512, width: int = 512) -> dict[str, float]:
    """Floating-point operations (multiply and add counted apart) and a lower bound of memory
    traffic (each layer reads its input and weights and writes its output once, float32) for
    one frame, measured by running the network on a dummy frame with hooks on every layer."""
    totals = {"flops": 0.0, "bytes": 0.0}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inp[0]
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            totals["flops"] += 2.0 * mod.in_channels * k * out.numel() // mod.groups
        elif isinstance(mod, nn.ConvTranspose2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            totals["flops"] += 2.0 * x.numel() * k * mod.out_channels
        else:
            totals["flops"] += float(out.numel())
        weights = sum(p.numel() for p in mod.parameters(recurse=False))
        totals["bytes"] += 4.0 * (x.numel() + out.numel() + weights)

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            net(torch.zeros(1, net.in_channels, height, width))
    finally:
        for h in handles:
            h.remove()
    totals["params"] = float(sum(p.numel() for p in net.parameters()))
    return totals


def export_onnx(net: UNet | MultiLag, opset: int = 17) -> bytes:
    """The ONNX graph with dynamic height and width (and batch), via the TorchScript-based
    exporter (``dynamo=False``): it needs no onnxscript and gives a plain static graph that
    onnxruntime and TensorRT's parser both take."""
    import io
    import warnings

    net = net.eval()
    buf = io.BytesIO()
    dummy = torch.zeros(1, net.in_channels, 2**net.depth * 4, 2**net.depth * 4)
    with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (see above)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (dummy,),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects; torch's hint says paths
            input_names=["frames"],
            output_names=["denoised"],
            dynamic_axes={
                "frames": {0: "batch", 2: "height", 3: "width"},
                "denoised": {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=opset,
            dynamo=False,
        )
    return buf.getvalue()
