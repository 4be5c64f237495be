"""Domain skill against hallucination removed: which runs no other run beats on both axes.

A recipe that anchors harder keeps more of the base's behaviour off-domain and usually learns less of
the domain. Each run is a point: x = domain skill (``indomain_f1``, field F1 of the in-domain dense
captions; ``indomain_name_f1``, the same without boxes), y = the share of the drifting run's (vanilla
SFT's) excess out-of-domain hallucination over the base that it removes (``ood_excess_removed`` over
every OOD caption, ``ood_excess_removed_<group>`` per scene group, as :mod:`anchorkd.eval.compare`
computes them). The base and the drifting run are reference points at y = 1 and y = 0 by definition.

A run is on the *Pareto frontier* of a (skill, group) pair when no other run is at least as good on
both axes and strictly better on one; equal points do not beat each other, so ties stay on the frontier
together. Only the points' values (the seed means) decide; the spread is shown, not used.

Pure functions over metric dicts: no model, no plotting (:mod:`anchorkd.eval.report` draws the chart).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from anchorkd.eval.compare import EXCESS_REMOVED_PREFIX
from anchorkd.io import finite_number

SKILL_KEYS = ("indomain_f1", "indomain_name_f1")
"""The x axes, one chart panel each: field F1 and name F1 of the in-domain dense captions."""

STD_SUFFIX = "_std"

# Excess removed of the reference runs, by definition: the base is where every run should be, the
# drifting run is what it should not become.
BASE_EXCESS_REMOVED = 1.0
DRIFT_EXCESS_REMOVED = 0.0


@dataclass(frozen=True)
class ParetoPoint:
    """One run in one (skill, excess) plane: its values (seed means) and their seed spread (std)."""

    run: str
    x: float
    y: float
    x_std: float | None = None
    y_std: float | None = None
    reference: bool = False  # the base or the drifting run: y is 1 or 0 by definition


@dataclass(frozen=True)
class ParetoSeries:
    """The points of every run in one (skill, excess) plane, and those on its frontier."""

    skill_key: str
    excess_key: str
    points: tuple[ParetoPoint, ...]
    frontier: tuple[ParetoPoint, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "skill": self.skill_key,
            "excess_removed": self.excess_key,
            "points": [asdict(point) for point in self.points],
            "frontier": [point.run for point in self.frontier],
        }


def dominates(a: ParetoPoint, b: ParetoPoint) -> bool:
    """Whether ``a`` beats ``b``: at least as high on both axes and higher on one."""
    return a.x >= b.x and a.y >= b.y and (a.x > b.x or a.y > b.y)


def pareto_frontier(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates, highest skill first (then lowest y, then by run name).

    Both axes are "higher is better". Identical points do not dominate each other, so a tie on the
    frontier keeps every run of it.
    """
    kept = [point for point in points if not any(dominates(other, point) for other in points)]
    return sorted(kept, key=lambda point: (-point.x, point.y, point.run))


def excess_removed_keys(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ``ood_excess_removed[_GROUP]`` metrics some run has a value of: the pooled one first, then
    the groups in the order they appear."""
    keys: dict[str, None] = {}
    for metrics in runs.values():
        for key, value in metrics.items():
            if (
                key.startswith(EXCESS_REMOVED_PREFIX)
                and not key.endswith(STD_SUFFIX)
                and finite_number(value) is not None
            ):
                keys[key] = None
    return sorted(keys, key=lambda key: key != EXCESS_REMOVED_PREFIX)


def seed_spread(
    name: str, key: str, runs: Mapping[str, Mapping[str, Any]], per_seed: Mapping[Any, Mapping] | None
) -> float | None:
    """The spread of run ``name``'s ``key`` across seeds: its ``<key>_std`` when the run carries one,
    else the sample std of its per-seed values (``per_seed[seed][name][key]``, two seeds or more).

    The second serves metrics that seed aggregation takes of the seed means (the testbed's excess
    removed is a ratio of seed-mean rates, so it has no ``_std`` of its own)."""
    carried = finite_number(runs[name].get(key + STD_SUFFIX))
    if carried is not None:
        return carried
    values = [
        value
        for metrics in (per_seed or {}).values()
        if (value := finite_number((metrics.get(name) or {}).get(key))) is not None
    ]
    return statistics.stdev(values) if len(values) > 1 else None


def pareto_points(
    runs: Mapping[str, Mapping[str, Any]],
    skill_key: str,
    excess_key: str,
    *,
    base_run: str | None = None,
    drift_run: str | None = None,
    per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[ParetoPoint]:
    """One point per run that has both values, in the order of ``runs``.

    The base (y = 1) and the drifting run (y = 0) join as reference points when named, when they have a
    skill value, and when some other run has ``excess_key`` (else the plane is empty anyway). ``per_seed``
    (``{seed: {run: metrics}}``) gives spreads that the runs do not carry (:func:`seed_spread`).
    """
    measured = {
        name: (finite_number(metrics.get(skill_key)), finite_number(metrics.get(excess_key)))
        for name, metrics in runs.items()
        if name not in (base_run, drift_run)
    }
    points = []
    if any(x is not None and y is not None for x, y in measured.values()):
        for name in runs:
            if name in (base_run, drift_run):
                x = finite_number(runs[name].get(skill_key))
                y = BASE_EXCESS_REMOVED if name == base_run else DRIFT_EXCESS_REMOVED
                if x is not None:
                    x_std = seed_spread(name, skill_key, runs, per_seed)
                    points.append(ParetoPoint(name, x, y, x_std, None, reference=True))
                continue
            x, y = measured[name]
            if x is not None and y is not None:
                points.append(
                    ParetoPoint(
                        name,
                        x,
                        y,
                        seed_spread(name, skill_key, runs, per_seed),
                        seed_spread(name, excess_key, runs, per_seed),
                    )
                )
    return points


def pareto_series(
    runs: Mapping[str, Mapping[str, Any]],
    *,
    base_run: str | None = None,
    drift_run: str | None = None,
    per_seed: Mapping[Any, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[ParetoSeries]:
    """Points and frontier of every (skill, excess) plane with a measured run, skill by skill."""
    series = []
    for skill_key in SKILL_KEYS:
        for excess_key in excess_removed_keys(runs):
            points = pareto_points(
                runs, skill_key, excess_key, base_run=base_run, drift_run=drift_run, per_seed=per_seed
            )
            if any(not point.reference for point in points):
                series.append(
                    ParetoSeries(skill_key, excess_key, tuple(points), tuple(pareto_frontier(points)))
                )
    return series
