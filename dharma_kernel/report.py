"""``dharma report``: a run's metrics as PNG plots and one self-contained HTML page.

The page embeds every plot as a base64 PNG and carries its own style: it opens
offline, from an e-mail or an artifact store, with no request to anywhere.
matplotlib (the ``report`` extra) draws with its Agg backend, so no display is needed.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DharmaError
from .run_metrics import RunMetrics

DPI = 100
LINE_SIZE = (800, 400)  # pixels of every line plot


def heatmap_size(modules: int) -> tuple[int, int]:
    """Pixels of the activation heatmap: grows with the number of modules (and concepts, one more)."""
    return max(800, 300 + 24 * (modules + 1)), max(400, 200 + 24 * modules)


@dataclass
class Plot:
    name: str  # file stem: loss, lr, throughput, eval_perplexity, activation
    title: str
    path: Path
    caption: str


@dataclass
class Report:
    html: Path
    plots: list[Plot] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # plot name -> why it was not drawn


def write_report(metrics: RunMetrics, out_dir: str | Path) -> Report:
    """Draw the plots the metrics allow into ``out_dir`` and write ``report.html`` beside them."""
    plt = _pyplot()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DharmaError(
            f"cannot create {out}: {err.strerror}", hint="Choose another -o directory."
        ) from None
    report = Report(out / "report.html")

    def add(name: str, title: str, caption: str, draw: Any, size: tuple[int, int] = LINE_SIZE) -> None:
        figure = plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
        try:
            draw(figure)
            figure.suptitle(title)
            path = out / f"{name}.png"
            figure.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays as stated
        finally:
            plt.close(figure)
        report.plots.append(Plot(name, title, path, caption))

    components = [c for c in metrics.loss_components() if metrics.series(c)[0]]
    if components:
        lines = loss_lines(metrics, components)
        add(
            "loss",
            "Training loss by component",
            _loss_caption(lines) + _smoothing_caption(lines),
            lambda f: _draw(f, lines, "loss", smooth=True),
        )
    else:
        report.missing["loss"] = "no step logged a finite loss"
    for name, key, title, label in (
        ("lr", "lr", "Learning rate", "learning rate"),
        ("throughput", "tok_per_s", "Throughput", "tokens per second"),
    ):
        if metrics.series(key)[0]:
            noisy = key == "tok_per_s"  # the learning rate follows its schedule exactly
            series = [Line(key, *metrics.series(key))]
            add(
                name,
                title,
                f"{label} at each optimizer step" + (_smoothing_caption(series) if noisy else ""),
                lambda f, s=series, y=label, n=noisy: _draw(f, s, y, smooth=n),
            )
        else:
            report.missing[name] = f"no step record has {key}"
    if metrics.series("eval_ppl", "evals")[0]:
        add(
            "eval_perplexity",
            "Eval perplexity",
            "perplexity on the held-out set at each evaluation (step 0: before training), on a log scale",
            lambda f: _lines(f, metrics, ["eval_ppl"], "perplexity", records="evals", marker="o", log=True),
        )
    elif not metrics.evals:
        report.missing["eval_perplexity"] = "no evaluation was logged: the run had no eval data"
    if metrics.series("eval_auc_median", "evals")[0]:
        add(
            "eval_auc",
            "Module concept detection (median AUC)",
            "median over the modules of each one's ROC-AUC at the eval tokens: how well its score tells "
            "tokens labelled with its concept from the others (0.5: chance, 1: perfect)",
            lambda f: _lines(f, metrics, ["eval_auc_median"], "median AUC", records="evals", marker="o"),
        )
    elif metrics.activations:
        report.missing["eval_auc"] = "no evaluation had enough labelled tokens for an AUC"
    if head := metrics.head_metrics():
        add(
            "eval_metrics",
            "Eval metrics of the head",
            "the task head's metrics on the eval data at each evaluation (step 0: before fine-tuning)",
            lambda f: _lines(f, metrics, head, "score", records="evals", marker="o"),
        )
    if metrics.activations:
        table = metrics.activations[-1]
        add(
            "activation",
            f"Module activation by concept (eval, step {table['step']})",
            "mean activation score of each module (row) on the eval tokens labelled with each concept "
            "(column; in brackets, how many tokens); 'none': tokens with no concept"
            + _diagonal_caption(table),
            lambda f: _heatmap(f, table),
            heatmap_size(len(table["modules"])),
        )
    else:
        report.missing["activation"] = (
            "no activation table in metrics.jsonl: the model has no modules, the run had no eval data, "
            "or an older dharma trained it"
        )
    for name in report.missing:
        (out / f"{name}.png").unlink(missing_ok=True)  # an earlier report's plot would mislead
    report.html.write_text(_page(metrics, report), encoding="utf-8")
    return report


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise DharmaError(
            "dharma report draws with matplotlib, which is not installed",
            hint="Run: pip install 'dharma-kernel[report]' (or pip install matplotlib).",
        ) from None
    matplotlib.use("Agg", force=True)  # files only; never a window, even where a display exists
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Line:
    """One curve of a plot: its legend label and its points."""

    label: str
    steps: list[int]
    values: list[float]


TOTAL_LESS_LM = "loss - lm"


def loss_lines(metrics: RunMetrics, components: list[str]) -> list[Line]:
    """The loss plot's curves. The weighted total (``loss``) lies on ``lm`` or within a small
    distance of it, where one hides the other: what is drawn is ``lm`` and ``loss - lm`` (what the
    other weighted losses add), or one ``loss = lm`` line when they are equal at every step."""
    lines = [Line(key, *metrics.series(key)) for key in components]
    by_label = {line.label: line for line in lines}
    total, lm = by_label.get("loss"), by_label.get("lm")
    if total is None or lm is None or total.steps != lm.steps:
        return lines
    rest = [t - m for t, m in zip(total.values, lm.values, strict=True)]
    lines.remove(total)
    if all(abs(r) <= 1e-9 * max(1.0, abs(t)) for r, t in zip(rest, total.values, strict=True)):
        lm.label = "loss = lm"
    else:
        lines.insert(lines.index(lm) + 1, Line(TOTAL_LESS_LM, total.steps, rest))
    return lines


def _loss_caption(lines: list[Line]) -> str:
    labels = [line.label for line in lines]
    text = f"{', '.join(labels)} at each optimizer step"
    if TOTAL_LESS_LM in labels:
        return text + (
            "; 'loss' is the weighted total the optimizer saw, drawn as what it adds to 'lm' "
            f"('{TOTAL_LESS_LM}'); the others are the unweighted components"
        )
    if "loss = lm" in labels:
        return text + "; the weighted total the optimizer saw equals the LM loss at every step"
    return text + "; 'loss' is the weighted total the optimizer saw, the others are the unweighted components"


# A curve of this many points or more is noisy step to step: drawn faintly, a moving average on top.
SMOOTH_FROM = 20


def smoothing_window(points: int) -> int:
    """Steps in the moving average of a curve of ``points`` points (1: drawn as it is)."""
    return max(2, points // 20) if points >= SMOOTH_FROM else 1


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _smoothing_caption(lines: list[Line]) -> str:
    window = smoothing_window(max(len(line.values) for line in lines))
    if window == 1:
        return ""
    return f". Faint: each step; solid: the mean of the last {window} steps"


def _lines(
    figure: Any,
    metrics: RunMetrics,
    keys: list[str],
    ylabel: str = "loss",
    records: str = "steps",
    marker: str | None = None,
    log: bool = False,
) -> None:
    _draw(figure, [Line(key, *metrics.series(key, records)) for key in keys], ylabel, marker, log=log)


def _draw(
    figure: Any,
    lines: list[Line],
    ylabel: str,
    marker: str | None = None,
    smooth: bool = False,
    log: bool = False,
) -> None:
    axes = figure.add_subplot(1, 1, 1)
    low = math.inf
    high = 0.0
    for line in lines:
        window = smoothing_window(len(line.values)) if smooth else 1
        if window > 1:
            (raw,) = axes.plot(line.steps, line.values, linewidth=1.0, alpha=0.25)
            average = moving_average(line.values, window)
            axes.plot(line.steps, average, label=line.label, color=raw.get_color(), linewidth=1.8)
        else:
            axes.plot(line.steps, line.values, label=line.label, marker=marker, linewidth=1.5)
        low, high = min(low, *line.values), max(high, *line.values)
    # Components can differ by orders of magnitude (an LM loss of 6, a balance loss of 0.01).
    if log or (low > 0 and high / low > 50):
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if len(lines) > 1:
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout(rect=(0, 0, 1, 0.93))


def _diagonal_caption(table: dict[str, Any]) -> str:
    share = table.get("diagonal")
    if share is None:
        return ""
    return f". {share:.0%} of the modules are highest on their own concept (the diagonal)"


def _heatmap(figure: Any, table: dict[str, Any]) -> None:
    import numpy as np

    modules, concepts = table["modules"], table["concepts"]
    values = np.array([[math.nan if v is None else v for v in row] for row in table["mean"]], dtype=float)
    axes = figure.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no eval token had that concept
    image = axes.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap)
    axes.set_yticks(range(len(modules)), modules, fontsize="small")
    labels = [f"{c} ({n})" for c, n in zip(concepts, table["tokens"], strict=True)]
    axes.set_xticks(range(len(concepts)), labels, rotation=45, ha="right", fontsize="small")
    axes.set_xlabel("concept labelled on the eval tokens")
    axes.set_ylabel("module")
    if len(modules) <= 12:
        for (i, j), value in np.ndenumerate(values):
            if not math.isnan(value):
                light = image.norm(value) > 0.6  # viridis turns yellow: dark text there
                color = "black" if light else "white"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize="small")
    figure.colorbar(image, ax=axes, label="mean activation")
    figure.tight_layout(rect=(0, 0, 1, 0.93))


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def _page(metrics: RunMetrics, report: Report) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Training report: {e(metrics.path.resolve().name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Training report: {e(metrics.path.resolve().name)}</h1>",
        "<h2>Summary</h2>",
        _table(["", ""], _summary(metrics)),
    ]
    for plot in report.plots:
        data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
        parts += [
            f'<h2 id="{e(plot.name)}">{e(plot.title)}</h2>',
            f'<figure><img src="data:image/png;base64,{data}" alt="{e(plot.title)}">',
            f"<figcaption>{e(plot.caption)}</figcaption></figure>",
        ]
    if metrics.evals:
        parts += [
            "<h2>Evaluations</h2>",
            _table(
                ["step", "eval loss", "perplexity", "tokens"],
                [
                    [
                        str(r["step"]),
                        _number(r.get("eval_loss")),
                        _number(r.get("eval_ppl")),
                        _count(r.get("eval_tokens")),
                    ]
                    for r in metrics.evals
                ],
            ),
        ]
    if report.missing:
        parts.append("<h2>Not drawn</h2><ul>")
        parts += [f"<li>{e(name)}: {e(why)}</li>" for name, why in report.missing.items()]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(metrics: RunMetrics) -> list[list[str]]:
    rows = [["run directory", str(metrics.path.resolve())]]
    if metrics.steps:
        last = metrics.steps[-1]
        rows.append(["steps logged", f"{len(metrics.steps)} (last: step {last['step']})"])
        rows.append(["tokens trained", _count(last.get("tokens"))])
        rows.append(["last loss", _number(last.get("loss"))])
        skipped = sum(1 for r in metrics.steps if r.get("skipped"))
        rows.append(["non-finite steps skipped", str(skipped)])
        _, speeds = metrics.series("tok_per_s")
        if speeds:
            rows.append(["median tokens/s", f"{sorted(speeds)[len(speeds) // 2]:,.0f}"])
    best = metrics.best_eval()
    if best is not None:
        shown = ", ".join(
            f"{key.removeprefix('eval_')} {_number(best.get(key))}"
            for key in ("eval_loss", "eval_ppl", *metrics.head_metrics())
            if best.get(key) is not None
        )
        rows.append(["best evaluation (lowest eval loss)", f"step {best['step']}: {shown}"])
    if metrics.evals and metrics.evals[0]["step"] == 0 and metrics.evals[0].get("eval_ppl") is not None:
        rows.append(["eval perplexity before training", _number(metrics.evals[0].get("eval_ppl"), 2)])
    if metrics.skipped_lines:
        rows.append(["unreadable last line (ignored)", ", ".join(map(str, metrics.skipped_lines))])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) and math.isfinite(value) else "-"
