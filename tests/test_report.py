"""`dharma report`: PNG plots and a self-contained HTML page from a real run's metrics.jsonl."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from trainkit import write_manifest

from dharma_kernel.concept_activation import ConceptActivation
from dharma_kernel.testing import run_cli as dharma

PLOTS = ["loss", "lr", "throughput", "eval_perplexity", "eval_auc", "activation"]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real 12-step run of the tiny 2-module model, evaluated every 4 steps."""
    from dharma_kernel.train.run import TrainOptions, train

    folder = tmp_path_factory.mktemp("report")
    manifest = write_manifest(folder, train={"max_steps": 12, "eval_every": 4})
    summary = train(manifest, TrainOptions(), Console(file=io.StringIO()))
    assert summary.steps == 12
    return folder / "run"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_not_blank(path: Path) -> None:
    """Most of a plot is white; a real one has many colours and a good share of non-white pixels."""
    from matplotlib.image import imread

    pixels = imread(path)[..., :3].reshape(-1, 3)
    colours = len({tuple(p) for p in (pixels * 255).round().astype(int).tolist()})
    inked = float((pixels < 0.9).any(-1).mean())
    assert colours > 20 and inked > 0.02, f"{path}: {colours} colours, {inked:.1%} non-white"


def test_report_draws_every_plot_at_its_size(run, tmp_path, capsys):
    code, stdout, stderr = dharma(capsys, "report", str(run), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    for name in PLOTS:
        path = tmp_path / "out" / f"{name}.png"
        assert f"{name}: {path}" in stdout
        assert png_size(path) == (800, 400)
        assert path.stat().st_size > 10_000
        assert_not_blank(path)
    assert f"report: {tmp_path / 'out' / 'report.html'}" in stdout


def test_default_output_is_the_run_report_folder(run, capsys):
    code, stdout, _ = dharma(capsys, "report", str(run), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["html"] == str(run / "report" / "report.html")
    assert sorted(result["plots"]) == sorted(PLOTS)
    assert result["missing"] == {} and result["steps"] == 12 and result["evals"] == 4
    assert all(Path(p).stat().st_size > 10_000 for p in result["plots"].values())


def test_every_logged_loss_component_is_plotted(run):
    from dharma_kernel.run_metrics import read_run

    metrics = read_run(run)
    components = metrics.loss_components()
    assert components == [
        "loss",
        "lm",
        "concept",
        "router_balance@0",
        "router_balance@1",
        "routing@0",
        "routing@1",
    ]
    assert [r["step"] for r in metrics.evals] == [0, 4, 8, 12]
    assert [r["step"] for r in metrics.activations] == [0, 4, 8, 12]


def test_page_is_self_contained_and_embeds_the_plots(run, tmp_path, capsys):
    assert dharma(capsys, "report", str(run), "-o", str(tmp_path))[0] == 0
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "url(" not in page and "@import" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(PLOTS)
    embedded = [base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources]
    assert embedded == [(tmp_path / f"{name}.png").read_bytes() for name in PLOTS]
    assert "<td>best evaluation (lowest eval loss)</td>" in page


def test_logged_activation_table_matches_the_checkpoint(run):
    """The table the trainer logged at step 12 is what the saved step-12 model gives on the eval rows."""
    from transformers import AutoTokenizer

    from dharma_kernel.data import prepare_data
    from dharma_kernel.evaluate import lm_totals
    from dharma_kernel.manifest import load_manifest
    from dharma_kernel.model import DharmaModel

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["activation"] for r in logged if "activation" in r and r["step"] == 12][0]
    model = DharmaModel.from_pretrained(run / "latest")
    tokenizer = AutoTokenizer.from_pretrained(run / "latest")
    _, eval_data, _ = prepare_data(load_manifest(run.parent / "m.toml"), tokenizer, model.module_refs)
    table = ConceptActivation(model.module_refs)
    lm_totals(model, eval_data, 4, activation=table)
    again = table.record()
    assert again["modules"] == logged["modules"] == ["paths.dharma", "darshanas.vedanta"]
    assert again["tokens"] == logged["tokens"] and sum(logged["tokens"]) > 100
    assert torch.tensor(again["mean"]) == pytest.approx(torch.tensor(logged["mean"]), abs=1e-5)


def test_concept_activation_means_by_hand():
    table = ConceptActivation(["paths.a", "paths.b"])
    # one sequence of 4 tokens: token 0 has concept a, token 1 both, token 2 none, token 3 padding
    labels = torch.tensor([[[1, 0], [1, 1], [0, 0], [-100, -100]]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 0]])
    scores = {
        "paths.a": torch.tensor([[0.9, 0.7, 0.1, 5.0]]),
        "paths.b": torch.tensor([[0.2, 0.8, 0.3, 5.0]]),
    }
    table.add(scores, labels, mask)
    record = table.record()
    assert record["concepts"] == ["paths.a", "paths.b", "none"]
    assert record["tokens"] == [2, 1, 1]
    assert record["mean"] == [pytest.approx([0.8, 0.7, 0.1]), pytest.approx([0.5, 0.8, 0.3])]
    empty = ConceptActivation(["paths.a"]).record()
    assert empty["mean"] == [[None, None]]


def write_metrics(run: Path, records: list[dict], extra: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra)


STEPS = [
    {
        "step": s,
        "loss": 6.0 - s / 10,
        "lm": 5.9 - s / 10,
        "qa/span": 2.0 / s,
        "lr": 1e-3,
        "tok_per_s": 1000.0 + s,
    }
    for s in range(1, 21)
]


def test_run_without_eval_draws_what_it_has_and_says_what_not(tmp_path, capsys):
    write_metrics(tmp_path / "run", STEPS, extra='{"step": 21, "loss": 4.')  # killed mid-line
    (tmp_path / "run" / "report").mkdir()
    (tmp_path / "run" / "report" / "activation.png").write_bytes(b"an earlier report's")
    code, stdout, _ = dharma(capsys, "report", str(tmp_path / "run"), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert sorted(result["plots"]) == ["loss", "lr", "throughput"]
    assert result["missing"] == {
        "eval_perplexity": "no evaluation was logged: the run had no eval data",
        "activation": "no activation table in metrics.jsonl: the model has no modules, "
        "the run had no eval data, or an older dharma trained it",
    }
    page = Path(result["html"]).read_text()
    assert "<li>eval_perplexity: no evaluation was logged" in page
    assert not (tmp_path / "run" / "report" / "activation.png").exists()
    assert "lm, loss - lm, qa/span at each optimizer step" in page  # a head's loss is a component too
    assert "<td>unreadable last line (ignored)</td><td>21</td>" in page


def test_head_run_plots_the_heads_eval_metrics(tmp_path, capsys):
    # A fine-tuning run logs eval_loss and the head's metrics, no perplexity.
    evals = [{"step": s, "eval_loss": 1.5 - s / 20, "eval_accuracy": 0.25 + s / 40, "eval_macro_f1": s / 25}
             for s in (0, 10, 20)]  # fmt: skip
    write_metrics(tmp_path / "run", STEPS + evals)
    code, stdout, _ = dharma(capsys, "report", str(tmp_path / "run"), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert sorted(result["plots"]) == ["eval_metrics", "loss", "lr", "throughput"]
    assert "eval_perplexity" not in result["missing"]
    assert png_size(tmp_path / "run" / "report" / "eval_metrics.png") == (800, 400)
    page = Path(result["html"]).read_text()
    assert "<td>step 20: loss 0.5000, accuracy 0.7500, macro_f1 0.8000</td>" in page


def test_heatmap_grows_with_the_modules(tmp_path, capsys):
    refs = [f"family.m{i}" for i in range(37)]
    table = {"modules": refs, "concepts": [*refs, "none"], "tokens": [3] * 37 + [100]}
    table["mean"] = [[(i * 38 + j) / 1500 for j in range(38)] for i in range(37)]
    write_metrics(tmp_path / "run", [*STEPS[:3], {"step": 3, "eval_loss": 5.0, "eval_ppl": 148.4},
                                     {"step": 3, "activation": table}])  # fmt: skip
    assert dharma(capsys, "report", str(tmp_path / "run"))[0] == 0
    heatmap = tmp_path / "run" / "report" / "activation.png"
    assert png_size(heatmap) == (300 + 24 * 38, 200 + 24 * 37) == (1212, 1088)
    assert_not_blank(heatmap)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "{d}/missing: no such file or directory"),
        (lambda d: (d / "missing").write_text("x"), "{d}/missing is a file, not a run directory"),
        (lambda d: (d / "missing").mkdir(), "{d}/missing is not a training run: it has no metrics.jsonl"),
        (
            lambda d: ((d / "missing").mkdir(), (d / "missing" / "manifest.json").write_text("{}")),
            "{d}/missing/metrics.jsonl is missing: this run logged no metrics",
        ),
        (lambda d: write_metrics(d / "missing", []), "{d}/missing/metrics.jsonl has no step or eval records"),
        (
            lambda d: write_metrics(
                d / "missing", STEPS[:1], extra="not json\n" + json.dumps(STEPS[1]) + "\n"
            ),
            "{d}/missing/metrics.jsonl, line 2: not JSON (Expecting value)",
        ),
        (
            lambda d: write_metrics(d / "missing", [{"loss": 1.0}]),
            "{d}/missing/metrics.jsonl, line 1: a record needs an integer 'step'",
        ),
        (
            lambda d: write_metrics(
                d / "missing", [{"step": 1, "activation": {"modules": ["a"], "mean": [1]}}]
            ),
            "{d}/missing/metrics.jsonl, line 1: 'activation' is not a table of modules by concepts",
        ),
    ],
)
def test_what_is_not_a_run_is_a_clear_error(tmp_path, capsys, setup, message):
    setup(tmp_path)
    code, stdout, stderr = dharma(capsys, "report", str(tmp_path / "missing"))
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: " + message.format(d=tmp_path))
    assert "Traceback" not in stderr


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60)


# Appended to a copy of the page: the title reports how many images decoded, and their sizes.
PROBE = """<script>
addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter(i => i.complete && i.naturalWidth > 0);
  document.title = `decoded ${decoded.length}/${images.length}: ` +
    decoded.map(i => `${i.naturalWidth}x${i.naturalHeight}`).join(" ");
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (.ci/run installs Debian's chromium)")
def test_page_renders_in_headless_chromium(run, tmp_path, capsys):
    assert dharma(capsys, "report", str(run), "-o", str(tmp_path / "out"))[0] == 0
    probe = tmp_path / "probe.html"
    probe.write_text((tmp_path / "out" / "report.html").read_text() + PROBE)
    dom = chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>decoded 6/6: 800x400 800x400 800x400 800x400 800x400 800x400</title>" in dom.stdout
    headings = re.findall(r"<h2[^>]*>([^<]+)</h2>", dom.stdout)
    assert headings == [
        "Summary",
        "Training loss by component",
        "Learning rate",
        "Throughput",
        "Eval perplexity",
        "Module concept detection (median AUC)",
        "Module activation by concept (eval, step 12)",
        "Evaluations",
    ]

    shot = tmp_path / "shot.png"
    page = (tmp_path / "out" / "report.html").as_uri()
    result = chromium(f"--screenshot={shot}", "--window-size=1000,1600", page, profile=tmp_path / "profile2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert png_size(shot) == (1000, 1600)
    assert_not_blank(shot)


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path / "run", STEPS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, stdout, stderr = dharma(capsys, "report", str(tmp_path / "run"))
    assert code == 2 and stdout == ""
    assert stderr == (
        "error: dharma report draws with matplotlib, which is not installed\n"
        "  hint: Run: pip install 'dharma-kernel[report]' (or pip install matplotlib).\n"
    )


def test_the_total_is_drawn_as_what_it_adds_to_lm(run):
    from dharma_kernel.report import loss_lines
    from dharma_kernel.run_metrics import read_run

    metrics = read_run(run)
    lines = loss_lines(metrics, metrics.loss_components())
    assert [line.label for line in lines] == [
        "lm", "loss - lm", "concept", "router_balance@0", "router_balance@1", "routing@0", "routing@1",
    ]  # fmt: skip
    _, total = metrics.series("loss")
    _, lm = metrics.series("lm")
    assert lines[1].values == pytest.approx([t - m for t, m in zip(total, lm, strict=True)])
    assert all(value > 0.01 for value in lines[1].values)  # it no longer hides under lm


def test_a_total_equal_to_lm_is_one_line(tmp_path):
    from dharma_kernel.report import loss_lines
    from dharma_kernel.run_metrics import read_run

    write_metrics(
        tmp_path / "run", [{"step": s, "loss": 5.0 - s / 10, "lm": 5.0 - s / 10} for s in (1, 2, 3)]
    )
    metrics = read_run(tmp_path / "run")
    lines = loss_lines(metrics, metrics.loss_components())
    assert [(line.label, line.values) for line in lines] == [("loss = lm", [4.9, 4.8, 4.7])]


def test_moving_average_and_its_window():
    from dharma_kernel.report import moving_average, smoothing_window

    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([3.0, 1.0], 1) == [3.0, 1.0]
    assert [smoothing_window(n) for n in (12, 19, 20, 60, 390)] == [1, 1, 2, 3, 19]


def test_noisy_curves_are_faint_under_their_average_and_perplexity_is_on_a_log_scale(
    tmp_path, capsys, monkeypatch
):
    from dharma_kernel import report

    drawn = {}
    draw = report._draw

    def recording(figure, lines, ylabel, *args, **kwargs):
        draw(figure, lines, ylabel, *args, **kwargs)
        axes = figure.axes[0]
        drawn[ylabel] = (axes.get_yscale(), [(line.get_alpha(), line.get_label()) for line in axes.lines])

    monkeypatch.setattr(report, "_draw", recording)
    steps = [dict(r, tok_per_s=1000.0 + 50 * (-1) ** r["step"]) for r in STEPS]  # noisy
    evals = [{"step": s, "eval_loss": 6.0 - s / 10, "eval_ppl": 400.0 / (s + 1)} for s in (0, 10, 20)]
    write_metrics(tmp_path / "run", steps + evals)
    assert dharma(capsys, "report", str(tmp_path / "run"))[0] == 0

    scale, loss = drawn["loss"]
    assert [label for alpha, label in loss if alpha is None] == ["lm", "loss - lm", "qa/span"]
    assert sum(alpha == 0.25 for alpha, _ in loss) == 3  # each raw curve, faintly
    assert drawn["tokens per second"][1][0][0] == 0.25
    assert drawn["learning rate"][1] == [(None, "lr")]  # a schedule is not noisy
    assert drawn["perplexity"][0] == "log"
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "Faint: each step; solid: the mean of the last 2 steps" in page
