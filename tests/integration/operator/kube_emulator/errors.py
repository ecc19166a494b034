"""The API server's errors: field errors worded as k8s.io/apimachinery words them, and Status bodies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .keys import Key

# field.ErrorType -> (the words in the message, the cause's reason in the Status body)
_TYPES: dict[str, tuple[str, str]] = {
    "NotFound": ("Not found", "FieldValueNotFound"),
    "Required": ("Required value", "FieldValueRequired"),
    "Duplicate": ("Duplicate value", "FieldValueDuplicate"),
    "Invalid": ("Invalid value", "FieldValueInvalid"),
    "NotSupported": ("Unsupported value", "FieldValueNotSupported"),
    "Forbidden": ("Forbidden", "FieldValueForbidden"),
    "TooLong": ("Too long", "FieldValueTooLong"),
    "TooMany": ("Too many", "FieldValueTooMany"),
    "TypeInvalid": ("Invalid value", "FieldValueTypeInvalid"),
}
_OMIT = object()


@dataclass(frozen=True)
class Raw:
    """A value printed as given (Go prints structs as `v1.LabelSelector{...}`)."""

    text: str


def _go_value(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    # Go's %q for strings and plain printing for numbers; other values as compact JSON (close enough).
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class FieldError:
    """One field.Error: `spec.x[0].name: Not found: "cache"`."""

    type: str
    field: str
    value: Any = _OMIT
    detail: str = ""

    def body(self) -> str:
        words = _TYPES[self.type][0]
        if self.type in ("Required", "Forbidden", "TooLong") or self.value is _OMIT:
            out = words
        else:
            out = f"{words}: {_go_value(self.value)}"
        return f"{out}: {self.detail}" if self.detail else out

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def cause(self) -> dict[str, str]:
        return {"reason": _TYPES[self.type][1], "message": self.body(), "field": self.field}


def not_found(path: str, value: Any, detail: str = "") -> FieldError:
    return FieldError("NotFound", path, value, detail)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError("Required", path, _OMIT, detail)


def duplicate(path: str, value: Any) -> FieldError:
    return FieldError("Duplicate", path, value)


def invalid(path: str, value: Any, detail: str = "") -> FieldError:
    return FieldError("Invalid", path, value, detail)


def not_supported(path: str, value: Any, supported: list[str]) -> FieldError:
    return FieldError("NotSupported", path, value, "supported values: " + ", ".join(json.dumps(s) for s in supported))


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError("Forbidden", path, _OMIT, detail)


def too_long(path: str, limit: int) -> FieldError:
    return FieldError("TooLong", path, _OMIT, f"may not be more than {limit} bytes")


class ApiError(Exception):
    """A refused request: the HTTP status, the Status reason and message, and the details the server sends."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def qualified_kind(kind: str, key: Key) -> str:
    return f"{kind}.{key[0]}" if key[0] else kind


def qualified_resource(key: Key) -> str:
    return f"{key[2]}.{key[0]}" if key[0] else key[2]


def invalid_object(kind: str, key: Key, name: str, errors: list[FieldError]) -> ApiError:
    """422 Invalid, worded as apierrors.NewInvalid words it."""
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    return ApiError(422, "Invalid", f"{qualified_kind(kind, key)} {json.dumps(name)} is invalid: {listed}",
                    {"name": name, "group": key[0], "kind": kind, "causes": [e.cause() for e in errors]})


def not_found_object(key: Key, name: str) -> ApiError:
    return ApiError(404, "NotFound", f"{qualified_resource(key)} {json.dumps(name)} not found",
                    {"name": name, "group": key[0], "kind": key[2]})


def already_exists(key: Key, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f"{qualified_resource(key)} {json.dumps(name)} already exists",
                    {"name": name, "group": key[0], "kind": key[2]})


def conflict(key: Key, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict", f"Operation cannot be fulfilled on {qualified_resource(key)} "
                                     f"{json.dumps(name)}: {why}", {"name": name, "group": key[0], "kind": key[2]})


def forbidden_object(key: Key, name: str, why: str) -> ApiError:
    what = f"{qualified_resource(key)} {json.dumps(name)}" if name else qualified_resource(key)
    return ApiError(403, "Forbidden", f"{what} is forbidden: {why}", {"name": name, "group": key[0], "kind": key[2]})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


@dataclass
class Warnings:
    """Warning headers a response carries (`299 - "..."`), as the API server sends for dropped unknown fields."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)
