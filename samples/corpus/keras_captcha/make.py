"""How ``keras_captcha.onnx`` was made: a Keras CTC captcha reader after the Keras example "OCR model for
reading Captchas", trained on synthetic digit captchas and exported by tf2onnx. Run it only to remake it; the
corpus reads the committed file and draws its inputs from the same generator with another seed.

It needs TensorFlow, which the project does not depend on (and whose pins clash with the project's onnx): in a
virtual environment of its own, ``pip install tensorflow-cpu==2.17.0 tf2onnx onnx==1.16.2``, then
``python samples/corpus/keras_captcha/make.py OUT_DIR``.

The model: float32 images [N, 100, 32, 1] (the width first, as the example transposes its images, channels
last) -> Conv2D(32, 3, relu) -> MaxPool 2 -> Conv2D(64, 3, relu) -> MaxPool 2 -> Reshape to 25 columns of 512
-> Dense(64, relu) -> Dropout -> Bidirectional LSTM(64) -> Bidirectional LSTM(32) -> Dense(11, softmax):
[N, 25, 11] probabilities, batch first, **the blank last** (class 10; Keras's CTC convention), digit d is
class d. Trained with CTC (Adam), 40 epochs, on 6,000 ``glyphs.keras_captchas`` (32x100, 4-6 digits, the
torch captcha_ctc entry's images): it reads 99.8% of 600 held-out captchas. tf2onnx writes each
Bidirectional LSTM as one ONNX LSTM (direction "bidirectional") fed through Transpose / Expand for its zero
states, the convs in NCHW between Transposes, and the Reshape to columns with a shape read from the input.
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glyphs import keras_captchas as captchas  # noqa: E402

H, W, CLASSES, STEPS = 32, 100, 11, 25
BLANK = CLASSES - 1


def build() -> tf.keras.Model:
    layers = tf.keras.layers
    inp = tf.keras.Input((W, H, 1), name="image")
    h = layers.Conv2D(32, 3, activation="relu", kernel_initializer="he_normal", padding="same")(inp)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(64, 3, activation="relu", kernel_initializer="he_normal", padding="same")(h)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Reshape((STEPS, (H // 4) * 64))(h)
    h = layers.Dense(64, activation="relu")(h)
    h = layers.Dropout(0.2)(h)
    h = layers.Bidirectional(layers.LSTM(64, return_sequences=True, dropout=0.25))(h)
    h = layers.Bidirectional(layers.LSTM(32, return_sequences=True, dropout=0.25))(h)
    return tf.keras.Model(inp, layers.Dense(CLASSES, activation="softmax", name="probs")(h))


def greedy(probs: np.ndarray) -> list[list[int]]:
    out = []
    for steps in probs.argmax(-1):
        keep = np.concatenate([[True], steps[1:] != steps[:-1]])
        out.append([int(s) for s in steps[keep] if s != BLANK])
    return out


def main() -> None:
    out = Path(sys.argv[1])
    tf.random.set_seed(0)
    x, texts = captchas(6000, 0)
    lengths = np.array([len(t) for t in texts], np.int32)
    labels = np.zeros((len(texts), 6), np.int32)
    for i, t in enumerate(texts):
        labels[i, :len(t)] = t
    model = build()
    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step(xb, yb, lb):
        with tf.GradientTape() as tape:
            probs = model(xb, training=True)
            loss = tf.reduce_mean(tf.nn.ctc_loss(yb, tf.math.log(probs + 1e-8), lb, tf.fill([tf.shape(xb)[0]], STEPS),
                                                 logits_time_major=False, blank_index=BLANK))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    xt, tt = captchas(600, 1)
    rng = np.random.default_rng(0)
    for epoch in range(int(sys.argv[2]) if len(sys.argv) > 2 else 40):
        order = rng.permutation(len(x))
        losses = [float(step(x[b], labels[b], lengths[b])) for b in np.array_split(order, len(x) // 64)]
        read = np.mean([p == list(t) for p, t in zip(greedy(model.predict(xt, verbose=0)), tt)])
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}, held-out captchas read {read:.3f}", flush=True)
    spec = (tf.TensorSpec((None, W, H, 1), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=15, output_path=str(out / "keras_captcha.onnx"))


if __name__ == "__main__":
    main()
