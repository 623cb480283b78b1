"""The typed property registry (DESIGN §11).

Every resilient_db property is declared once here, as a :class:`Property`: public name, type,
default, unit, description, validator and owning plugin. The registry validates input, rejects
unknown names with a suggestion, converts durations to float seconds once (inside the library no
name carries a unit) and generates ``docs/parameters.md``.

Public names follow the AWS Advanced Python Wrapper where it has an equivalent, with its unit
suffix and unit (``failover_timeout_sec`` in seconds, ``failure_detection_time_ms`` in
milliseconds); new names take seconds as a float and carry no suffix. Code reads a value with
``settings[PROPERTY]``, typed by the property, never by a string key.

Third-party plugins declare their own ``Property`` objects in ``Plugin.properties``; they are
accepted when that plugin is selected.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from ._aws_properties import aws_unsupported
from ._conninfo import REDACTED
from .errors import ConfigurationError

T = TypeVar("T")

#: The longest duration any property accepts: a day. A longer timeout is "none" in practice,
#: and a bound keeps every deadline finite for the watchdog's and ``threading``'s clock
#: arithmetic (``Event.wait`` raises ``OverflowError`` beyond ``threading.TIMEOUT_MAX``).
MAX_DURATION_SECONDS = 86_400.0

_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds"}

_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f"})


@dataclass(frozen=True, eq=False)
class Property(Generic[T]):
    """One property: how to read it from user input and what it means.

    ``unit`` is the unit the *user* writes (``"s"`` or ``"ms"``); the stored value is always
    float seconds. ``plugin`` is the owning plugin code (``None`` for the core).
    ``driver_param`` marks a name the target driver reads too (e.g. ``connect_timeout``): we
    read it and still forward it.
    """

    name: str
    type_name: str
    default: T
    description: str
    convert: Callable[[Property[T], object], T] = field(repr=False)
    unit: str | None = None
    plugin: str | None = None
    driver_param: bool = False
    choices: tuple[str, ...] = ()
    aws_name: bool = False
    #: The accepted values in the user's unit (``"50 to 86400000"``), for errors and the docs.
    range_text: str = ""
    #: The value is a secret: errors show ``'***'`` instead of it.
    secret: bool = False

    def parse(self, value: object) -> T:
        """Convert user input (any type, strings coerced) or raise ``ConfigurationError``."""
        return self.convert(self, value)

    def fail(self, value: object, expected: str) -> ConfigurationError:
        """The error for a bad ``value``: names the property, the value, what is accepted and
        the fix (leaving the property out gives the documented default)."""
        shown = REDACTED if self.secret else value
        if self.range_text and self.range_text not in expected:
            expected += f" in the range {self.range_text}"
        text = repr(shown)
        if len(text) > 80:  # e.g. 10**400: the message must stay readable
            text = text[:60] + f"... ({len(text)} characters)"
        if self.default is None:
            fix = f"leave {self.name} out to keep it unset"
        else:
            unit = f" {_UNIT_WORDS[self.unit]}" if self.unit else ""
            fix = f"leave {self.name} out for the default, {self.default_text()}{unit}"
        return ConfigurationError(
            f"property {self.name!r}: invalid value {text}; expected {expected} ({fix})",
            parameter=self.name,
            value=shown,
        )

    def default_text(self) -> str:
        """The default as a user writes it (in the property's own unit)."""
        if self.default is None:
            return "(none)"
        if self.unit == "ms" and isinstance(self.default, float):
            return f"{self.default * 1000:g}"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default)) or '""'
        return str(self.default)


# --- converters ---------------------------------------------------------------------------

def parse_bool(value: object) -> bool | None:
    """``value`` as a boolean (bools, 0/1, and words like true/off), ``None`` if it is not one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    return None


def _to_bool(prop: Property[bool], value: object) -> bool:
    result = parse_bool(value)
    if result is None:
        raise prop.fail(value, "a boolean (true/false, 1/0, yes/no, on/off)")
    return result


def _number(prop: Property[Any], value: object, *, integer: bool) -> float:
    if isinstance(value, bool):
        raise prop.fail(value, "a number, not a boolean")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range, e.g. 10**400
            raise prop.fail(value, "a finite number") from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise prop.fail(value, "a number") from None
    else:
        raise prop.fail(value, f"a number, not {type(value).__name__}")
    if math.isnan(number) or math.isinf(number):
        raise prop.fail(value, "a finite number")
    if integer and not number.is_integer():
        raise prop.fail(value, "a whole number")
    return number


def _fmt(number: float) -> str:
    """``number`` as a user writes it: ``86400000``, not ``8.64e+07``."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _unset(prop: Property[Any], value: object, expected: str) -> None:
    """Accept ``None`` or an empty string (the property stays unset) only where unset is the
    documented default; elsewhere it would silently mean "no limit"."""
    if prop.default is not None:
        raise prop.fail(value, expected)


# --- declaration helpers -----------------------------------------------------------------

REGISTRY: dict[str, Property[Any]] = {}


def _register(prop: Property[T]) -> Property[T]:
    if prop.name in REGISTRY:
        raise RuntimeError(f"property {prop.name!r} declared twice")
    REGISTRY[prop.name] = prop
    return prop


def boolean(name: str, default: bool, description: str, **kw: Any) -> Property[bool]:
    return _register(Property(name, "bool", default, description, _to_bool, **kw))


def integer(
    name: str,
    default: int | None,
    description: str,
    *,
    minimum: int = 0,
    maximum: int = 2**31 - 1,
    **kw: Any,
) -> Property[int | None]:
    """A whole number from ``minimum`` to ``maximum`` (by default what fits a C ``int``, as
    drivers pass counts on). ``None`` (or an empty string) means unset, accepted only when
    ``default`` is ``None``."""
    range_text = f"{minimum} to {maximum}"
    expected = f"a whole number from {range_text}"

    def convert(prop: Property[int | None], value: object) -> int | None:
        if _blank(value):
            _unset(prop, value, expected)
            return None
        number = _number(prop, value, integer=True)
        if not minimum <= number <= maximum:
            raise prop.fail(value, expected)
        return int(number)

    return _register(Property(name, "int", default, description, convert,
                              range_text=range_text, **kw))


def duration(
    name: str,
    default_seconds: float | None,
    description: str,
    *,
    unit: str = "s",
    minimum: float = 0.0,
    maximum: float | None = None,
    allow_zero: bool = True,
    zero: str | None = None,
    **kw: Any,
) -> Property[float | None]:
    """A duration the user writes in ``unit`` (``"s"`` or ``"ms"``), stored as float seconds.

    Accepted: ``minimum`` to ``maximum`` (in ``unit``; ``maximum`` defaults to a day); with
    ``minimum`` 0, ``allow_zero=False`` excludes 0 itself. ``zero`` documents what 0 means
    when that meaning lies outside the range (e.g. "no deadline"); 0 is then accepted too.
    ``None`` (or an empty string) means unset, accepted only when ``default_seconds`` is
    ``None`` (the description says what unset means).
    """
    factor = 0.001 if unit == "ms" else 1.0
    top = MAX_DURATION_SECONDS / factor if maximum is None else maximum
    if minimum == 0 and not allow_zero:
        range_text = f"more than 0, up to {_fmt(top)}"
    else:
        range_text = f"{_fmt(minimum)} to {_fmt(top)}"
    if zero is not None:
        range_text += f"; 0: {zero}"
    expected = f"a duration in {_UNIT_WORDS[unit]}, {range_text}"

    def convert(prop: Property[float | None], value: object) -> float | None:
        if _blank(value):
            _unset(prop, value, expected)
            return None
        number = _number(prop, value, integer=False)
        if number == 0 and zero is not None:
            return 0.0
        if not minimum <= number <= top or (number == 0 and not allow_zero):
            raise prop.fail(value, expected)
        return number * factor

    return _register(
        Property(name, f"duration ({unit})", default_seconds, description, convert, unit=unit,
                 range_text=range_text, **kw)
    )


def text(
    name: str,
    default: str | None,
    description: str,
    *,
    validate: Callable[[str], str | None] | None = None,
    **kw: Any,
) -> Property[str | None]:
    """A string; ``validate`` returns an error description or ``None`` when the value is fine."""

    def convert(prop: Property[str | None], value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise prop.fail(value, f"a string, not {type(value).__name__}")
        if validate is not None:
            problem = validate(value)
            if problem is not None:
                raise prop.fail(value, problem)
        return value

    return _register(Property(name, "str", default, description, convert, **kw))


def choice(
    name: str, default: str | None, choices: Iterable[str], description: str, *,
    aliases: Mapping[str, str] | None = None, **kw: Any
) -> Property[str | None]:
    """One of ``choices`` (case-insensitive, ``-`` or ``_``). ``aliases`` maps other accepted
    spellings (the AWS wrapper's values) to one of ``choices``."""
    options = tuple(choices)
    other = {a.replace("_", "-"): target for a, target in (aliases or {}).items()}

    def convert(prop: Property[str | None], value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise prop.fail(value, f"one of {', '.join(options)}")
        low = value.strip().lower().replace("_", "-")
        for option in options:
            if option.replace("_", "-") == low:
                return option
        if low in other:
            return other[low]
        hint = _suggest(low, options)
        raise prop.fail(value, f"one of {', '.join(options)}{hint}")

    return _register(
        Property(name, "choice", default, description, convert, choices=options, **kw)
    )


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- settings ------------------------------------------------------------------------------

class Settings:
    """Validated property values of one ``connect`` call, read as ``settings[PROPERTY]``.

    Immutable after construction. ``explicit(prop)`` tells whether the user set a property.
    """

    __slots__ = ("_explicit", "_values")

    def __init__(self, values: Mapping[Property[Any], Any]) -> None:
        self._values: dict[Property[Any], Any] = dict(values)
        self._explicit = frozenset(self._values)

    def __getitem__(self, prop: Property[T]) -> T:
        try:
            return cast(T, self._values[prop])
        except KeyError:
            return prop.default

    def explicit(self, prop: Property[Any]) -> bool:
        return prop in self._explicit

    def items(self) -> list[tuple[Property[Any], Any]]:
        return list(self._values.items())

    def __repr__(self) -> str:
        shown = ", ".join(f"{p.name}={REDACTED if p.secret else v!r}"
                          for p, v in self._values.items())
        return f"Settings({shown})"


def lookup(name: str, extra: Mapping[str, Property[Any]] | None = None) -> Property[Any] | None:
    prop = REGISTRY.get(name)
    if prop is None and extra:
        prop = extra.get(name)
    return prop


def unknown_name_error(
    name: str, value: object, driver_names: Iterable[str], driver: str,
    extra: Mapping[str, Property[Any]] | None = None,
    renames: Mapping[str, str] | None = None,
) -> ConfigurationError:
    """The error for a name that is neither ours nor the driver's, with a suggestion.

    ``renames`` maps other drivers' names to this driver's (``database`` -> ``dbname``).
    A property of the AWS wrapper that resilient_db does not implement yet gets an error
    saying so (and naming its plugin), not a typo suggestion.
    """
    owner = aws_unsupported(name)
    if owner is not None:
        return ConfigurationError(
            f"known AWS property {name!r} ({owner}), not supported yet by resilient_db: remove "
            "it from the connection settings. docs/parameters.md lists the AWS properties "
            "resilient_db implements and the ones it does not yet.",
            parameter=name,
            value=value,
        )
    if renames and name in renames:
        hint = f" (did you mean {renames[name]!r}? {driver} calls it that)"
    else:
        ours = list(REGISTRY) + list(extra or ())
        hint = _suggest(name, ours + list(driver_names))
    return ConfigurationError(
        f"unknown connection parameter {name!r}: it is neither a resilient_db property nor a "
        f"{driver} connect parameter{hint}. See docs/parameters.md for resilient_db properties.",
        parameter=name,
        # Never the value: an unknown name may be a misspelled password key ("pasword"), and
        # the value does not help fix the name.
        value=REDACTED,
    )
