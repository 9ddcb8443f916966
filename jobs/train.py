"""Train RetinaNet with Ray Train.

    python jobs/train.py --recipe demo [--set optim.max_iters=500 --set checkpoint.name=run1 ...]

Without RAY_ADDRESS an embedded local Ray starts; with it (or under ``ray job submit``) the job joins
that cluster. Rerunning with the same ``checkpoint.name`` and ``checkpoint.storage_path`` resumes. With
RETINANET_STORAGE set (the cluster YAMLs set it to the cluster's bucket), that is the default storage path.
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401

from engine.config import apply_overrides, storage_default
from engine.recipes import RECIPES, get_recipe

FORCE_HELP = "take the run over from the driver that holds its lease (that one stops at its next renewal)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help=f"one of: {', '.join(sorted(RECIPES))}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field by dotted key, e.g. optim.base_lr=0.02 (repeatable)")  # fmt: skip
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--verbose", action="store_true", help="also show Ray's own messages (same as log.verbose=true)")
    ap.add_argument("--force", action="store_true", help=FORCE_HELP)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        verbose = ["log.verbose=true"] if args.verbose else []
        cfg = apply_overrides(get_recipe(args.recipe), storage_default([*args.overrides, *verbose]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from engine.config import to_dict

        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from engine.driver import checkpoint_uri, log_dir, run_job

    result = run_job(cfg, force=args.force)
    if isinstance(result, int):
        return result
    metrics = result.metrics or {}
    print(f"\nfinished at step {metrics.get('step')}; checkpoint: {checkpoint_uri(cfg, result)}")
    print(f"logs, metrics.jsonl, TensorBoard and PNGs: {log_dir(cfg)}")
    if "AP" in metrics:
        from engine.coco_eval import format_metrics_table

        print(format_metrics_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
