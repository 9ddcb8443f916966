"""What a search found: one row per trial (its searched values, final and best AP, how it ended), written as
``results.csv``/``results.json``, a PNG of AP over the searched values (an alpha x gamma heat map for the
focal space), and the best trial as a ready ``jobs/train.py`` command line.

Rows are plain dicts, so everything but ``rows_from_grid`` works without Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from collections.abc import Sequence
from typing import Any

from engine.config import TrainConfig
from engine.errors import TrainingError
from engine.spaces import Param, as_override
from pipeline import storage

FINISHED, STOPPED, ERROR = "finished", "stopped", "error"
METRIC_COLUMNS = ("AP", "AP50", "best_AP", "loss", "step")


def metric_columns(metric: str = "AP") -> tuple[str, ...]:
    """The report's metric columns: the ranked ``metric`` and its best first, then AP, AP50, loss, step."""
    if metric == "AP":
        return METRIC_COLUMNS
    return (metric, f"best_{metric}", "AP", "AP50", "loss", "step")


def _values(history, key: str) -> list[float]:
    return [] if history is None or key not in history else [a for a in history[key].tolist() if _finite(a)]


def rows_from_grid(grid, params: Sequence[Param], max_iters: int, metric: str = "AP") -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``: ``trial``, ``status`` (finished, stopped early by the
    scheduler, or error), each searched value by its label, ``AP``/``AP50`` (and ``metric``) at the last
    evaluation, ``best_AP`` (``best_<metric>``) over all evaluations, the last ``loss`` and ``step``, and
    ``error`` (first line). Sorted best ``metric`` first."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        aps, ap50s, ranked = _values(history, "AP"), _values(history, "AP50"), _values(history, metric)
        step = metrics.get("step")
        if result.error is not None:
            status = ERROR
        elif step is not None and step < max_iters:
            status = STOPPED
        else:
            status = FINISHED
        trial = metrics.get("trial_id") or str(result.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")
        row = {"trial": trial, "status": status}
        config = result.config if result.config is not None else trial_params(str(result.path))
        row.update({p.label: _plain(config.get(p.key)) for p in params})
        row.update(
            AP=aps[-1] if aps else None,
            AP50=ap50s[-1] if ap50s else None,
            best_AP=max(aps) if aps else None,
            loss=metrics.get("loss"),
            step=step,
            error=_first_line(result.error) if result.error is not None else "",
        )
        row.update({metric: ranked[-1] if ranked else None, f"best_{metric}": max(ranked) if ranked else None})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["status"] == ERROR, -(r[metric] if r[metric] is not None else -1.0)))


def trial_params(trial_dir: str) -> dict[str, Any]:
    """The sampled values from the trial folder's ``params.json`` (Tune writes it when the trial starts):
    a trial that never reported (stopped or failed before its first report) has no ``Result.config``."""
    uri = storage.join(trial_dir, "params.json")
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
    except (ValueError, storage.StorageError):
        return {}


def best_row(rows: Sequence[dict], metric: str = "AP") -> dict | None:
    """The finished trial with the highest final ``metric`` (a trial stopped early only if none finished)."""
    for wanted in ((FINISHED,), (FINISHED, STOPPED)):
        scored = [r for r in rows if r["status"] in wanted and r.get(metric) is not None]
        if scored:
            return max(scored, key=lambda r: r[metric])
    return None


def best_command(row: dict, params: Sequence[Param], recipe: str, overrides: Sequence[str], name: str) -> str:
    """``python jobs/train.py --recipe R --set ...``: the search's own overrides, then the best values."""
    sets = [*overrides, *(as_override(p.key, _tuple(row[p.label])) for p in params), f"checkpoint.name={name}-best"]
    return " ".join(["python", "jobs/train.py", "--recipe", recipe, *(f"--set {shlex.quote(s)}" for s in sets)])


def format_table(rows: Sequence[dict], params: Sequence[Param], metric: str = "AP") -> str:
    """A fixed-width text table of ``rows``, best first."""
    shown = metric_columns(metric)
    columns = ["trial", "status", *(p.label for p in params), *shown]
    cells = [[_cell(r.get(c), c in shown) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines += [f"  {r['trial']}: {r['error']}" for r in rows if r["status"] == ERROR]
    return "\n".join(lines)


def write_results(
    uri: str, rows: Sequence[dict], params: Sequence[Param], cfg: TrainConfig, metric: str = "AP"
) -> list[str]:
    """``results.csv``, ``results.json`` and ``results.png`` under ``uri`` (local or object storage)."""
    columns = ["trial", "status", *(p.label for p in params), *metric_columns(metric), "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    paths = [f"{uri}/results.csv", f"{uri}/results.json", f"{uri}/results.png"]
    storage.write_bytes(paths[0], text.getvalue().encode())
    summary = {"metric": metric, "max_iters": cfg.optim.max_iters, "trials": list(rows)}
    storage.write_bytes(paths[1], json.dumps(summary, indent=1).encode())
    title = f"{cfg.recipe}: validation {metric} after up to {cfg.optim.max_iters} steps"
    storage.write_bytes(paths[2], plot(rows, params, title=title, metric=metric))
    return paths


def plot(rows: Sequence[dict], params: Sequence[Param], title: str, metric: str = "AP") -> bytes:
    """PNG bytes: an alpha x gamma heat map of AP when both focal keys are searched over values, else one
    panel of AP per searched key. Trials stopped early are hollow markers (or marked in the cell)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = [{**r, "AP": r.get(metric)} for r in rows if r["status"] != ERROR and r.get(metric) is not None]
    labels = {p.label for p in params if p.values}
    heat = {"focal_alpha", "focal_gamma"} <= labels
    panels = [] if heat else [p for p in params]
    fig = Figure(figsize=(6.5, 5) if heat else (4.5 * max(1, len(panels)), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if heat:
        _heat_map(fig.subplots(), scored, metric)
    else:
        axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
        for ax, p in zip(axes, panels, strict=False):
            _scatter(ax, p, scored, metric)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _heat_map(ax, rows: Sequence[dict], metric: str = "AP") -> None:
    """``rows[...]["AP"]`` holds the plotted ``metric``'s value."""
    if not rows:
        ax.text(0.5, 0.5, f"no trial reported {metric}", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    alphas = sorted({r["focal_alpha"] for r in rows})
    gammas = sorted({r["focal_gamma"] for r in rows})
    grid = [[math.nan] * len(alphas) for _ in gammas]
    notes = [[""] * len(alphas) for _ in gammas]
    for r in rows:  # with other keys searched too, each cell shows its best trial
        i, j = gammas.index(r["focal_gamma"]), alphas.index(r["focal_alpha"])
        if math.isnan(grid[i][j]) or r["AP"] > grid[i][j]:
            grid[i][j] = r["AP"]
            notes[i][j] = "" if r["status"] == FINISHED else f"\nstopped @{r['step']}"
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label=metric)
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(gammas)), [f"{g:g}" for g in gammas])
    ax.set_xlabel("focal α")
    ax.set_ylabel("focal γ  (γ = 0: α-balanced CE)")
    finite = [v for line in grid for v in line if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "no result" if math.isnan(value) else f"{value:.3f}{notes[i][j]}"
            color = "black" if not math.isnan(value) and value > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)


def _scatter(ax, param: Param, rows: Sequence[dict], metric: str = "AP") -> None:
    values = [r[param.label] for r in rows]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    categories = [] if numeric else sorted({_cell(v) for v in values})
    for status, face in ((FINISHED, "C0"), (STOPPED, "none")):
        points = [
            (r[param.label] if numeric else categories.index(_cell(r[param.label])), r["AP"])
            for r in rows
            if r["status"] == status
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            label = "finished" if status == FINISHED else "stopped early"
            ax.scatter(xs, ys, facecolors=face, edgecolors="C0", label=label)
    if numeric and param.low is not None and param.log:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories, rotation=20)
    ax.set_xlabel(param.label)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) >= 0
    except (TypeError, ValueError):
        return False


def _cell(value: Any, metric: bool = False) -> str:
    if value is None:
        return "-" if metric else "none"
    if isinstance(value, float):
        return f"{value:.4f}" if metric else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(_cell(v) for v in value) + "]"
    return str(value)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    # Ray wraps the trial's exception; its last line names the real cause. The driver's TrainingError already
    # says what went wrong in words (the worker's error message): its class name is noise.
    last = lines[-1] if lines else type(error).__name__
    return last.removeprefix(f"{TrainingError.__module__}.{TrainingError.__name__}: ")[:300]
