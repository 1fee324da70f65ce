"""What a scenario hands back: tables for the report and the goals it checked."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """One table of the report."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


@dataclass
class Goal:
    """One goal of the issue, checked against a ratio measured in this run."""

    what: str
    target: str
    measured: str
    met: bool
    why_missed: str = ""
    """Filled in from the measurements when the goal is missed."""


@dataclass
class Outcome:
    """What a scenario measured."""

    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def ratio(x: float, target: float | None = None) -> str:
    """Two decimals; three when two would round onto the goal's target and hide which side it is on."""
    shown = f"{x:.2f}"
    if target is not None and float(shown) == target and x != target:
        shown = f"{x:.3f}"
    return shown


def mean(values: list[int] | list[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")
