"""How ``keras_bytes.onnx`` and ``bytes.npz`` were made: a Keras byte classifier trained on synthetic byte streams
and exported by tf2onnx. Run it only to remake them; the corpus reads the committed files.

It needs TensorFlow, which the project does not depend on (and whose pins clash with the project's onnx):
in a virtual environment of its own, ``pip install tensorflow-cpu==2.17.0 tf2onnx onnx==1.16.2``, then
``python samples/corpus/keras_bytes/make.py OUT_DIR``.

The model: int32 bytes [N, 256] -> one-hot (256) -> Dense(48, gelu) -> Conv1D(64, 8, stride 4, relu) ->
LayerNormalization -> GlobalMaxPooling1D -> Dense(32, relu) -> Dense(8, softmax), Adam, 6 epochs on 3,000
streams: each class mixes uniform random bytes with 6% of a periodic pattern of its own (85.5% on 600 held-out
streams). tf2onnx writes the Dense layers on [N, L, C] as Reshape, MatMul and a Reshape back to a shape read
from the input (Shape, Slice, Concat), and the LayerNormalization as GlobalAveragePool over transposes, as it
does for Keras models such as file-type and OCR classifiers. ``bytes.npz``: the 600 held-out streams (uint8)
and their labels.
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx

L, C = 256, 8


def streams(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    y = r.integers(0, C, n)
    x = np.zeros((n, L), np.int32)
    for i, k in enumerate(y):
        pattern = (16 * k + (np.arange(L) % (2 + k)) * 7) % 256
        x[i] = np.where(r.random(L) < 0.06, pattern, r.integers(0, 256, L))
    return x, y


def main() -> None:
    out = Path(sys.argv[1])
    x, y = streams(3000, 0)
    inp = tf.keras.Input((L,), dtype="int32", name="bytes")
    h = tf.keras.layers.Lambda(lambda t: tf.one_hot(t, 256), output_shape=(L, 256))(inp)
    h = tf.keras.layers.Dense(48, activation="gelu")(h)
    h = tf.keras.layers.Conv1D(64, 8, strides=4, activation="relu")(h)
    h = tf.keras.layers.LayerNormalization()(h)
    h = tf.keras.layers.GlobalMaxPooling1D()(h)
    h = tf.keras.layers.Dense(32, activation="relu")(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(C, activation="softmax", name="probs")(h))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=6, batch_size=64, verbose=0)
    xt, yt = streams(600, 1)
    print("held-out accuracy", model.evaluate(xt, yt, verbose=0)[1])
    spec = (tf.TensorSpec((None, L), tf.int32, name="bytes"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=15, output_path=str(out / "keras_bytes.onnx"))
    np.savez_compressed(out / "bytes.npz", bytes=xt.astype(np.uint8), labels=yt.astype(np.uint8))


if __name__ == "__main__":
    main()
