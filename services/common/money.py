"""Money as the gateway counts it: exact decimals of USD, never binary floats.

A price is written in the catalog or providers.yaml as a decimal (`0.00002`); `Price` keeps that
decimal exactly (`.exact`, a Decimal parsed from the text) while still reading as the float nearest
to it wherever a price is only shown or sorted. Costs are Decimal arithmetic on the exact values,
rounded once to the nano-dollar (`usd()`): the unit of the usage ledger, of budgets (integer
nano-dollars, `nanos()`) and of the `X-Usage-Cost-USD` header's 9 places.

YAML turns `0.00002` into a float before any model sees it; `ExactLoader` (PyYAML's safe loader)
makes each float a `DecimalFloat` that remembers the decimal it was written as, so prices are
parsed from their text, never through a float.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Annotated, Any

import yaml
from pydantic import PlainSerializer, WrapValidator

NANO = Decimal("1e-9")  # the unit of money: a nano-dollar
NANOS_PER_USD = 10**9
ZERO = Decimal("0.000000000")  # no money, to the nano-dollar


class DecimalFloat(float):
    """A float that remembers the decimal it stands for (`exact`): what a YAML float was written as,
    or a price. Arithmetic on it is float arithmetic; money code reads `exact`."""

    __slots__ = ("exact",)

    def __new__(cls, exact: Decimal) -> DecimalFloat:
        self = super().__new__(cls, exact)
        self.exact = exact
        return self

    def __reduce__(self):
        return (type(self), (self.exact,))


def exact(value: Any) -> Decimal:
    """The exact decimal of an amount: a DecimalFloat's or Decimal's own value, a text or an int
    parsed, a plain float read as its shortest repr (0.1 is 0.1, not 0.1000000000000000055...).
    ValueError when it is no finite number. (Types tested by identity first: metering calls this
    on every request.)"""
    kind = type(value)
    if kind is DecimalFloat:
        return value.exact
    if kind is Decimal:
        amount = value
    elif kind is float:
        amount = Decimal(repr(value))
    elif isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise ValueError(f"an amount of USD must be a number, not {value!r}")
    else:
        try:
            amount = Decimal(repr(float(value))) if isinstance(value, float) else Decimal(value)
        except decimal.InvalidOperation:  # a text that is no number
            raise ValueError(f"an amount of USD must be a number, not {value!r}") from None
    if not amount.is_finite():
        raise ValueError(f"an amount of USD must be a finite number, not {value!r}")
    return amount


def usd(value: Any) -> Decimal:
    """An amount of USD as money is kept: a Decimal rounded (half even) to the nano-dollar.
    ValueError when it is no finite number, or too large to keep to the nano-dollar (1e19 USD)."""
    try:
        return exact(value).quantize(NANO, rounding=decimal.ROUND_HALF_EVEN)
    except decimal.InvalidOperation:  # more digits than the context's 28
        raise ValueError(f"an amount of USD too large to count to the nano-dollar: {value!r}") from None


def nanos(value: Any) -> int:
    """An amount of USD as a whole number of nano-dollars."""
    return int(usd(value).scaleb(9))


def from_nanos(count: int) -> Decimal:
    """Nano-dollars as USD (a Decimal of 9 places)."""
    return Decimal(count).scaleb(-9)


def _price(value: Any, handler) -> DecimalFloat:
    """A price field's validation: the exact decimal of what was written, never negative."""
    if type(value) is DecimalFloat and value.exact >= 0:
        return value
    if isinstance(value, str):
        value = value.strip()
    amount = exact(value)  # ValueError: pydantic reports it as the field's error
    if amount < 0:
        raise ValueError("a price must not be negative")
    return DecimalFloat(amount)


# A price field of a pydantic model: reads as a float (JSON Schema `number`), keeps `.exact`.
Price = Annotated[float, WrapValidator(_price), PlainSerializer(float, return_type=float)]
FREE = DecimalFloat(ZERO)


class ExactLoader(yaml.SafeLoader):
    """PyYAML's safe loader whose floats are DecimalFloats: the decimal as written is kept."""


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = loader.construct_yaml_float(node)
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        written = Decimal(text)
    except decimal.InvalidOperation:  # .inf, .nan, 1:30.5 (base 60): a float is all there is
        return value
    return DecimalFloat(written) if written.is_finite() else value


ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(text: str) -> Any:
    """YAML as yaml.safe_load reads it, with each float a DecimalFloat (see ExactLoader)."""
    return yaml.load(text, Loader=ExactLoader)  # a SafeLoader: no arbitrary objects
