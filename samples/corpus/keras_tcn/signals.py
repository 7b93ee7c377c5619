"""The synthetic two-channel signals ``keras_tcn.onnx`` was trained on (``make.py``, seed 0) and is scored on
(seed 1): noise plus one event of the signal's class at a random time (a spike, a burst, a step, or a ramp on the
other channel)."""

import numpy as np

L, CLASSES = 256, 4


def signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    y = r.integers(0, CLASSES, n)
    x = r.normal(0, 0.5, (n, L, 2)).astype(np.float32)
    t = np.arange(40)
    for i, k in enumerate(y):
        at = r.integers(0, L - 40)
        if k == 0:
            x[i, at:at + 3, 0] += 3.0
        elif k == 1:
            x[i, at:at + 40, 0] += np.sin(2 * np.pi * t / 6) * 1.2
        elif k == 2:
            x[i, at:, 0] += 1.0
        else:
            x[i, at:at + 40, 1] += t / 20.0
    return x, y
