"""The install: converters/ goes inside the project's namespace (onnx_admm.converters), never top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_converters_as_onnx_admm_converters(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("onnx_admm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"onnx_admm", wheel.name.split("-py")[0] + ".dist-info"}
    shipped = {Path(n).name for n in names if n.startswith("onnx_admm/converters/")}
    assert shipped == {p.name for p in (ROOT / "converters").glob("*.py")}
    assert "onnx_admm/py.typed" in names
    # Unpacked alone (no site-packages, no checkout on the path), the ONNX side imports under its new name.
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    probe = ("import sys; sys.path[:0] = [sys.argv[1]]; import onnx_admm.converters.optable as t, onnx_admm; "
             "print(t.__file__); print(onnx_admm.UserError.__module__)")
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path / "site")], check=True, capture_output=True,
                         text=True, cwd=tmp_path, timeout=60).stdout.split()
    assert out == [str(tmp_path / "site" / "onnx_admm" / "converters" / "optable.py"), "onnx_admm.converters.errors"]
