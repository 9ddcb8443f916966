"""Search focal-loss alpha/gamma, backbones, anchors or the learning rate with Ray Tune: every trial is one
Ray Train run (the same code path as jobs/train.py), stopped early by ASHA on validation AP.

    python jobs/tune.py --recipe demo --space focal [--set optim.max_iters=300] [--samples 1]
    python jobs/tune.py --recipe demo --space focal+lr --samples 2 --searcher optuna
    python jobs/tune.py --recipe demo --space backbone --param model.fpn_channels=64,128 --resume
    python jobs/tune.py --recipe demo --space anchors --anchors-from doctor/report.json

Spaces: focal (alpha x gamma, gamma = 0 being the alpha-balanced CE), backbone, anchors (scales x ratios per
location; with --anchors-from, a 3 x 3 grid of sizes and ratio spreads around the anchors that
jobs/doctor.py fitted, named anchors_around), lr; combine with "+". Results go to STORAGE/NAME
(STORAGE = checkpoint.storage_path): Tune's experiment, each trial's run under runs/<trial id>, and
results.csv, results.json, results.png. Rerun with --resume after an interruption: finished trials are
kept, unfinished ones continue from their checkpoints.
Without RAY_ADDRESS an embedded local Ray starts; under ``ray job submit`` the job joins that cluster.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from engine.recipes import RECIPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine.search import SCHEDULERS, SEARCHERS
    from engine.spaces import SPACES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help=f"the base run: one of {', '.join(sorted(RECIPES))}")
    ap.add_argument("--space", default="", help=f"named spaces joined by '+': {', '.join(SPACES)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of every trial's config, as in jobs/train.py (repeatable)")  # fmt: skip
    ap.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=V1,V2",
                    help="also search a grid over any key, e.g. model.fpn_channels=64,128 (repeatable)")  # fmt: skip
    ap.add_argument("--samples", type=int, default=1,
                    help="trials per grid point (random searcher) or in all (optuna); default 1")  # fmt: skip
    ap.add_argument("--scheduler", choices=SCHEDULERS, default="asha", help="asha: early stopping on AP (default)")
    ap.add_argument("--searcher", choices=SEARCHERS, default="random",
                    help="random: grids and random samples (default); optuna: model-based (needs optuna)")  # fmt: skip
    ap.add_argument("--grace-period", type=int, help="steps before ASHA may stop a trial (default: eval.every)")
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    ap.add_argument("--name", help="the search's folder under checkpoint.storage_path (default: RECIPE-SPACE)")
    ap.add_argument("--anchors-from", metavar="REPORT",
                    help="start from the anchors fitted by jobs/doctor.py (its report.json) and centre the "
                         "anchors space on them")  # fmt: skip
    ap.add_argument("--metric", default="AP",
                    help="rank and stop trials by this validation number: AP (default), AP50, APs, ... or "
                         "AP/<class>, AP50/<class> for one class")  # fmt: skip
    ap.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    return ap.parse_args(argv)


def read_report(uri: str) -> dict:
    """The doctor's report.json (local or object storage); ``ValueError`` if it is missing or not JSON."""
    import json

    from pipeline import storage

    if not storage.exists(uri):
        raise ValueError(f"no report at {uri}: write one with python jobs/doctor.py --data URI --out DIR")
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError as e:
        raise ValueError(f"{uri} is not a report.json of jobs/doctor.py: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.config import storage_default
    from engine.search import SearchConfig, run_search
    from engine.search_report import best_command, best_row, format_table, rows_from_grid, write_results
    from engine.spaces import centre_on_fit
    from pipeline.storage import StorageError

    default_name = "-".join(filter(None, [args.recipe, args.space.replace("+", "-") or "params"]))
    try:
        space, overrides = args.space, args.overrides
        if args.anchors_from:
            space, overrides = centre_on_fit(space, overrides, read_report(args.anchors_from), args.anchors_from)
        search = SearchConfig(
            name=args.name or default_name,
            recipe=args.recipe,
            overrides=storage_default(overrides),
            space=space,
            params=args.params,
            samples=args.samples,
            scheduler=args.scheduler,
            searcher=args.searcher,
            grace_period=args.grace_period,
            max_concurrent=args.max_concurrent,
            metric=args.metric,
        )
        outcome = run_search(search, resume=args.resume)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metric = search.metric
    rows = rows_from_grid(outcome.grid, outcome.params, outcome.cfg.optim.max_iters, metric)
    paths = write_results(outcome.uri, rows, outcome.params, outcome.cfg, metric)
    print(f"\n{len(rows)} trials, {outcome.concurrency} at a time; validation {metric} after each trial's last "
          "evaluation:")  # fmt: skip
    print(format_table(rows, outcome.params, metric))
    print(f"\nresults: {', '.join(paths)}")
    best = best_row(rows, metric)
    if best is None:
        print(f"no trial reported {metric}", file=sys.stderr)
        return 1
    print(f"best trial {best['trial']} ({metric} {best[metric]:.4f}); train it with:")
    print(best_command(best, outcome.params, search.recipe, search.overrides, search.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
