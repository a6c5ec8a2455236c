"""Settings of the resources: a field, its FRUIT_* variable, its default.

A resource field listed in its class's SETTINGS defaults to None, meaning "the FRUIT_* variable if
set, else the documented default", and is resolved when Dagster builds the resource for a run (a
pydantic "before" validator). Run config that names some fields of a resource therefore overrides only
those: every other field still comes from its variable. Dagster's `EnvVar` cannot do that: the values
a resource is constructed with are one default for its whole config, which run config naming the
resource replaces (issue 16: a run config with only `max_skipped_fraction` dropped
`FRUIT_MODEL_WEIGHTS` and the run went back to `imagenet`).

No Dagster here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import model_validator

T = TypeVar("T")


def project_dir() -> Path:
    """The checkout this package runs from, or the working directory when it is installed."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "pyproject.toml").exists() else Path.cwd()


def project_data_dir() -> Path:
    """`data/` of the checkout this package runs from, or of the working directory when installed."""
    return project_dir() / "data"


def default_images_uri() -> str:
    return str(project_data_dir() / "demo")


def default_storage_uri() -> str:
    return str(project_data_dir() / "assets")


# --- settings: a field, its FRUIT_* variable, its default ---


def _text(raw: str) -> str:
    return raw


def whole(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(f"below {minimum}")
        return value

    parse.expected = f"a whole number >= {minimum}"
    return parse


def fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise ValueError("outside [0, 1]")
    return value


fraction.expected = "a number from 0 to 1"


def seconds(minimum: float, *, whole: bool = False) -> Callable[[str], float]:
    """A duration in seconds, at least `minimum` (`whole`: a whole number of them)."""

    def parse(raw: str) -> float:
        value = int(raw) if whole else float(raw)
        if not value >= minimum:  # `not >=`: a NaN is refused too
            raise ValueError(f"below {minimum}")
        return value

    parse.expected = f"a {'whole ' if whole else ''}number of seconds, at least {minimum:g}"
    return parse


@dataclass(frozen=True)
class Setting:
    """Where a field left unset (None) takes its value from: `variable` if set (not empty), else `default`
    (a value, or a function of none, for defaults that depend on where the checkout is)."""

    variable: str
    default: Any
    parse: Callable[[str], Any] = _text

    def resolve(self, where: str) -> Any:
        raw = os.environ.get(self.variable, "").strip()
        if not raw:
            return self.default() if callable(self.default) else self.default
        try:
            return self.parse(raw)
        except ValueError:
            expected = getattr(self.parse, "expected", "a valid value")
            raise ValueError(f"{self.variable}={raw!r} is not {expected} (it sets {where})") from None

    def source(self, value: Any) -> str:
        """Where `value` most likely came from, for the run log."""
        raw = os.environ.get(self.variable, "").strip()
        try:
            return self.variable if raw and self.parse(raw) == value else ""
        except ValueError:
            return ""


class FromEnvironment:
    """Mixin of the resources below: fields named in SETTINGS that are None (unset, or null in run
    config) are resolved from their variable or default whenever the resource is built."""

    SETTINGS: ClassVar[dict[str, Setting]] = {}
    RESOURCE_KEY: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _resolve_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        resolved = dict(data)
        for name, setting in cls.SETTINGS.items():
            if resolved.get(name) is None:
                resolved[name] = setting.resolve(f"{cls.RESOURCE_KEY}.{name}")
        return resolved

    def log_settings(self, context) -> None:
        """One line in the run log: the values this run uses, and which came from a variable."""
        if getattr(context, "log", None) is None:
            return
        values = []
        for name in getattr(type(self), "model_fields", {}):  # the pydantic model's fields (not the mixin's)
            value = getattr(self, name)
            setting = self.SETTINGS.get(name)
            origin = setting.source(value) if setting else ""
            values.append(f"{name}={value}" + (f" ({origin})" if origin else ""))
        context.log.info(f"{self.RESOURCE_KEY}: {', '.join(values)}")


def resolved(value: T | None) -> T:
    """A setting's value once its resource is built: never None then (unset fields are resolved from
    their variable or default). For the type checker, and a clear error if that ever breaks."""
    if value is None:
        raise ValueError("a setting was used before its resource resolved it")
    return value
