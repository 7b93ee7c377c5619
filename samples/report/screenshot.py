"""Render a compress report as HTML and screenshot it in headless Chromium (Debian's ``chromium``).

    python samples/report/screenshot.py REPORT.json [-o samples/report/report.png] [--height 2400] [--html PAGE]

Writes REPORT's HTML page (to a temporary folder, or to ``--html``), then lets Chromium draw it at 1200 px
wide with every network feature off: the page must look right with nothing but the file itself. The PNG
is re-saved as 8-bit palette (Pillow, when installed) so it stays small enough to commit.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from onnx_admm.html_report import write_html
from onnx_admm.report_schema import load_report

logger = logging.getLogger("screenshot")

# Chromium switches that keep a headless run from reaching out (updates, sync, QUIC, first-run pages).
QUIET_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars")


def find_chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2400, timeout: float = 120) -> Path:
    """Draw ``html`` into ``png`` with headless Chromium; raises RuntimeError when there is none or it fails."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, *QUIET_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png.absolute()}",
                   f"--window-size={width},{height}", html.absolute().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return png


def shrink(png: Path) -> None:
    """Re-save as a 256-colour palette PNG: a flat page loses nothing visible and a third of the bytes."""
    try:
        from PIL import Image
    except ImportError:
        logger.info("Pillow is not installed: %s stays a full-colour PNG", png)
        return
    with Image.open(png) as image:
        image.convert("RGB").quantize(colors=256).save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("report.png"))
    parser.add_argument("--height", type=int, default=2400)
    parser.add_argument("--html", type=Path, help="Keep the HTML page here (default: a temporary file).")
    args = parser.parse_args(argv)
    report = load_report(args.report)
    with tempfile.TemporaryDirectory() as folder:
        html = write_html(report, args.html or Path(folder) / "report.html")
        png = screenshot(html, args.output, height=args.height)
    shrink(png)
    logger.info("wrote %s (%d bytes)", png, png.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
