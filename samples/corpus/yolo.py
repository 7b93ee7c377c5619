"""A two-level anchor-free detector laid out as YOLOv8's ONNX export is, trained here on synthetic images.

``yolo_like``: input ``images`` [N, 1, 64, 64]; output ``output0`` [N, 4 + 2, 80]: for each of the 80
anchor points (an 8x8 grid at stride 8 and a 4x4 grid at stride 16) a box (centre x, centre y, width,
height in pixels) and the two class probabilities. As in YOLOv8's export, the boxes are decoded in the graph
(distances from the anchor points, times the stride) and joined to ``Sigmoid(classes)`` by one Concat, so
no graph output is a score by itself: the tool finds the Sigmoid inside (``scores._joined_probabilities``)
and measures the positive set of its probabilities above 0.5.

``yolo_c2f`` is the same detector with YOLOv8's C2f blocks in its backbone (with shortcuts) and at its last
level (without), whose filters the channel analysis follows through their Split and Concat.

Images: low noise with one to three objects, a filled square (class 0) or a hollow one (class 1), 8 to 18
pixels wide. Every anchor point inside an object is a positive of its class (its box the object's); the
model trains for a few hundred Adam steps (seconds) on binary cross-entropy plus L1 on the positives' boxes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIDE = 64
STRIDES = (8, 16)
CLASSES = 2


def make_images(n: int, seed: int) -> tuple[np.ndarray, list[list[tuple[int, float, float, float, float]]]]:
    """``n`` images [n, 1, 64, 64] (float32) and their objects: (class, x1, y1, x2, y2) in pixels."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, 1, SIDE, SIDE)).astype(np.float32)
    objects = []
    for i in range(n):
        found = []
        for _ in range(int(rng.integers(1, 4))):
            cls, side = int(rng.integers(0, CLASSES)), int(rng.integers(8, 19))
            x1, y1 = (int(v) for v in rng.integers(0, SIDE - side, 2))
            value = rng.uniform(0.8, 1.0)
            images[i, 0, y1:y1 + side, x1:x1 + side] = value
            if cls == 1:  # hollow: a two-pixel frame
                images[i, 0, y1 + 2:y1 + side - 2, x1 + 2:x1 + side - 2] = rng.normal(0, 0.1, (side - 4, side - 4))
            found.append((cls, float(x1), float(y1), float(x1 + side), float(y1 + side)))
        objects.append(found)
    return images, objects


def _anchors() -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (cell centres, in cells) [A, 2] and each one's stride [A, 1], level by level."""
    points, strides = [], []
    for stride in STRIDES:
        cells = SIDE // stride
        ys, xs = torch.meshgrid(torch.arange(cells) + 0.5, torch.arange(cells) + 0.5, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1))
        strides.append(torch.full((cells * cells, 1), float(stride)))
    return torch.cat(points), torch.cat(strides)


def _block(cin: int, cout: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.BatchNorm2d(cout), nn.SiLU())


class C2f(nn.Module):
    """YOLOv8's C2f: ``cv1`` split in two halves, a bottleneck on the second (adding its input back with
    ``shortcut``), both halves and the bottleneck's output joined before ``cv2``."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.c, self.shortcut = channels // 2, shortcut
        self.cv1 = _block(channels, 2 * self.c, 1, 1)
        self.m = nn.Sequential(_block(self.c, self.c, 1), _block(self.c, self.c, 1))
        self.cv2 = _block(3 * self.c, channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        m = self.m(b)
        return self.cv2(torch.cat([a, b, b + m if self.shortcut else m], 1))


class YoloLike(nn.Module):
    """``c2f``: C2f blocks after the stem (with shortcut), at stride 8 (with) and at stride 16 (without), as in
    YOLOv8's backbone and neck."""

    def __init__(self, width: int = 16, c2f: bool = False) -> None:
        super().__init__()
        after = (lambda c, shortcut: C2f(c, shortcut)) if c2f else (lambda c, shortcut: nn.Identity())
        self.stem = nn.Sequential(_block(1, width, 2), _block(width, 2 * width, 2), _block(2 * width, 2 * width, 1),
                                  after(2 * width, True))
        self.p3 = nn.Sequential(_block(2 * width, 3 * width, 2), after(3 * width, True))  # stride 8
        self.p4 = nn.Sequential(_block(3 * width, 4 * width, 2), after(4 * width, False))  # stride 16
        self.box = nn.ModuleList(nn.Sequential(_block(c, 32, 1), nn.Conv2d(32, 4, 1)) for c in (3 * width, 4 * width))
        self.cls = nn.ModuleList(nn.Sequential(_block(c, 32, 1), nn.Conv2d(32, CLASSES, 1))
                                 for c in (3 * width, 4 * width))
        points, strides = _anchors()
        self.register_buffer("points", points.t().unsqueeze(0))  # [1, 2, A]
        self.register_buffer("strides", strides.t().unsqueeze(0))  # [1, 1, A]

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (left, top, right, bottom, in cells) [N, 4, A] and class logits [N, 2, A]."""
        p3 = self.p3(self.stem(x))
        levels = (p3, self.p4(p3))
        distances = torch.cat([self.box[i](f).flatten(2) for i, f in enumerate(levels)], 2)
        logits = torch.cat([self.cls[i](f).flatten(2) for i, f in enumerate(levels)], 2)
        return nn.functional.softplus(distances), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distances, logits = self.heads(x)
        lt, rb = distances[:, :2], distances[:, 2:]
        x1y1, x2y2 = self.points - lt, self.points + rb
        boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([boxes, logits.sigmoid()], 1)


def _targets(objects, points: torch.Tensor, strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class targets [n, 2, A], distance targets [n, 4, A] (in cells) and the positives [n, A]."""
    n, a = len(objects), points.shape[0]
    cls, dist, pos = torch.zeros(n, CLASSES, a), torch.zeros(n, 4, a), torch.zeros(n, a, dtype=torch.bool)
    centres = points * strides
    for i, found in enumerate(objects):
        for c, x1, y1, x2, y2 in found:
            inside = ((centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2))
            cls[i, c, inside] = 1.0
            pos[i, inside] = True
            s = strides[inside, 0]
            dist[i, :, inside] = torch.stack([centres[inside, 0] - x1, centres[inside, 1] - y1,
                                              x2 - centres[inside, 0], y2 - centres[inside, 1]]) / s
    return cls, dist, pos


def train(model: YoloLike, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    images, objects = make_images(2048, seed)
    x = torch.from_numpy(images)
    cls, dist, pos = _targets(objects, *_anchors())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        distances, logits = model.heads(x[idx])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, cls[idx])
        positives = pos[idx].unsqueeze(1).expand_as(distances)
        if positives.any():
            loss = loss + nn.functional.l1_loss(distances[positives], dist[idx][positives])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build(path: Path, steps: int = 400, seed: int = 0, c2f: bool = False) -> Path:
    """Train the detector (with C2f blocks: ``c2f``) and write it to ``path`` (cached: an existing file is
    kept); TorchScript export, dynamic batch."""
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = YoloLike(c2f=c2f)
    train(model, steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(2, 1, SIDE, SIDE), str(path), input_names=["images"],
                          output_names=["output0"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
    return path


def feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    """What a user feeds it: generated images."""
    return {"images": make_images(n, seed)[0]}
