"""How the PaddleOCR-style files beside this script were made: a text recognizer (CTC) and a text detector
(DB map) built in PaddlePaddle after PP-OCRv3's layouts, trained on synthetic digit lines, exported by
paddle2onnx. Run it only to remake them; the corpus reads the committed files.

It needs PaddlePaddle, which the project does not depend on (and whose paddle2onnx pins an older onnx): in a
virtual environment of its own, ``pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0``, then
``python samples/corpus/paddle_ocr/make.py OUT_DIR``.

- ``ppocr_rec.onnx``: images [N, 3, 48, W] (W dynamic, 192 here) -> a MobileNetV1-Enhance-style trunk
  (depthwise-separable ConvBN + HardSwish, squeeze-excite with HardSigmoid, strides (2, 1) down the height)
  -> an SVTR neck (ConvBN + Swish, two pre-norm global-attention blocks over the W / 8 columns, a shortcut
  concat, ConvBN) -> a CTC head, Linear + Softmax: [N, W / 8, 11] probabilities, blank 0, batch first (as
  PP-OCR's recognizers ship them). CTC loss, Adam.
- ``ppocr_det.onnx``: images [N, 3, H, W] (multiples of 32) -> a MobileNetV3-style trunk (1/4 ... 1/32) -> an
  FPN (1x1 lateral convs, nearest 2x upsampling and adds, 3x3 convs, upsampling to 1/4 and a concat) -> a DB
  head (ConvBN + ReLU, two ConvTranspose 2x2 stride 2, Sigmoid): a [N, 1, H, W] text probability map.
  Text regions are the digit lines drawn on clutter (about 15% of the pixels). BCE, Adam.
The corpus feeds them lines and pages from the same generator (``glyphs.rec_lines``, ``glyphs.det_pages``)
with seeds they did not train on.
"""

import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glyphs import REC_H, det_pages, rec_lines  # noqa: E402

CLASSES = 11  # blank + 10 digits


class ConvBN(nn.Layer):
    def __init__(self, cin, cout, k, stride=1, groups=1, act="hardswish"):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride, padding=(k - 1) // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = {"hardswish": nn.Hardswish(), "relu": nn.ReLU(), "swish": nn.Swish(), None: nn.Identity()}[act]

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SE(nn.Layer):
    def __init__(self, c):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.down = nn.Conv2D(c, c // 4, 1)
        self.up = nn.Conv2D(c // 4, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.up(F.relu(self.down(self.pool(x)))))


class Separable(nn.Layer):
    def __init__(self, cin, cout, stride, se=False, act="hardswish"):
        super().__init__()
        self.dw = ConvBN(cin, cin, 3, stride, groups=cin, act=act)
        self.se = SE(cin) if se else nn.Identity()
        self.pw = ConvBN(cin, cout, 1, act=act)

    def forward(self, x):
        return self.pw(self.se(self.dw(x)))


class Attention(nn.Layer):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # As SVTR writes it: reshape with 0 (copy the dimension) and -1, then one transpose.
        qkv = self.qkv(x).reshape((0, -1, 3, self.heads, x.shape[-1] // self.heads)).transpose((2, 0, 3, 1, 4))
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = F.softmax(q.matmul(k.transpose((0, 1, 3, 2))), axis=-1)
        return self.proj(attn.matmul(v).transpose((0, 2, 1, 3)).reshape((0, -1, x.shape[-1])))


class Block(nn.Layer):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, epsilon=1e-6), nn.LayerNorm(dim, epsilon=1e-6)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.swish(self.fc1(self.norm2(x))))


class Recognizer(nn.Layer):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            ConvBN(3, 16, 3, 2), Separable(16, 32, 1), Separable(32, 64, 2), Separable(64, 64, 1),
            Separable(64, 96, (2, 1), se=True), Separable(96, 96, 1, se=True), Separable(96, 128, (2, 1)),
            nn.MaxPool2D((3, 2), (3, 2)))
        self.neck_in = nn.Sequential(ConvBN(128, 32, 3, act="swish"), ConvBN(32, 64, 1, act="swish"))
        self.blocks = nn.LayerList([Block(64, 4), Block(64, 4)])
        self.norm = nn.LayerNorm(64, epsilon=1e-6)
        self.neck_out = ConvBN(64, 128, 1, act="swish")
        self.fuse = nn.Sequential(ConvBN(256, 32, 3, act="swish"), ConvBN(32, 64, 1, act="swish"))
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x):
        h = self.trunk(x)  # [N, 128, 1, W / 8]
        z = self.neck_in(h)
        z = z.flatten(2).transpose((0, 2, 1))  # [N, T, 64]
        for block in self.blocks:
            z = block(z)
        z = self.norm(z).transpose((0, 2, 1)).unsqueeze(2)
        z = self.fuse(paddle.concat([h, self.neck_out(z)], axis=1))
        logits = self.head(z.squeeze(2).transpose((0, 2, 1)))  # [N, T, C]
        return logits if self.training else F.softmax(logits, axis=2)


def _up(x, times):
    # Nearest upsampling to a size computed from the input's shape: paddle2onnx 2.1 cannot write a nearest
    # interpolate given by its scale (a PIR attribute error), and PP-OCR's FPN necks compute sizes too.
    return F.interpolate(x, size=[x.shape[2] * times, x.shape[3] * times], mode="nearest")


class Detector(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, 3, 2)
        self.c2 = nn.Sequential(Separable(16, 24, 2, act="relu"), Separable(24, 24, 1, act="relu"))     # 1/4
        self.c3 = nn.Sequential(Separable(24, 40, 2, se=True), Separable(40, 40, 1, se=True))          # 1/8
        self.c4 = nn.Sequential(Separable(40, 64, 2), Separable(64, 64, 1, se=True))                    # 1/16
        self.c5 = nn.Sequential(Separable(64, 96, 2, se=True))                                         # 1/32
        self.lateral = nn.LayerList([nn.Conv2D(c, 32, 1, bias_attr=False) for c in (24, 40, 64, 96)])
        self.smooth = nn.LayerList([nn.Conv2D(32, 8, 3, padding=1, bias_attr=False) for _ in range(4)])
        self.head = nn.Sequential(
            ConvBN(32, 8, 3, act="relu"), nn.Conv2DTranspose(8, 8, 2, 2), nn.BatchNorm2D(8), nn.ReLU(),
            nn.Conv2DTranspose(8, 1, 2, 2))

    def forward(self, x):
        c2 = self.c2(self.stem(x))
        c3 = self.c3(c2)
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.lateral[3](c5)
        p4 = self.lateral[2](c4) + _up(p5, 2)
        p3 = self.lateral[1](c3) + _up(p4, 2)
        p2 = self.lateral[0](c2) + _up(p3, 2)
        fused = paddle.concat([
            _up(self.smooth[3](p5), 8),
            _up(self.smooth[2](p4), 4),
            _up(self.smooth[1](p3), 2),
            self.smooth[0](p2)], axis=1)
        logits = self.head(fused)
        return logits if self.training else F.sigmoid(logits)


def _fit(model: nn.Layer, steps: int, batch: int, count: int, loss_of, name: str) -> None:
    """Adam 3e-3, ``steps`` batches of ``batch`` sample numbers drawn from ``count``; ``loss_of(idx)``."""
    opt = paddle.optimizer.Adam(learning_rate=3e-3, parameters=model.parameters())
    rng = np.random.default_rng(0)
    for step in range(steps):
        loss = loss_of(rng.integers(0, count, batch))
        loss.backward()
        opt.step()
        opt.clear_grad()
        if step % 100 == 0:
            print(f"{name} step {step}: loss {float(loss):.3f}", flush=True)


def _train_rec(model: Recognizer, steps: int) -> None:
    images, texts = rec_lines(4000, 0)

    def ctc(idx):
        labels = np.zeros((len(idx), 6), np.int32)
        for row, i in enumerate(idx):
            labels[row, :len(texts[i])] = texts[i]
        lengths = paddle.to_tensor(np.array([len(texts[i]) for i in idx], np.int64))
        log_probs = F.log_softmax(model(paddle.to_tensor(images[idx])), axis=2).transpose((1, 0, 2))  # [T, N, C]
        frames = paddle.full([len(idx)], log_probs.shape[0], dtype="int64")
        return F.ctc_loss(log_probs, paddle.to_tensor(labels), frames, lengths, blank=0)

    _fit(model, steps, 64, len(images), ctc, "rec")


def _train_det(model: Detector, steps: int) -> None:
    pages, masks = det_pages(2000, 0)
    _fit(model, steps, 32, len(pages), lambda idx: F.binary_cross_entropy_with_logits(
        model(paddle.to_tensor(pages[idx])), paddle.to_tensor(masks[idx])), "det")


def _rec_accuracy(model: Recognizer) -> float:
    images, texts = rec_lines(256, 5)
    ids = model(paddle.to_tensor(images)).numpy().argmax(2)
    right = 0
    for row, text in zip(ids, texts):
        keep = np.r_[True, row[1:] != row[:-1]] & (row != 0)
        right += np.array_equal(row[keep], text)
    return right / len(texts)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    paddle.seed(0)
    rec = Recognizer()
    _train_rec(rec, int(sys.argv[2]) if len(sys.argv) > 2 else 1500)
    rec.eval()
    print(f"recognizer: {_rec_accuracy(rec):.3f} of 256 new lines read exactly", flush=True)
    paddle.onnx.export(rec, str(out / "ppocr_rec"), input_spec=[
        paddle.static.InputSpec([None, 3, REC_H, None], "float32", "x")], opset_version=14)
    det = Detector()
    _train_det(det, int(sys.argv[3]) if len(sys.argv) > 3 else 800)
    det.eval()
    pages, masks = det_pages(256, 5)
    probs = det(paddle.to_tensor(pages)).numpy() > 0.5
    tp = (probs & (masks > 0)).sum()
    print(f"detector: pixel F1 {2 * tp / (probs.sum() + (masks > 0).sum()):.3f} on 256 new pages", flush=True)
    paddle.onnx.export(det, str(out / "ppocr_det"), input_spec=[
        paddle.static.InputSpec([None, 3, None, None], "float32", "x")], opset_version=14)


if __name__ == "__main__":
    main()
