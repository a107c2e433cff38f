"""trainer.outputs.report in a real browser: headless Chromium opens report.html from disk, every embedded plot
decodes to its real size, and a screenshot of the page is written beside the test's output.

Chromium's command line only, no Python dependency: `--dump-dom` prints a probe page that frames the
report and writes what it sees into its own DOM, and `--screenshot` saves the report as it renders.
Skips where no `chromium` or `chromium-browser` is on PATH (Debian: `apt-get install chromium`;
.ci/run installs it where it can).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.outputs import plots
from trainer.outputs.report import write_report

WINDOW = (1280, 2400)  # px; the screenshot is this viewport
TIMEOUT_S = 90  # one launch takes about a second; a loaded CI machine may take far longer

# Framed from the same folder, the report is readable from the probe only with
# --allow-file-access-from-files (file: URLs are otherwise each their own origin). The frame's load
# event fires once its images have loaded or failed, and before --dump-dom prints the page. The
# control image is broken on purpose: the probe must see a failure as a failure.
PROBE = """<!DOCTYPE html>
<html><body>
<img id="control" src="data:image/png;base64,iVBORw0KGgo=">
<iframe id="report" src="REPORT" width="1200" height="800"></iframe>
<script>
const frame = document.getElementById("report");
frame.addEventListener("load", () => {
  const seen = (img) => ({alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight});
  let result;
  try {
    const control = seen(document.getElementById("control"));
    result = {control: control, images: Array.from(frame.contentDocument.images, seen)};
  } catch (e) {
    result = {error: String(e)};
  }
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
</body></html>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium or chromium-browser on PATH; install Debian's `chromium` package to run this test")
    return found


def run_chromium(binary: str, profile: Path, url: str, *args: str) -> str:
    """Run headless Chromium once on `url`; its stdout. A fresh profile keeps the user's own apart."""
    cmd = [
        binary,
        "--headless",
        # The page is our own local file; the sandbox cannot start as root or in most containers.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # Docker's 64 MB /dev/shm is too small for a renderer
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A report with real, small plots of every kind; also each plot's caption -> PNG size."""
    run = tmp_path_factory.mktemp("browser") / "run"
    history = [
        dict(epoch=0, stage="head (precomputed)", trn_loss=0.9, val_loss=0.6, accuracy=0.7, seconds=1.2),
        dict(epoch=1, stage="head + augmentation", trn_loss=0.5, val_loss=0.4, accuracy=0.85, seconds=3.4),
        dict(epoch=2, stage="unfrozen at 224 px", trn_loss=0.3, val_loss=0.35, accuracy=0.9, seconds=9.8),
    ]
    photo = run / "photos" / "ant.jpg"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (64, 48), (180, 120, 40)).save(photo)
    pngs = {
        "schedule": plots.plot_schedule([[1e-3, 1e-2], [5e-4, 5e-3], [1e-3, 1e-2]], run / "schedule.png"),
        "losses": plots.plot_losses(history, run / "losses.png"),
        "confusion matrix": plots.plot_confusion_matrix(
            np.array([[5, 1], [2, 4]]), ["ants", "bees"], run / "confusion_matrix.png"
        ),
        "most incorrect": plots.plot_image_grid([photo], ["true ants\npred bees (p=0.80)"], run / "grid.png"),
    }
    path = write_report(
        run,
        title="browser check",
        config={"arch": "efficientnet_lite0"},
        metrics={"accuracy": 0.75},
        history=history,
        images=[(caption, png.name) for caption, png in pngs.items()],
        data_summary={"classes": ["ants", "bees"], "images": {"train": 24, "valid": 12}, "held_out": False},
        most_confused=[("bees", "ants", 2), ("ants", "bees", 1)],
    )
    sizes = {}
    for caption, png in pngs.items():
        with Image.open(png) as im:
            sizes[caption] = im.size
    return path, sizes


class TestReportInChromium:
    def test_every_image_decodes_at_its_size(self, chromium, report, tmp_path):
        path, sizes = report
        probe = path.parent.parent / "probe.html"
        probe.write_text(PROBE.replace("REPORT", f"{path.parent.name}/{path.name}"), encoding="utf-8")
        dom = run_chromium(
            chromium, tmp_path / "profile", probe.as_uri(), "--allow-file-access-from-files", "--dump-dom"
        )
        found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.DOTALL)
        assert found, f"the probe wrote nothing; the page Chromium printed:\n{dom[-3000:]}"
        result = json.loads(html.unescape(found.group(1)))
        assert "error" not in result, result
        assert result["control"]["width"] == 0, "the probe did not see its broken control image as broken"
        seen = {img["alt"]: (img["width"], img["height"]) for img in result["images"] if img["complete"]}
        assert len(result["images"]) == len(sizes)
        assert seen == sizes  # every <img> loaded, at the plot's own pixel size (naturalWidth > 0)

    def test_screenshot(self, chromium, report, tmp_path):
        path, _ = report
        shot = tmp_path / "report.png"
        start = time.monotonic()
        run_chromium(
            chromium,
            tmp_path / "profile",
            path.as_uri(),
            f"--screenshot={shot}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
        )
        seconds = time.monotonic() - start
        assert shot.is_file(), f"no screenshot written at {shot}"
        with Image.open(shot) as im:
            assert im.size == WINDOW
            lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"the screenshot looks blank (grey levels {lo}..{hi}): {shot}"
        print(f"screenshot {shot} in {seconds:.1f} s")
