"""How ``keras_tcn.onnx`` and ``signals.npz`` were made: a Keras temporal convolutional network (dilated causal
Conv1D blocks, as EEG and sensor models use) trained on synthetic two-channel signals and exported by tf2onnx.
Run it only to remake them; the corpus reads the committed files.

It needs TensorFlow, which the project does not depend on: in a virtual environment of its own,
``pip install tensorflow-cpu==2.17.0 tf2onnx onnx==1.16.2``, then ``python samples/corpus/keras_tcn/make.py OUT_DIR``.

The model: float [N, 256, 2] -> Conv1D(16, 5, dilation 1, causal, relu) -> Conv1D(16, 5, dilation 2, causal,
relu) -> Conv1D(16, 5, dilation 4, causal, relu) -> GlobalAveragePooling1D -> Dense(4, softmax), Adam, 8 epochs
on 3,000 signals. Each signal is noise plus one event of its class at a random time: a spike, a 12 Hz-like burst,
a step, or a slow ramp on the other channel. tf2onnx pads each causal convolution with a Pad and writes it as
Unsqueeze, Transpose, a dilated 2-D Conv and Squeeze (the pattern whose ranks the import once lost). The
signals come from ``signals.py`` (numpy only): the sweep draws its held-out ones there (seed 1).
"""

import sys
from pathlib import Path

import tensorflow as tf
import tf2onnx
from signals import CLASSES, L, signals  # this folder's numpy generator, which the sweep reads too


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tf.keras.utils.set_random_seed(0)
    x, y = signals(3000, 0)
    inp = tf.keras.Input((L, 2), name="signal")
    h = inp
    for dilation in (1, 2, 4):
        h = tf.keras.layers.Conv1D(16, 5, dilation_rate=dilation, padding="causal", activation="relu")(h)
    h = tf.keras.layers.GlobalAveragePooling1D()(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(CLASSES, activation="softmax")(h))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    xt, yt = signals(600, 1)
    print("held-out accuracy", model.evaluate(xt, yt, verbose=0)[1])
    spec = (tf.TensorSpec((None, L, 2), tf.float32, name="signal"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(out / "keras_tcn.onnx"))


if __name__ == "__main__":
    main()
