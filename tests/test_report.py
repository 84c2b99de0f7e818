"""`app-dist report` on real runs: the PNGs, the HTML page, and the page opened in Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from app_dist.foundations.errors import AppDistError
from app_dist.results.plots import layer_density_matrix
from app_dist.results.report import CURVES, run_labels, write_report
from app_dist.results.report import main as report_main
from app_dist.results.runs import read_run
from tests.conftest import REPO, run_trainer, short_run_args

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def runs(digits_shards: Path, finished_run: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real 1-process runs on the digits (T = 2, 1 epoch): APP (the suite's shared
    finished_run) and dense, each in a folder named after its method. Read only."""
    dense = tmp_path_factory.mktemp("report-runs") / "dense"
    result = run_trainer(short_run_args(digits_shards, dense, "prune.method=dense"),
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"app": finished_run, "dense": dense}


def _data_uri_images(page: str) -> list[bytes]:
    return [base64.b64decode(data)
            for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.mark.slow
def test_report_overlays_runs_and_embeds_every_figure(runs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    page, figures = write_report([runs["app"], runs["dense"]], tmp_path / "out")
    names = [figure.name for figure in figures]
    assert names == [f"{stem}.png" for stem, *_ in CURVES] + [
        "layer_density-app.png"]  # none for dense: every layer at 1.0
    for figure in figures:
        with Image.open(figure) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    text = page.read_text()
    # Self-contained: every figure is inlined, byte for byte, and nothing is fetched.
    assert _data_uri_images(text) == [figure.read_bytes() for figure in figures]
    assert "src=\"http" not in text and "<link" not in text
    # One metrics row per megabatch per run, with the numbers from metrics.jsonl.
    for run_dir in runs.values():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert f"<td>{100 * record['test_accuracy']:.2f}%</td>" in text
            assert f"<td>{record['cer']:.3f}</td>" in text


@pytest.mark.slow
def test_report_defaults_to_the_first_run_directory(runs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    app = tmp_path / "app"  # the report is written into the run directory: a copy
    shutil.copytree(runs["app"], app)
    result = subprocess.run([sys.executable, "-m", "app_dist.cli", "report", str(app)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (app / "report" / "report.html").is_file()
    assert "report.html (5 figures" in result.stdout


@pytest.mark.slow
def test_heat_map_matrix_is_layers_by_megabatches(runs: dict[str, Path]) -> None:
    records = read_run(runs["app"]).records
    layers, megabatches, matrix = layer_density_matrix(records)
    assert megabatches == [1, 2]
    assert layers == list(records[0]["layer_density"])
    assert matrix.shape == (len(layers), 2)
    assert matrix[:, 1].tolist() == [records[1]["layer_density"][name] for name in layers]
    # Nested masks: no layer gains density from megabatch 1 to 2.
    assert (matrix[:, 1] <= matrix[:, 0]).all()


@pytest.mark.slow
def test_labels_stay_unique_when_methods_repeat(runs: dict[str, Path]) -> None:
    app = read_run(runs["app"])
    assert run_labels([app, read_run(runs["dense"])]) == ["app", "dense"]
    assert run_labels([app, app]) == ["app (app) #1", "app (app) #2"]


def test_bad_run_directories_are_one_line_errors(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AppDistError, match="does not exist"):
        write_report([tmp_path / "missing"])
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "config.yaml").write_text("run:\n  name: x\n")
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(AppDistError, match="no finished megabatch"):
        write_report([empty])
    assert report_main([str(tmp_path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert "config.yaml and metrics.jsonl" in stderr


# When the page has loaded, records into the DOM that Chromium dumps, for each <img>: its
# natural width (0 for a broken image) and the fraction of its pixels that were painted when
# drawn on a canvas. A truncated PNG still reports its width from its header but paints only
# its first rows; the report's figures have an opaque background, so all must be painted.
# Synchronous on purpose: the DOM is dumped right after the load event.
_PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, img.naturalWidth);
    canvas.height = Math.max(1, img.naturalHeight);
    const context = canvas.getContext("2d");
    let painted = 0;
    try {
      context.drawImage(img, 0, 0);
      const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
      for (let alpha = 3; alpha < pixels.length; alpha += 4) if (pixels[alpha] > 0) painted++;
    } catch (error) { painted = 0; }
    img.setAttribute("data-natural-width", img.naturalWidth);
    img.setAttribute("data-painted", (painted / (canvas.width * canvas.height)).toFixed(4));
  }
  document.body.setAttribute("data-probe", "loaded");
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_report_renders_in_a_real_browser(runs: dict[str, Path], tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    page, figures = write_report([runs["app"], runs["dense"]], tmp_path / "out")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))

    result = _chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-probe="loaded"' in dom, dom[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    expected = []
    for figure in figures:
        with Image.open(figure) as image:
            expected.append(image.width)
    assert widths == expected  # every image there, at its real size (0 = broken image)
    assert re.findall(r'data-painted="([\d.]+)"', dom) == ["1.0000"] * len(figures)

    screenshot = tmp_path / "out" / "screenshot.png"
    result = _chromium(f"--screenshot={screenshot}", "--window-size=1200,2400", page.as_uri(),
                       profile=tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1200, 2400)
        # A blank page would be one colour; the rendered report has text, tables and plots.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
