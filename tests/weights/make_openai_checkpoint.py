"""Write a TensorFlow checkpoint the way OpenAI saved GPT-2: run by the tests with an interpreter that has
TensorFlow (a child process, so TensorFlow and torch never share one).

    python make_openai_checkpoint.py ARRAYS.npz OUT_DIR [ARRAYS.npz OUT_DIR ...]

Each ARRAYS.npz maps variable names (model/wte, model/h0/attn/c_attn/w, ...) to arrays. OUT_DIR receives
`checkpoint`, `model.ckpt.index`, `model.ckpt.data-00000-of-00001` and `model.ckpt.meta`, written by
`tf.compat.v1.train.Saver` in a graph-mode session, as OpenAI's `train.py` / `sample.py` era code did.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def save(arrays_file: str, out: str) -> None:
    arrays = dict(np.load(arrays_file))
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in arrays.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, os.path.join(out, "model.ckpt"))


if __name__ == "__main__":
    args = sys.argv[1:]
    for arrays_file, out in zip(args[::2], args[1::2]):
        save(arrays_file, out)
    print(tf.__version__)
