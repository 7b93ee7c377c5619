"""How ``keras_digits.onnx`` was made: a Keras CNN trained on scikit-learn's digits and exported by tf2onnx.
Run it only to remake it; the corpus reads the committed file and takes its inputs from scikit-learn.

It needs TensorFlow, which the project does not depend on (and whose pins clash with the project's onnx):
in a virtual environment of its own, ``pip install tensorflow-cpu==2.17.0 tf2onnx onnx==1.16.2 scikit-learn``,
then ``python samples/corpus/keras_digits/make.py OUT_DIR``.

The model: [N, 8, 8, 1] images in [0, 1] -> Conv2D(16, 3, no bias) -> BatchNormalization -> ReLU ->
Conv2D(32, 3, relu) -> MaxPooling2D -> Conv2D(32, 3, relu) -> Flatten -> Dropout(0.2) -> Dense(64, relu) ->
Dense(10, softmax), Adam, 15 epochs on the first 1,350 digits of a seeded shuffle (seed 0); 98.7% on the other
447. tf2onnx writes the NHWC input as a Reshape to NCHW, the Flatten as a Transpose back to NHWC and a
Reshape to a shape read from its input (Shape, Gather, Cast, Slice, Concat with the feature count).
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx
from sklearn.datasets import load_digits


def main() -> None:
    out = Path(sys.argv[1])
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    inp = tf.keras.Input((8, 8, 1), name="image")
    h = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)
    h = tf.keras.layers.ReLU()(tf.keras.layers.BatchNormalization()(h))
    h = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = tf.keras.layers.MaxPooling2D()(h)
    h = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = tf.keras.layers.Dropout(0.2)(tf.keras.layers.Flatten()(h))
    h = tf.keras.layers.Dense(64, activation="relu")(h)
    model = tf.keras.Model(inp, tf.keras.layers.Dense(10, activation="softmax", name="probs")(h))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1350], y[:1350], epochs=15, batch_size=32, verbose=0)
    print("held-out accuracy", model.evaluate(x[1350:], y[1350:], verbose=0)[1])
    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=15, output_path=str(out / "keras_digits.onnx"))


if __name__ == "__main__":
    main()
