"""A validator for the small subset of JSON Schema that the package's LLM answers use.

Structured outputs (OpenAI's ``response_format={"type": "json_schema", ...}``) constrain what a
server generates, but not every OpenAI-compatible server supports them, and a fallback to
``json_object`` or plain text constrains nothing. Every answer is therefore checked here, without
adding ``jsonschema`` as a dependency.

Supported keywords: ``type`` (a name or a list of names among object, array, string, number,
integer, boolean, null), ``properties``, ``required``, ``additionalProperties`` (a boolean or a
schema), ``items``, ``enum``, ``minItems``, ``maxItems``, ``minimum``, ``maximum``. Annotations
(``title``, ``description``, ...) are ignored. Any other keyword raises ``ValueError``, so a
schema never silently checks less than it says.
"""

from __future__ import annotations

from typing import Any

ANNOTATION_KEYWORDS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
VALIDATION_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
    }
)


class SchemaValidationError(ValueError):
    """An instance does not match its schema; ``errors`` lists every mismatch with its JSON path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _has_type(instance: Any, name: str) -> bool:
    # bool is a subclass of int in Python, but not a number in JSON.
    if name == "object":
        return isinstance(instance, dict)
    if name == "array":
        return isinstance(instance, list)
    if name == "string":
        return isinstance(instance, str)
    if name == "boolean":
        return isinstance(instance, bool)
    if name == "null":
        return instance is None
    if name == "number":
        return isinstance(instance, (int, float)) and not isinstance(instance, bool)
    if name == "integer":
        if isinstance(instance, bool):
            return False
        return isinstance(instance, int) or (isinstance(instance, float) and instance.is_integer())
    raise ValueError(f"Unsupported JSON Schema type {name!r}.")


def schema_errors(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """All the ways ``instance`` fails ``schema`` (an empty list when it matches)."""
    unknown = set(schema) - VALIDATION_KEYWORDS - ANNOTATION_KEYWORDS
    if unknown:
        raise ValueError(f"Unsupported JSON Schema keywords at {path}: {sorted(unknown)}.")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_has_type(instance, name) for name in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(instance).__name__}"]
    errors: list[str] = []
    if "enum" in schema and not any(
        instance == option and type(instance) is type(option) or _same_number(instance, option)
        for option in schema["enum"]
    ):
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']!r}")
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in properties:
                errors.extend(schema_errors(value, properties[key], f"{path}.{key}"))
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                errors.extend(schema_errors(value, extra, f"{path}.{key}"))
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            errors.append(f"{path}: {len(instance)} items, fewer than {schema['minItems']}")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            errors.append(f"{path}: {len(instance)} items, more than {schema['maxItems']}")
        if "items" in schema:
            for index, item in enumerate(instance):
                errors.extend(schema_errors(item, schema["items"], f"{path}[{index}]"))
    if _has_type(instance, "number"):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: {instance} is less than {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{path}: {instance} is greater than {schema['maximum']}")
    return errors


def _same_number(a: Any, b: Any) -> bool:
    # JSON does not tell 1 from 1.0, so an enum of integers accepts 1.0.
    return _has_type(a, "number") and _has_type(b, "number") and a == b


def validate_json(instance: Any, schema: dict[str, Any]) -> None:
    """Raise ``SchemaValidationError`` listing every mismatch when ``instance`` does not match ``schema``."""
    errors = schema_errors(instance, schema)
    if errors:
        raise SchemaValidationError(errors)
