"""Search set-up without running trials: spaces and --param grids are checked against the config before
anything starts, concurrency follows the cluster, and the report (table, files, plot, best command) reads
back into a training config."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import apply_overrides, format_override
from engine.recipes import get_recipe
from engine.search import SearchConfig, max_concurrent_trials, trial_resources
from engine.search_report import (
    ERROR,
    FINISHED,
    STOPPED,
    best_command,
    best_row,
    format_table,
    plot,
    trial_params,
    write_results,
)
from engine.spaces import SPACES, Param, parse_param, resolve
from tests.engine.test_train import data  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("value", [None, True, 3, 0.1, 2 ** (1 / 3), (1.0, 2.0), "resnet50"])
def test_format_override_parses_back_to_the_value(value) -> None:
    key = {
        type(None): "model.backbone_weights",
        bool: "eval.at_end",
        int: "eval.every",
        float: "optim.base_lr",
        tuple: "model.anchor_scales",
        str: "model.backbone",
    }[type(value)]
    cfg = apply_overrides(get_recipe("demo"), [format_override(key, value)])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize("recipe", ["demo", "coco_r50_1x"])
def test_every_named_space_is_valid_for_the_recipes(recipe: str) -> None:
    params = resolve("+".join(s for s in SPACES if s != "anchors_around"), get_recipe(recipe))
    around = resolve("anchors_around", get_recipe(recipe))  # both search anchor_ratios: not together
    assert [p.key for p in around] == ["model.anchor_sizes", "model.anchor_ratios"]
    keys = [p.key for p in params]
    assert {"model.focal_alpha", "model.focal_gamma", "model.backbone", "model.anchor_scales", "optim.base_lr"} <= set(
        keys
    )
    focal = {p.label: p.values for p in params if p.label.startswith("focal")}
    assert 0.0 in focal["focal_gamma"] and 2.0 in focal["focal_gamma"] and 0.25 in focal["focal_alpha"]
    backbones = next(p.values for p in params if p.label == "backbone")
    assert set(backbones) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"}


def test_param_grids_are_typed_like_the_config() -> None:
    cfg = get_recipe("demo")
    gamma, scales, weights = resolve(
        "", cfg, ["model.focal_gamma=0,2", "model.anchor_scales=[1,2],[1]", "model.backbone_weights=none,/w.pth"]
    )
    assert gamma.values == (0.0, 2.0) and scales.values == ((1.0, 2.0), (1.0,))
    assert weights.values == (None, "/w.pth")
    assert parse_param("model.anchor_ratios=[0.5, 1, 2], [1]").values == ("[0.5, 1, 2]", "[1]")


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("focal+nope", [], "unknown search space 'nope'; valid spaces: focal, backbone"),
        ("", [], "nothing to search"),
        ("focal", ["model.focal_gamma=0,1"], "model.focal_gamma is searched twice"),
        ("", ["model.focal_alpha=0.25,1.5"], "focal_alpha"),
        ("", ["model.no_such_key=1,2"], "no_such_key"),
        ("", ["model.focal_gamma"], "dotted.key=V1,V2"),
    ],
)
def test_bad_searches_fail_before_any_trial(spec: str, extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(spec, get_recipe("demo"), extra)


def test_search_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="without '/'"):
        SearchConfig(name="a/b", recipe="demo")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        SearchConfig(name="a", recipe="demo", scheduler="hyperband")
    with pytest.raises(ValueError, match="samples >= 1"):
        SearchConfig(name="a", recipe="demo", samples=0)
    with pytest.raises(ValueError, match="0 < low < high"):
        Param("optim.base_lr", low=1.0, high=0.1)


def test_concurrency_follows_the_cluster() -> None:
    gpu = trial_resources(get_recipe("coco_r50_1x"))  # 8 workers x (8 CPUs, 1 GPU) + the trial's driver
    assert gpu["GPU"] == 8 and gpu["CPU"] == 64.25
    assert max_concurrent_trials(gpu, {"CPU": 208.0, "GPU": 16.0}) == 2  # two p5 nodes and a head
    assert max_concurrent_trials(gpu, {"CPU": 400.0, "GPU": 24.0}) == 3
    with pytest.raises(ValueError, match=r"one trial needs 8 GPU .* the cluster has 4: lower scaling\.num_workers"):
        max_concurrent_trials(gpu, {"CPU": 400.0, "GPU": 4.0})
    cpu = trial_resources(apply_overrides(get_recipe("tiny_cpu"), ["scaling.num_workers=1"]))
    assert max_concurrent_trials(cpu, {"CPU": 3.0}) == 2


def _rows() -> list[dict]:
    def row(trial, status, alpha, gamma, ap, step, error=""):
        return {"trial": trial, "status": status, "focal_alpha": alpha, "focal_gamma": gamma, "AP": ap,
                "AP50": ap and ap * 2, "best_AP": ap, "loss": 0.5, "step": step, "error": error}  # fmt: skip

    return [
        row("t4", STOPPED, 0.75, 0.0, 0.40, 10),  # stopped early but higher: not the pick while one finished
        row("t1", FINISHED, 0.25, 2.0, 0.30, 20),
        row("t2", FINISHED, 0.25, 0.0, 0.10, 20),
        row("t3", ERROR, 0.5, 1.0, None, None, "ValueError: cannot read backbone weights"),
    ]


def test_best_is_a_finished_trial_and_its_command_trains_that_config() -> None:
    rows = _rows()
    params = resolve("focal", get_recipe("demo"))
    best = best_row(rows)
    assert best["trial"] == "t1"
    assert best_row([r for r in rows if r["status"] != FINISHED])["trial"] == "t4"
    line = best_command(best, params, "demo", ["optim.max_iters=100", "optim.steps=[60, 80]"], "focal")
    words = shlex.split(line)
    assert words[:4] == ["python", "jobs/train.py", "--recipe", "demo"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = apply_overrides(get_recipe("demo"), sets)
    assert (cfg.model.focal_alpha, cfg.model.focal_gamma, cfg.optim.steps) == (0.25, 2.0, (60, 80))
    assert cfg.checkpoint.name == "focal-best"
    # the line is a working command: jobs/train.py accepts it (config printed, nothing trained)
    shown = subprocess.run([sys.executable, *words[1:], "--print-config"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["model"]["focal_gamma"] == 2.0


def test_table_files_and_heat_map(tmp_path) -> None:
    rows = _rows()
    params = resolve("focal", get_recipe("demo"))
    table = format_table(rows, params)
    assert table.splitlines()[0].split() == [
        "trial",
        "status",
        "focal_alpha",
        "focal_gamma",
        *"AP AP50 best_AP loss step".split(),
    ]
    assert "t3: ValueError: cannot read backbone weights" in table
    paths = write_results(str(tmp_path / "search"), rows, params, get_recipe("demo"))
    assert [Path(p).name for p in paths] == ["results.csv", "results.json", "results.png"]
    csv_lines = (tmp_path / "search" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and csv_lines[0].startswith("trial,status,focal_alpha,focal_gamma,AP")
    saved = json.loads((tmp_path / "search" / "results.json").read_text())
    assert [t["trial"] for t in saved["trials"]] == [r["trial"] for r in rows]
    assert (tmp_path / "search" / "results.png").read_bytes().startswith(PNG)
    # other spaces: one panel per key, tuples and strings as categories, log axis for a range
    other = [
        {**r, "backbone": "resnet18", "anchor_scales": [1.0, 2.0], "base_lr": 1e-3 * (i + 1)}
        for i, r in enumerate(rows)
    ]
    keys = [Param("model.backbone", values=("resnet18",)), Param("model.anchor_scales", values=((1.0, 2.0),)),
            Param("optim.base_lr", low=1e-4, high=1e-2)]  # fmt: skip
    assert plot(other, keys, "t").startswith(PNG)
    assert plot([], params, "no trial reported").startswith(PNG)


def test_a_search_ranked_by_one_class_names_its_metric(tmp_path) -> None:
    from engine.search import check_metric

    rows = [{**r, "AP/dog": ap} for r, ap in zip(_rows(), (0.1, 0.2, 0.6, None), strict=True)]
    params = resolve("focal", get_recipe("demo"))
    assert best_row(rows, "AP/dog")["trial"] == "t2"  # the best finished trial by AP/dog, not by AP
    assert format_table(rows, params, "AP/dog").splitlines()[0].split()[4:6] == ["AP/dog", "best_AP/dog"]
    write_results(str(tmp_path / "s"), rows, params, get_recipe("demo"), "AP/dog")
    assert json.loads((tmp_path / "s" / "results.json").read_text())["metric"] == "AP/dog"
    assert "AP/dog,best_AP/dog" in (tmp_path / "s" / "results.csv").read_text().splitlines()[0]
    for good in ("AP", "AP50", "APs", "AR100", "AP/dog", "AP50/dog"):
        check_metric(good, ["cat", "dog"])
    for bad in ("ap", "AP75/dog", "AP/unicorn", "loss"):
        with pytest.raises(ValueError, match="is not reported: use one of AP, AP50"):
            check_metric(bad, ["cat", "dog"])


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_tune_cli_errors_before_starting(tmp_path, data, monkeypatch, capsys) -> None:  # noqa: F811
    """One error through the real command line (an ``error:`` line, no traceback); the others through the
    same ``main`` in this process (seconds, not a Python start with Ray's imports each)."""
    base = ["--recipe", "tiny_cpu", "--set", f"data.train_uri={data['train']}", "--set",
            f"data.val_uri={data['val']}", "--set", f"checkpoint.storage_path={tmp_path}"]  # fmt: skip
    done = subprocess.run([sys.executable, "jobs/tune.py", *base, "--space", "focal+nope"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "error: unknown search space 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import importlib

    tune_job = importlib.import_module("tune")

    def tune(*args: str) -> str:
        capsys.readouterr()
        code = tune_job.main([*base, *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: "), (args, code, err[-2000:])
        return err

    (tmp_path / "nofit.json").write_text('{"images": 1}')
    for args, message in [
        (["--space", "focal", "--set", "data.val_uri=none"], "set data.val_uri"),
        (["--space", "focal", "--resume"], "no search named 'tiny_cpu-focal'"),
        (["--param", "model.focal_alpha=0.5,7"], "focal_alpha"),
        (["--space", "anchors", "--anchors-from", str(tmp_path / "no.json")], "no report at"),
        (["--space", "focal", "--metric", "AP/unicorn"], "--metric 'AP/unicorn' is not reported"),
        (["--space", "anchors", "--anchors-from", str(tmp_path / "nofit.json")], "holds no anchor fit"),
        *([(["--space", "lr", "--searcher", "optuna"], "pip install optuna")] if not _has("optuna") else []),
    ]:
        assert message in tune(*args), args
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "search.json").write_text("{}")
    assert "add --resume to continue it, or pick --name" in tune("--space", "focal", "--name", "taken")
    assert "--resume must repeat the search's arguments" in tune("--space", "focal", "--name", "taken", "--resume")


def test_a_trial_that_never_reported_keeps_its_sampled_values(tmp_path) -> None:
    """``Result.config`` is None for a trial stopped or failed before its first report; its row reads the
    values from the ``params.json`` Tune wrote into the trial folder (none: empty, not a crash)."""
    trial = tmp_path / "trial_0001"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"model.focal_alpha": 0.5, "model.focal_gamma": 2.0}))
    assert trial_params(str(trial)) == {"model.focal_alpha": 0.5, "model.focal_gamma": 2.0}
    assert trial_params(str(tmp_path / "missing")) == {}
    (trial / "params.json").write_text("{truncated")
    assert trial_params(str(trial)) == {}
