"""Text lines drawn from 5x7 digit bitmaps, numpy only: the captcha reader's images and the PaddleOCR-style
recognizer's (``paddle_ocr/make.py`` runs in an environment without torch).

``rec_lines`` and ``det_pages`` are the PaddleOCR-style recognizer's lines and detector's pages,
``keras_captchas`` the Keras CTC reader's images (``keras_captcha/make.py``).

Each line holds 4-6 digits scaled to random sizes, at random offsets and ink levels, with a clutter line
across the image and Gaussian noise, so a reader has to tell strokes from noise.
"""

from __future__ import annotations

import numpy as np

_GLYPHS = {
    0: ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    1: ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    2: ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    3: ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    4: ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    5: ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    6: ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    7: ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    8: ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    9: ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
_BITMAPS = {d: np.array([[c == "1" for c in row] for row in rows], np.float32) for d, rows in _GLYPHS.items()}


def render_lines(n: int, seed: int, height: int, width: int, glyph_widths: tuple[int, int],
                 glyph_heights: tuple[int, int], step: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``n`` grayscale lines [n, 1, height, width] (float32, about zero mean), their digit strings (class
    ids 1-10; 0 is the CTC blank) and frame labels [n, width // step]: each glyph's class at the output step
    under its centre, blank elsewhere. Glyph sizes are drawn from the half-open ranges given."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, height, width), np.float32)
    frames = np.zeros((n, width // step), np.int64)
    texts = []
    for i in range(n):
        digits = rng.integers(0, 10, rng.integers(4, 7))
        widths, heights = rng.integers(*glyph_widths, len(digits)), rng.integers(*glyph_heights, len(digits))
        gaps = rng.integers(1, 4, len(digits))
        span = int(widths.sum() + gaps[:-1].sum())
        x = int(rng.integers(0, width - span + 1))
        canvas = np.zeros((height, width), np.float32)
        for d, w, h, gap in zip(digits, widths, heights, gaps):
            bitmap = _BITMAPS[int(d)]
            # Nearest-neighbour scaling of the 5x7 glyph to w x h.
            glyph = bitmap[(np.arange(h) * 7 // h)[:, None], (np.arange(w) * 5 // w)[None, :]]
            y = int(rng.integers(0, height - h + 1))
            canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], glyph * rng.uniform(0.6, 1.0))
            frames[i, (x + w // 2) // step] = d + 1
            x += int(w + gap)
        cols = np.arange(width)
        start = rng.uniform(height / 8, height * 7 / 8)
        rows = np.clip((start + rng.uniform(-0.1, 0.1) * cols).astype(int), 0, height - 1)
        canvas[rows, cols] = np.maximum(canvas[rows, cols], rng.uniform(0.3, 0.6))
        canvas += rng.normal(0, 0.15, canvas.shape).astype(np.float32)
        images[i, 0] = (canvas - 0.3) / 0.4
        texts.append(digits + 1)
    return images, texts, frames


# The PaddleOCR-style recognizer's lines: 48 px high (PP-OCR's), 192 wide.
REC_H, REC_W = 48, 192


def rec_lines(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` lines [n, 3, 48, 192] (the gray line in every channel, as a recognizer's RGB input) and their
    digit strings."""
    gray, texts, _ = render_lines(n, seed, REC_H, REC_W, glyph_widths=(12, 20), glyph_heights=(26, 40), step=8)
    return np.repeat(gray, 3, axis=1), texts


def det_pages(n: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Pages [n, 3, size, size] of clutter with 1-3 digit lines pasted in, and their [n, 1, size, size]
    text masks (the lines' ink boxes)."""
    rng = np.random.default_rng(seed)
    lines, _ = rec_lines(3 * n, seed + 1000)
    pages = rng.normal(0, 0.4, (n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        # Clutter strokes: short bright segments the detector has to leave out.
        for _ in range(int(rng.integers(2, 6))):
            y, x, length = int(rng.integers(0, size)), int(rng.integers(0, size - 20)), int(rng.integers(8, 20))
            pages[i, 0, y, x:x + length] += 1.5
        for k in range(int(rng.integers(1, 4))):
            line = lines[3 * i + k, 0]
            scale = rng.uniform(0.3, 0.45)
            h, w = int(REC_H * scale), int(REC_W * scale)
            small = line[(np.arange(h) * REC_H // h)[:, None], (np.arange(w) * REC_W // w)[None, :]]
            ink = np.argwhere(small > 0.8)
            if len(ink) == 0:
                continue
            y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            pages[i, 0, y:y + h, x:x + w] = np.maximum(pages[i, 0, y:y + h, x:x + w], small)
            (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
            masks[i, 0, y + y0:y + y1 + 1, x + x0:x + x1 + 1] = 1
    return np.repeat(pages, 3, axis=1), masks


def keras_captchas(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` captchas of the torch reader's kind (32x100, 4-6 digits) as the Keras reader takes them: [n, 100, 32,
    1], the width first and channels last (the Keras captcha example transposes its images); digits as classes
    0-9 (the blank is the last class, 10, in Keras's CTC)."""
    images, texts, _ = render_lines(n, seed, 32, 100, glyph_widths=(10, 14), glyph_heights=(17, 24), step=4)
    return np.ascontiguousarray(images[:, 0].transpose(0, 2, 1)[..., None]), [t - 1 for t in texts]
