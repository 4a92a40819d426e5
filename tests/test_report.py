"""dpolab report: HTML structure (sections, embedded PNGs that decode, nothing external) and a
real render in headless Chromium when one is installed."""

import base64
import html
import io
import os
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from dpolab.evaluate import accuracy_summary
from dpolab.rank import ranking
from dpolab.report import build_report, report
from tests.test_evaluate import trained_run

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def decode_pngs(page: str) -> dict:
    """alt text -> PIL image of every embedded PNG (fails if one does not decode)."""
    from PIL import Image

    images = {}
    for alt, data in IMG.findall(page):
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
        assert image.format == "PNG"
        images[alt] = image
    return images


def write_run(path, steps=12, sft=False):
    """A run directory as the trainer, `eval`, `rank` and `score --per-token` leave it."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: default\nlr: 1.0e-05\n" + ("" if sft else "loss: sigmoid\nbeta: 0.1\n"))
    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "split": "train", "loss": 0.69 - 0.03 * step, "logps/chosen": -30 + step,
               "grad_norm": 1.0 / step, "lr": 1e-5, "pairs/s": 10.0, "tokens/s": 900.0}
        if not sft:
            rec.update({"rewards/chosen": 0.02 * step, "rewards/rejected": -0.01 * step, "rewards/accuracies": min(1, 0.5 + 0.05 * step),
                        "rewards/margins": 0.03 * step, "logps/rejected": -30 - step})
        lines.append(json.dumps(rec))
        if step % 6 == 0:
            lines.append(json.dumps({**rec, "split": "eval", "loss": rec["loss"] + 0.05}))
    lines.append('{"step": 13, "split": "tr')  # a run killed mid-write
    (path / "metrics.jsonl").write_text("\n".join(lines))
    if sft:
        return path
    (path / "eval").mkdir()
    pref = accuracy_summary(np.array([1.0, 2.0, 0.5]), np.array([0.0, 3.0, 0.1]))
    (path / "eval" / "eval.json").write_text(json.dumps({"model": "m", "reference": "r", "beta": 0.1, "preference": {"data": "d", **pref}}))
    (path / "rank").mkdir()
    scores = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]])
    (path / "rank" / "rank.json").write_text(json.dumps({**ranking(scores, ["dpo", "ipo", "base"], n_boot=50),
                                                         "mode": "pairs", "source": "d", "measure": "preference accuracy"}))
    (path / "score").mkdir()
    tokens = [{"row": 1, "candidate": c, "response": t, "reward": 0.3, "reward_per_token": 0.1, "rank": c + 1, "beta": 0.1,
               "token_texts": [" great", " <fun>", "<|im_end|>"], "token_rewards": [0.2, -0.05, 0.15]} for c, t in enumerate(["a", "b"])]
    (path / "score" / "tokens.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tokens))
    return path


def test_report_structure(tmp_path):
    dpo, sft = write_run(tmp_path / "dpo-run"), write_run(tmp_path / "sft-run", sft=True)
    out = build_report([dpo, sft], tmp_path / "out" / "report.html",
                       extra_sections=[("Reward-KL frontier", "<p id='frontier'>frontier plot here</p>")])
    page = out.read_text()
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    assert headings == ["Runs", "Training curves", "Evaluation: dpo-run", "Ranking: dpo-run",
                        "Reward attribution: dpo-run", "Reward-KL frontier"]
    images = decode_pngs(page)
    assert {"loss", "reward margin (chosen - rejected)", "win matrix"} <= set(images)  # one image per curve panel
    assert images["loss"].size[0] >= 400 and images["win matrix"].size[0] >= 200
    assert "preference accuracy" in page and "0.667" in page  # eval table: 2 of 3 pairs right
    assert page.count("<td>dpo</td>") == 1 and "Bradley-Terry" in page
    assert "&lt;fun&gt;" in page and "&lt;|im_end|&gt;" in page and 'title="-0.05000"' in page
    assert "<p id='frontier'>frontier plot here</p>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained: nothing fetched
    runs_row = re.search(r"<tr><td>sft-run</td>(.*?)</tr>", page).group(1)
    assert "<td>sft</td>" in runs_row and "<td>12</td>" in runs_row


def test_report_command_default_output(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    path = report(runs=str(run))
    assert path == run / "report.html" and path.exists()
    assert "self-contained" in capsys.readouterr().out


def test_report_of_a_real_run(tmp_path_factory, tiny_model_dir, tmp_path):
    from dpolab.evaluate import evaluate
    from dpolab.score import score

    toy = trained_run(tmp_path_factory, tiny_model_dir)
    run = tmp_path / "run"
    shutil.copytree(toy["run"], run, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    evaluate(model=str(toy["final"]), data=str(toy["heldout"]), limit=10, output_dir=str(run / "eval"))
    score(model=str(toy["final"]), data=str(toy["heldout"]), limit=3, per_token=True, output_dir=str(run / "score"))
    page = build_report([run], tmp_path / "report.html").read_text()
    assert "loss" in decode_pngs(page) and "win matrix" not in decode_pngs(page)
    assert "Evaluation: run" in page and "Reward attribution: run" in page
    assert page.count('class="attr"') == 5  # 5 of the 6 scored responses, the default


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "run directory not found"),
    (lambda p: p, "nothing to report"),
])
def test_bad_run_dirs(make, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_report([make(tmp_path)], tmp_path / "r.html")
    with pytest.raises(ValueError, match="at least one run"):
        report(runs="")


def chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


# .ci/run installs Chromium and sets DPOLAB_REQUIRE_BROWSER: there a missing browser fails these tests
NO_BROWSER = chromium() is None and not os.environ.get("DPOLAB_REQUIRE_BROWSER")


def test_ci_has_a_browser():
    if os.environ.get("DPOLAB_REQUIRE_BROWSER"):
        assert chromium() is not None, "DPOLAB_REQUIRE_BROWSER is set but no chromium binary is on PATH"


@pytest.mark.skipif(NO_BROWSER, reason="no Chromium binary on this machine")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    page = build_report([write_run(tmp_path / "run")], tmp_path / "report.html")
    shot = tmp_path / "screenshot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1800", f"--screenshot={shot}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # the plots were drawn: matplotlib's first line colour (#1f77b4) is on screen
    assert (np.abs(pixels - [31, 119, 180]).sum(1) < 30).sum() > 200
    assert len(np.unique(pixels, axis=0)) > 100  # not a blank or error page


@pytest.mark.skipif(NO_BROWSER, reason="no Chromium binary on this machine")
def test_report_fits_a_phone_screen_in_headless_chromium(tmp_path):
    """At 390 px (a phone) nothing makes the page wider than the screen: wide tables scroll in
    their own box and the curves are one panel per row. Measured by the browser itself."""
    page = build_report([write_run(tmp_path / "run")], tmp_path / "report.html")
    text = page.read_text()
    assert "name='viewport'" in text and text.count('<div class="scroll">') >= 2
    # Headless Chromium will not make its window narrower than 500 px: the page goes in a
    # 390 px frame, and the frame's layout width is written into the title.
    probe = tmp_path / "probe.html"
    measure = ("var d=this.contentDocument; document.title='W='+d.documentElement.scrollWidth"
               "+' IMG='+d.querySelector('.panels img').getBoundingClientRect().width")
    probe.write_text(f'<html><body style="margin:0"><iframe width="390" height="900" style="border:0" '
                     f'onload="{measure}" srcdoc="{html.escape(text, quote=True)}"></iframe></body></html>')
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=600,900", "--dump-dom",
                          probe.resolve().as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<title>W=(\d+) IMG=([\d.]+)</title>", dom)
    assert found, dom[:500]
    width, panel = int(found.group(1)), float(found.group(2))
    assert width <= 390, f"the page is {width} px wide on a 390 px screen"
    assert panel > 300  # one curve panel across the screen, not three squeezed side by side
