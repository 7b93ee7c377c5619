"""Shared pytest fixtures: the ONNX test models of ``tests/models.py`` and the bundled digits sample.

Every fixture is session-scoped, and each model file is exported at most once per session, on first
use, into one ``tmp_path_factory`` folder (all 13 files take about 10 s on 2 cores; the dynamo ones
are the slow part, ≈ 1–4 s each). A test that needs one model pays only for that one.

File keys (``models.ONNX_FILES``): ``<model>_torchscript`` and ``<model>_dynamo`` for the torch models
``lenet5``, ``resnet_block``, ``mobilenet_block``, ``transformer``, ``two_outputs``; the bare name for
the hand-written graphs ``constant_weights``, ``shared_gemm``, ``shared_matmul``. Every graph has one
input named ``input`` with a dynamic batch axis; outputs are ``logits`` (``two_outputs``: ``logits``,
``probs``). A dynamo file ``X.onnx`` has its weights in ``X.onnx.data`` beside it: load it by path.

Fixtures:
- ``onnx_models_dir`` → Path: the folder holding the exported files.
- ``onnx_model_file`` → callable ``key -> Path``: exports one file on first call, e.g.
  ``onnx_model_file("lenet5_dynamo")``.
- ``onnx_models`` → ``dict[str, Path]``: every file key → path (exports them all).
- ``any_onnx_model`` → ``models.OnnxFile`` (key, spec, exporter, path), parametrized over every file
  key (test ids are the keys): a test that takes it runs once per file.
- ``<key>_onnx`` → Path, one per file key: ``lenet5_torchscript_onnx``, ``lenet5_dynamo_onnx``,
  ``resnet_block_torchscript_onnx`` (BatchNormalization kept), ``resnet_block_dynamo_onnx``,
  ``mobilenet_block_torchscript_onnx``, ``mobilenet_block_dynamo_onnx``, ``transformer_torchscript_onnx``,
  ``transformer_dynamo_onnx``, ``two_outputs_torchscript_onnx``, ``two_outputs_dynamo_onnx``,
  ``constant_weights_onnx``, ``shared_gemm_onnx``, ``shared_matmul_onnx``.
- ``digits_sample`` → ``models.DigitsSample`` with the paths ``model``, ``train``, ``test``, ``recipe`` and
  ``dir`` of the committed ``samples/digits`` files (read-only: copy before changing them).
- ``system_temp`` → callable ``() -> list[str]``: makes a private folder stand in for the system's
  temporary folder (``tempfile.gettempdir()``) for the test, and lists the onnx-admm entries in it.

Helpers for tests (import them: ``from models import MODELS, expected_weight_names``): see models.py.

Every test process (one per pytest-xdist worker under ``-n auto``) runs torch on its share of the cores, and
with Ctrl-C's default handler even when a background shell started it with SIGINT ignored; every test must
leave SIGINT's and SIGTERM's handlers as it found them (an autouse guard fails it otherwise).
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from models import DIGITS_DIR, MODELS, ONNX_FILES, DigitsSample, OnnxFile, export


def _usable_cores() -> int:
    # sched_getaffinity is Linux's (it honours taskset and container CPU sets); elsewhere every core counts.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Under pytest-xdist (the README's `-n auto`) each worker is a process of its own: workers that each ran torch
# on every core would fight over them, so each takes its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, _usable_cores() // _WORKERS))

# More than four workers buy little (a few long end-to-end tests set the pace) and each holds torch, onnxruntime
# and its own session fixtures in memory.
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # a run without pytest-xdist installed has no such hook
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What ``-n auto`` means here: one worker per usable core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, _usable_cores()))


# A shell that starts the suite in the background (`cmd &` in a script) starts it with SIGINT ignored, and the
# in-process tests of Ctrl-C would then receive nothing: every test process runs as from a terminal instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Fail a test after which SIGINT's or SIGTERM's handler is not the one it started with.

    The product installs handlers for the length of a run and must put the previous ones back: a handler left
    behind swallows the next Ctrl-C of a pipeline that embeds it (and, here, of every later test in the worker).
    """
    watched = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in watched}
    yield
    left = {signal.Signals(signum).name: signal.getsignal(signum) for signum in watched
            if signal.getsignal(signum) is not before[signum]}
    for signum in watched:
        signal.signal(signum, before[signum])
    assert not left, f"signal handler(s) left installed: {left}"


@pytest.fixture(scope="session")
def onnx_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


@pytest.fixture(scope="session")
def onnx_model_file(onnx_models_dir: Path) -> Callable[[str], Path]:
    # A cache rather than one fixture that exports everything: most tests need one or two models.
    exported: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in exported:
            name, exporter = ONNX_FILES[key]
            exported[key] = export(name, exporter, onnx_models_dir / f"{key}.onnx")
        return exported[key]

    return get


@pytest.fixture(scope="session")
def onnx_models(onnx_model_file: Callable[[str], Path]) -> dict[str, Path]:
    return {key: onnx_model_file(key) for key in ONNX_FILES}


@pytest.fixture(scope="session", params=list(ONNX_FILES), ids=list(ONNX_FILES))
def any_onnx_model(request: pytest.FixtureRequest, onnx_model_file: Callable[[str], Path]) -> OnnxFile:
    name, exporter = ONNX_FILES[request.param]
    return OnnxFile(request.param, MODELS[name], exporter, onnx_model_file(request.param))


def _file_fixture(key: str) -> Callable[..., Path]:
    @pytest.fixture(scope="session", name=f"{key}_onnx")
    def fixture(onnx_model_file: Callable[[str], Path]) -> Path:
        return onnx_model_file(key)

    fixture.__doc__ = f"Path of the exported {key!r} ONNX file."
    return fixture


# One named fixture per file, generated so the list cannot drift from models.ONNX_FILES.
for _key in ONNX_FILES:
    globals()[f"_{_key}_onnx"] = _file_fixture(_key)


@pytest.fixture(scope="session")
def digits_sample() -> DigitsSample:
    return DigitsSample(
        dir=DIGITS_DIR,
        model=DIGITS_DIR / "model.onnx",
        train=DIGITS_DIR / "train.npz",
        test=DIGITS_DIR / "test.npz",
        recipe=DIGITS_DIR / "recipe.toml",
    )


@pytest.fixture
def system_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    # torch keeps a folder of its own there: only onnx-admm's entries count.
    return lambda: sorted(name for name in os.listdir(folder) if "onnx-admm" in name)
