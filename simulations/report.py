"""The studies' report writer: Markdown templates filled with values, and the number formats they share.

A study computes its numbers and tables; the prose around them lives in a Jinja2 template under
`simulations/templates/`, so the wording can be read and edited as Markdown. `write_report`
renders one and writes it atomically.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from fairedge.common.atomic_files import atomic_write_text


def environment() -> jinja2.Environment:
    """The templates of `simulations/templates/`; filter `fmt` is Python's `format` (`{{ x | fmt(".2f") }}`)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fairedge.simulations", "templates"),
        undefined=jinja2.StrictUndefined,  # a missing value is an error, not a blank
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Markdown, not HTML
    )
    env.filters["fmt"] = format
    return env


def render(template: str, **values: Any) -> str:
    """`simulations/templates/<template>` filled with `values`."""
    return environment().get_template(template).render(**values)


def macro(template: str, name: str, *args: Any) -> str:
    """The text of macro `name` of `template` called with `args` (a piece of a report on its own)."""
    return str(getattr(environment().get_template(template).module, name)(*args))


def write_report(path: Path, template: str, **values: Any) -> str:
    """Render `template` with `values` into `path` (atomically); returns the text."""
    text = render(template, **values)
    atomic_write_text(path, text)
    return text


def one_decimal(value: float | None, *, empty: str = "–") -> str:
    """`value` to one decimal; `empty` where a figure could not be measured (None)."""
    return empty if value is None else f"{value:.1f}"


def mean_std(values: Sequence[float], fmt: str = "{:.4f}", *, empty: str = "-") -> str:
    """`mean ± std` of the values that are not NaN (sample std; 0 for one value); `empty` when none is.

    `fmt` formats both; a sign flag in it (`{:+.2f}`) applies to the mean only.
    """
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return empty
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(sd)}"
