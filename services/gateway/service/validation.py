"""Validation of a caller's structured input against a pydantic model, as one INVALID_INPUT error
naming the field: shared by the REST bodies and the `meshserve keys` command."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from services.common.errors import invalid


def parse(model: type[BaseModel], data, *, where: str = ""):
    """Validate data against a model; bad input becomes one clear INVALID_INPUT error."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        field = f"{where}.{loc}" if where and loc else (where or loc)
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            msg = f"unknown parameter (accepted: {allowed})"
        raise invalid(f"`{field}`: {msg}" if field else msg, param=field or None) from None
