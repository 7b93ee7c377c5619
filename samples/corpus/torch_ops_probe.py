"""Torch function probe: each function after a Conv2d (8 channels), then a mean and a Linear, exported by both of
torch's exporters (dynamo, TorchScript at opset 17) into OUT and run through ``onnx-admm check``.

    python samples/corpus/torch_ops_probe.py OUT [NAME ...]

A function whose export leaves a node without a converter between the Conv and the Linear shows up as a failed
import, or, where the graph is cut there, as a warning that the score output lies past the trained part.
"""
import contextlib
import io
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from onnx_admm.check import check
class M(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.conv, self.f, self.fc = nn.Conv2d(8, 8, 3, padding=1), f, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.f(self.conv(x)).mean((2, 3)))
gn=nn.GroupNorm(2,8)
cases={
 "groupnorm": lambda y: gn(y),
 "pixel_unshuffle": lambda y: F.pixel_unshuffle(y,2)[:, :8],
 "pixel_shuffle": lambda y: F.pixel_shuffle(torch.cat([y,y],1).repeat(1,2,1,1),2)[:, :8],
 "normalize": lambda y: F.normalize(y, dim=1),
 "cumprod": lambda y: torch.cumprod(torch.sigmoid(y), 1),
 "hardtanh": lambda y: F.hardtanh(y),
 "silu": lambda y: F.silu(y),
 "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
 "logsigmoid": lambda y: F.logsigmoid(y),
 "instnorm": lambda y: F.instance_norm(y),
 "upsample_bilinear": lambda y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False),
 "upsample_ac": lambda y: F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True),
 "grid_sample": lambda y: F.grid_sample(y, torch.zeros(y.shape[0], 4, 4, 2) + 0.1, align_corners=False),
 "roll": lambda y: torch.roll(y, 1, 2),
 "flip": lambda y: torch.flip(y, [3]),
 "std": lambda y: y - y.std(1, keepdim=True),
 "topk": lambda y: y.flatten(2).topk(3, -1)[0].unsqueeze(-1),
 "sort": lambda y: y.flatten(2).sort(-1)[0].unsqueeze(-1),
 "masked_fill": lambda y: y.masked_fill(y > 0.5, 0.0),
 "einsum": lambda y: torch.einsum("nchw,nchw->nchw", y, y),
 "adaptive_pool": lambda y: F.adaptive_avg_pool2d(y, 3),
 "adaptive_max": lambda y: F.adaptive_max_pool2d(y, 2),
 "maxpool_idx": lambda y: F.max_pool2d(y, 2),
 "softmax2d": lambda y: F.softmax(y, 1),
 "erfinv": lambda y: torch.clamp(y, -0.9, 0.9).atanh(),
 "sinh": lambda y: torch.sinh(y),
 "mish": lambda y: F.mish(y),
 "elu_celu": lambda y: F.celu(y),
 "prelu": lambda y: F.prelu(y, torch.full((8,), 0.2)),
 "channel_shuffle": lambda y: y.view(y.shape[0], 2, 4, *y.shape[2:]).transpose(1, 2).reshape(y.shape),
}
OUT = sys.argv[1]
sel = sys.argv[2:] or list(cases)
for name in sel:
    for dyn in (True, False):
        m = M(cases[name]).eval(); x = torch.randn(2, 8, 8, 8)
        p = os.path.join(OUT, f"{name}_{'dyn' if dyn else 'ts'}.onnx")
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                if dyn: torch.onnx.export(m, (x,), p, dynamo=True, input_names=["x"], dynamic_shapes=({0: torch.export.Dim("N")},))
                else: torch.onnx.export(m, (x,), p, dynamo=False, opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "N"}})
        except Exception as e:
            print(f"{os.path.basename(p)}: EXPORT FAIL {str(e).splitlines()[0][:100]}"); continue
        try:
            r = check(p)
            bad = [f"{s.name}: {s.detail[:160]}" for s in r.steps if not s.passed]
            print(f"{os.path.basename(p)}: {'pass' if r.passed else 'FAIL ' + '; '.join(bad)}")
        except Exception as e:
            print(f"{os.path.basename(p)}: ERROR {type(e).__name__} {str(e)[:200]}")
