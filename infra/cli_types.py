"""Option types the command lines share."""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan and ±inf: nan passes every range check (each comparison is false),
    and a nan or inf duration made timers re-arm at once forever (``watch`` refreshing with no pause, a frontend's
    idle timer firing ~100,000 times a second) or every call time out at once."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number
