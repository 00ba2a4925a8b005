"""Plan files: a ``PlanRequest``, ``Plan`` or ``CompareRequest`` read from or written to JSON or
YAML (by extension), validated by the same pydantic models as the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from planner.errors import PlannerError, read_user_text, writable_file
from planner.search.plan import CompareRequest, Plan, PlanRequest

# --------------------------------------------------------------------------------------------
# Files


def read_data(path: str | Path) -> dict:
    """A JSON or YAML file (by extension) -> dict; a clear one-line error otherwise."""
    path = Path(path)
    text = read_user_text(path, "plan file")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise PlannerError(f"{path}: plan files are .json, .yaml or .yml")
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except Exception as exc:  # yaml.YAMLError
        if isinstance(exc, PlannerError):
            raise
        raise PlannerError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PlannerError(f"{path} must hold one object (a mapping), not a {type(data).__name__}")
    return data


def error_location(loc, data: dict) -> str:
    """Where a validation error is, in the user's words: ``allocations.0.zero`` names a list index, the
    user named the allocation (``allocation 'x', zero``)."""
    parts = [str(p) for p in loc]
    allocations = data.get("allocations") if isinstance(data, dict) else None
    if parts[:1] == ["allocations"] and len(parts) > 1 and parts[1].isdigit() and isinstance(allocations, list) \
            and int(parts[1]) < len(allocations) and isinstance(allocations[int(parts[1])], dict):
        name = allocations[int(parts[1])].get("name", parts[1])
        return f"allocation {name!r}" + (f", {'.'.join(parts[2:])}" if parts[2:] else "")
    return ".".join(parts)


def _validate(model, data: dict, path) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = error_location(first["loc"], data) or "(top level)"
        raise PlannerError(f"{path}: {where}: {first['msg']}") from None


def load_request(path: str | Path) -> PlanRequest:
    """A plan file: a PlanRequest, or a saved Plan (its request is taken)."""
    data = read_data(path)
    if "recommended" in data and "request" in data:
        data = data["request"]
    return _validate(PlanRequest, data, path)


def load_plan(path: str | Path) -> Plan:
    return _validate(Plan, read_data(path), path)


def load_compare(path: str | Path) -> CompareRequest:
    return _validate(CompareRequest, read_data(path), path)


def write_data(obj: BaseModel | dict, path: str | Path) -> Path:
    """Write a model or dict as JSON or YAML (by extension)."""
    path = writable_file(path, "plan file")
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    elif path.suffix.lower() == ".json":
        path.write_text(json.dumps(data, indent=2) + "\n")
    else:
        raise PlannerError(f"{path}: write .json, .yaml or .yml")
    return path
