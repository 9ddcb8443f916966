"""Named search spaces for ``jobs/tune.py``: each is a list of ``Param`` over dotted config keys.

Spaces combine with ``+`` (``focal+lr``); ``--param KEY=V1,V2`` adds a grid over any other key. A
``Param`` is either a list of values (a grid under the default searcher, a choice under Optuna) or a
continuous range (sampled ``--samples`` times).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from engine.config import TrainConfig, apply_overrides, format_override


@dataclass(frozen=True)
class Param:
    """One searched config key: ``values`` (discrete) or ``low``..``high`` (continuous, log-uniform if ``log``)."""

    key: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = True

    def __post_init__(self) -> None:
        continuous = self.low is not None or self.high is not None
        if bool(self.values) == continuous:
            raise ValueError(f"search parameter {self.key}: give either values or a low..high range, not both")
        if continuous and not (self.low is not None and self.high is not None and 0 < self.low < self.high):
            raise ValueError(f"search parameter {self.key}: need 0 < low < high, got {self.low}..{self.high}")

    @property
    def label(self) -> str:
        """The key without its section, for tables and plots: ``focal_alpha``."""
        return self.key.rsplit(".", 1)[-1]

    def domain(self, grid: bool) -> Any:
        """The Ray Tune domain: ``grid_search`` over values (``grid``) or ``choice``; ``loguniform``/``uniform``."""
        from ray import tune

        if self.values:
            values = [list(v) if isinstance(v, tuple) else v for v in self.values]
            return tune.grid_search(values) if grid else tune.choice(values)
        return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)


def focal(cfg: TrainConfig) -> list[Param]:
    """The paper's Table 1a/1b at small scale: alpha x gamma, gamma = 0 being the alpha-balanced CE."""
    return [
        Param("model.focal_alpha", values=(0.25, 0.5, 0.75)),
        Param("model.focal_gamma", values=(0.0, 1.0, 2.0)),
    ]


def backbone(cfg: TrainConfig) -> list[Param]:
    return [Param("model.backbone", values=("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"))]


def anchors(cfg: TrainConfig) -> list[Param]:
    """Anchors per location (the paper's Table 1c): 1-3 octave scales x 1 or 3 aspect ratios."""
    scales = ((1.0,), (1.0, math.sqrt(2.0)), (1.0, 2 ** (1 / 3), 2 ** (2 / 3)))
    return [Param("model.anchor_scales", values=scales), Param("model.anchor_ratios", values=((1.0,), (0.5, 1.0, 2.0)))]


def anchors_around(cfg: TrainConfig) -> list[Param]:
    """A 3 x 3 grid around the config's own anchors (the doctor's fit, with ``jobs/tune.py --anchors-from``):
    sizes times 2^-1/4, 1 and 2^1/4 x the ratios' log spread times 0.7, 1 and 1.4 (one ratio: the ratio
    times those); scales and the anchor count kept."""
    from engine.anchor_fit import centred_ratios

    m = cfg.model
    sizes = tuple(tuple(round(s * f, 1) for s in m.anchor_sizes) for f in (2**-0.25, 1.0, 2**0.25))
    ratios = tuple(dict.fromkeys(centred_ratios(tuple(m.anchor_ratios), k) for k in (0.7, 1.0, 1.4)))
    return [Param("model.anchor_sizes", values=sizes), Param("model.anchor_ratios", values=ratios)]


def centre_on_fit(space: str, overrides: list[str], report: dict, where: str) -> tuple[str, list[str]]:
    """``--anchors-from``: the doctor's fitted anchors (``report["fit"]["set"]``) put before ``overrides``
    (so a ``--set`` still wins), and ``anchors`` in ``space`` replaced by ``anchors_around``."""
    fit = report.get("fit") if isinstance(report, dict) else None
    if not fit or not isinstance(fit.get("set"), list):
        raise ValueError(f"{where} holds no anchor fit: write one with python jobs/doctor.py --data URI --out DIR")
    names = [n.strip() for n in space.split("+") if n.strip()]
    names = ["anchors_around" if n == "anchors" else n for n in names]
    return "+".join(names), [*fit["set"], *overrides]


def lr(cfg: TrainConfig) -> list[Param]:
    """The base learning rate, log-uniform from a tenth to three times the recipe's."""
    base = cfg.optim.base_lr
    return [Param("optim.base_lr", low=base / 10, high=base * 3)]


SPACES: dict[str, Callable[[TrainConfig], list[Param]]] = {
    "focal": focal,
    "backbone": backbone,
    "anchors": anchors,
    "anchors_around": anchors_around,
    "lr": lr,
}


def resolve(spec: str, cfg: TrainConfig, extra: list[str] = ()) -> list[Param]:
    """The params of ``spec`` (``"focal"``, ``"focal+lr"``, or ``""`` for none) plus ``extra`` grids
    (``"model.focal_gamma=0,1,2"``), each value checked against ``cfg`` before any trial starts."""
    params: list[Param] = []
    for name in filter(None, (s.strip() for s in spec.split("+"))):
        if name not in SPACES:
            raise ValueError(f"unknown search space {name!r}; valid spaces: {', '.join(SPACES)} (combine with +)")
        params += SPACES[name](cfg)
    params += [parse_param(item) for item in extra]
    if not params:
        raise ValueError(f"nothing to search: name a space ({', '.join(SPACES)}) or add --param KEY=V1,V2")
    keys = [p.key for p in params]
    if dup := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"{', '.join(dup)} is searched twice: drop it from --param or the spaces")
    return [typed(p, cfg) for p in params]


def parse_param(item: str) -> Param:
    """``KEY=V1,V2,...`` -> a grid over the values as written (brackets group tuples: ``[1,2],[1]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise ValueError(f"--param {item!r} is not of the form dotted.key=V1,V2 (e.g. model.focal_gamma=0,1,2)")
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    return Param(key.strip(), values=tuple(v for v in values if v))


def typed(param: Param, cfg: TrainConfig) -> Param:
    """``param`` with each value (or both ends of a range) applied to ``cfg`` alone and read back as the
    config holds it (``"0"`` -> ``0.0``, ``"[1,2]"`` -> ``(1.0, 2.0)``): unknown keys and ill-typed or
    out-of-range values are a ``ValueError`` now, not a failed trial later."""
    parsed = [_get(apply_overrides(cfg, [as_override(param.key, v)]), param.key) for v in param.values]
    for end in () if param.values else (param.low, param.high):
        apply_overrides(cfg, [as_override(param.key, end)])
    return replace(param, values=tuple(parsed)) if param.values else param


def _get(cfg: TrainConfig, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def as_override(key: str, value: Any) -> str:
    """A sampled value as a ``--set`` item; strings from ``--param`` are passed as written."""
    return f"{key}={value}" if isinstance(value, str) else format_override(key, value)
