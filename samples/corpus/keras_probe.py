"""Keras layer probe: one small model per layer kind (random weights), exported by tf2onnx at opset 17 into OUT.

Needs TensorFlow, which the project does not install: in a virtual environment of its own,
``pip install tensorflow-cpu==2.17.0 tf2onnx onnx==1.16.2``, then ``python keras_probe.py OUT [NAME ...]``; then,
in the project's environment, ``python samples/corpus/keras_probe.py --check OUT`` runs ``onnx-admm check`` on each
file (samples/corpus/RESULTS.md, twenty-first session, has the table).
"""
import glob
import logging
import os
import sys

if sys.argv[1:2] == ["--check"]:  # the project's environment: no TensorFlow needed
    from onnx_admm.check import check
    from onnx_admm.converters.errors import UserError

    logging.disable(logging.WARNING)
    for path in sorted(glob.glob(os.path.join(sys.argv[2], "*.onnx"))):
        name = os.path.basename(path)[:-5]
        try:
            report = check(path)
        except UserError as exc:
            print(f"{name}: error {exc}")
            continue
        failed = [f"{s.name}: {s.detail}" for s in report.steps if not s.passed]
        print(f"{name}: {'pass' if report.passed else 'FAIL ' + ' | '.join(failed)} [{report.steps[0].detail}]")
    sys.exit(0)

import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from tensorflow import keras  # noqa: E402
L = keras.layers
_INPUTS = []  # the input each builder made, for keras.Model


def _input(shape, dtype="float32"):
    _INPUTS.append(keras.Input(shape, dtype=dtype, name="x"))
    return _INPUTS[-1]


def img(): return _input((16, 16, 3))
def seq(): return _input((20, 8))
def tok(): return _input((20,), "int32")
def head(h, n=4): return L.Dense(n, activation="softmax")(L.Flatten()(h) if len(h.shape) > 2 else h)
cases = {
 "conv_bn_pool": lambda: (lambda x: head(L.MaxPooling2D()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", activation="relu")(x)))))(img()),
 "depthwise_separable": lambda: (lambda x: head(L.SeparableConv2D(8, 3)(L.DepthwiseConv2D(3, padding="same")(x))))(img()),
 "conv_transpose": lambda: (lambda x: head(L.Conv2DTranspose(4, 3, strides=2, padding="same")(L.Conv2D(8, 3, strides=2)(x))))(img()),
 "upsample_pad_crop": lambda: (lambda x: head(L.Cropping2D(2)(L.ZeroPadding2D(1)(L.UpSampling2D(interpolation="bilinear")(L.Conv2D(4, 3)(x))))))(img()),
 "activations": lambda: (lambda x: head(L.PReLU()(L.LeakyReLU()(L.ReLU(max_value=6.0)(L.Activation("swish")(L.Activation("selu")(L.Activation("hard_sigmoid")(L.Dense(16, activation="elu")(x)))))))))(seq()),
 "gelu_softplus": lambda: (lambda x: head(L.Activation("softplus")(L.Dense(16, activation="gelu")(x))))(seq()),
 "layernorm_mha": lambda: (lambda x: head(L.LayerNormalization()(L.MultiHeadAttention(2, 8)(L.Dense(16)(x), L.Dense(16)(x)))))(seq()),
 "attention_layers": lambda: (lambda x: head(L.Concatenate()([L.Attention()([L.Dense(8)(x), L.Dense(8)(x)]), L.AdditiveAttention()([L.Dense(8)(x), L.Dense(8)(x)])])))(seq()),
 "embedding_gru": lambda: (lambda x: head(L.GRU(16)(L.Embedding(50, 8)(x))))(tok()),
 "bilstm_seq": lambda: (lambda x: head(L.GlobalMaxPooling1D()(L.Bidirectional(L.LSTM(8, return_sequences=True))(x))))(seq()),
 "gru_unrolled": lambda: (lambda x: head(L.GRU(16, unroll=True)(L.Embedding(50, 8)(x))))(tok()),
 "simple_rnn_unrolled": lambda: (lambda x: head(L.SimpleRNN(12, unroll=True)(x)))(seq()),
 "simple_rnn": lambda: (lambda x: head(L.SimpleRNN(12)(x)))(seq()),
 "conv1d_dilated_causal": lambda: (lambda x: head(L.GlobalAveragePooling1D()(L.Conv1D(8, 3, dilation_rate=2, padding="causal")(x))))(seq()),
 "unit_norm_group_norm": lambda: (lambda x: head(L.UnitNormalization()(L.GroupNormalization(4)(L.Conv2D(8, 3)(x)))))(img()),
 "merge_ops": lambda: (lambda x: (lambda a, b: head(L.Maximum()([L.Average()([a, b]), L.Multiply()([a, b]), L.Add()([a, b])])))(L.Dense(8)(x), L.Dense(8)(x)))(seq()),
 "time_distributed_repeat": lambda: (lambda x: head(L.TimeDistributed(L.Dense(6))(L.RepeatVector(5)(L.Dense(6)(L.Flatten()(x))))))(seq()),
 "permute_reshape": lambda: (lambda x: head(L.Reshape((8, 20))(L.Permute((2, 1))(L.Dense(8)(x)))))(seq()),
 "rescaling_resizing": lambda: (lambda x: head(L.Conv2D(4, 3)(L.Resizing(12, 12)(L.Rescaling(1 / 255.0)(x)))))(img()),
 "spatial_dropout_noise": lambda: (lambda x: head(L.GaussianNoise(0.1)(L.SpatialDropout1D(0.2)(L.Conv1D(8, 3)(x)))))(seq()),
 "stft_front_end": lambda: (lambda x: head(L.Dense(8)(L.Lambda(lambda w: tf.math.log1p(tf.abs(tf.signal.stft(w, 64, 32))))(x))))(_input((512,))),
 "conv_lstm2d": lambda: (lambda x: head(L.ConvLSTM2D(4, 3)(x)))(_input((4, 8, 8, 2))),
 "global_pools_2d": lambda: (lambda x: head(L.Concatenate()([L.GlobalMaxPooling2D()(L.Conv2D(4, 3)(x)), L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(x))])))(img()),
 "l2_normalize_lambda": lambda: (lambda x: head(L.Lambda(lambda t: tf.math.l2_normalize(t, axis=-1))(L.Dense(8)(x))))(seq()),
}
OUT = sys.argv[1]
sel = sys.argv[2:] or list(cases)
for name in sel:
    try:
        tf.keras.backend.clear_session()
        out = cases[name]()
        model = keras.Model(_INPUTS[-1], out)
        spec = (tf.TensorSpec((None, *_INPUTS[-1].shape[1:]), _INPUTS[-1].dtype, name="x"),)
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=os.path.join(OUT, f"{name}.onnx"))
        print(name, "exported", flush=True)
    except Exception as exc:
        print(name, "EXPORT FAIL", str(exc).splitlines()[0][:150], flush=True)
