"""The catalogs: real models' Hugging Face ``config.json`` files and GPU specs, read from ``models_catalog/``.

Pure Python and JSON: nothing here imports torch or transformers, so ``planner estimate`` stays fast.

Layout (see ``models_catalog/``)::

    models/<name>/config.json   the model's published HF config.json, keys and values verbatim
    models/<name>/source.json   where it comes from: hf_repo, revision, copy_found_at, published_params, ...
    gpus.json                   a list of GpuSpec objects, every figure with its source

Names are matched case-insensitively; a model can also be named by its HF repo id (``Qwen/Qwen2.5-7B``),
and a GPU by any of its aliases (``H100``, ``4090``). Anything unknown raises :class:`PlannerError` with
the closest names.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from planner.errors import PlannerError, expand_user
from planner.specs.hardware import GpuSpec

if TYPE_CHECKING:  # importlib.resources.abc exists from Python 3.11
    from importlib.resources.abc import Traversable

CATALOG_PACKAGE = "models_catalog"
MODELS_DIR = "models"
GPUS_FILE = "gpus.json"
CONFIG_FILE = "config.json"
SOURCE_FILE = "source.json"


def catalog_root() -> Traversable:
    """The installed ``models_catalog`` package directory (a ``Path`` for a regular install)."""
    return files(CATALOG_PACKAGE)


def _closest(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """The ``n`` closest names, case-insensitively; falls back to the first names when nothing is close."""
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.0)
    return [lowered[c] for c in close] or candidates[:n]


def _read_json(file: Traversable | Path, what: str) -> Any:
    """Parse a JSON file; any problem becomes a one-line PlannerError naming the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlannerError(f"cannot read {what} {file}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlannerError(
            f"{what} {file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc


def _check_config(config: Any, file: Traversable | Path) -> dict:
    if not isinstance(config, dict):
        raise PlannerError(
            f"config {file} holds a JSON {type(config).__name__}, not an object: "
            "a Hugging Face config.json is one JSON object"
        )
    if "model_type" not in config:
        raise PlannerError(
            f"config {file} has no 'model_type' key: a Hugging Face config.json names its architecture "
            'there (e.g. "llama", "qwen2", "gpt2")'
        )
    return config


# ---------------------------------------------------------------------------------------------- models


def _models_dir() -> Traversable:
    return catalog_root() / MODELS_DIR


def list_models() -> list[str]:
    """Names of every catalog model (directories of ``models_catalog/models`` holding a config.json)."""
    models = _models_dir()
    if not models.is_dir():
        return []
    return sorted(d.name for d in models.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file())


@lru_cache(maxsize=1)
def _hf_repo_index() -> dict[str, str]:
    """Lower-cased HF repo id -> catalog name, from every source.json."""
    index: dict[str, str] = {}
    for name in list_models():
        source_file = _models_dir() / name / SOURCE_FILE
        if not source_file.is_file():
            continue
        source = _read_json(source_file, "source file")
        repo = source.get("hf_repo") if isinstance(source, dict) else None
        if isinstance(repo, str) and repo:
            index[repo.lower()] = name
    return index


def _resolve_name(name: str) -> str | None:
    """The catalog name for a catalog name or an HF repo id (case-insensitive), or None."""
    wanted = name.strip().lower()
    for candidate in list_models():
        if candidate.lower() == wanted:
            return candidate
    return _hf_repo_index().get(wanted)


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1


def _load_local(path: Path) -> tuple[dict, dict]:
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise PlannerError(f"{path} is a directory without a {CONFIG_FILE}")
    config = _check_config(_read_json(file, "config"), file)
    return config, {"path": str(file.resolve())}


def load_model_config(name_or_path: str) -> tuple[dict, dict]:
    """``(config, source)`` for a catalog name, an HF repo id of a catalog entry, or a local path.

    A local path may be a ``config.json`` or a directory holding one; its source is ``{"path": ...}``.
    A catalog entry's source is its ``source.json`` (hf_repo, revision, copy_found_at, published_params, ...).
    """
    text = str(name_or_path).strip()
    if not text:
        raise PlannerError(
            "empty model name: give a catalog name (see `planner catalog`) or a path to a config.json"
        )
    path = expand_user(text)
    if path.exists():
        return _load_local(path)
    name = _resolve_name(text)
    if name is None:
        if _looks_like_path(text):
            raise PlannerError(f"no such file: {text} (give a path to a config.json or a catalog name)")
        suggestions = ", ".join(_closest(text, list_models()))
        raise PlannerError(
            f"unknown model {text!r}: closest catalog names are {suggestions}; or a path to a config.json"
        )
    entry = _models_dir() / name
    config = _check_config(_read_json(entry / CONFIG_FILE, "config"), entry / CONFIG_FILE)
    source_file = entry / SOURCE_FILE
    source = _read_json(source_file, "source file") if source_file.is_file() else {}
    if not isinstance(source, dict):
        raise PlannerError(f"source file {source_file} holds a JSON {type(source).__name__}, not an object")
    return config, {"name": name, **source}


# ------------------------------------------------------------------------------------------------ GPUs


def validated_list(raw: Any, model: type, what: str, file) -> tuple:
    """A catalog file's JSON list, each entry validated as ``model``; the first bad entry is one line
    naming the file, the entry and the field."""
    if not isinstance(raw, list):
        raise PlannerError(f"{what} {file} must hold a JSON list of objects, not a {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(model.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(object)"
            label = item.get("name", f"entry {i}") if isinstance(item, dict) else f"entry {i}"
            raise PlannerError(f"{what} {file}: {label}: {where}: {first['msg']}") from exc
    return tuple(out)


@lru_cache(maxsize=1)
def _gpus() -> tuple[GpuSpec, ...]:
    file = catalog_root() / GPUS_FILE
    return validated_list(_read_json(file, "GPU catalog"), GpuSpec, "GPU catalog", file)


def list_gpus() -> list[GpuSpec]:
    """Every GPU of ``models_catalog/gpus.json``, validated as :class:`GpuSpec`."""
    return list(_gpus())


def _gpu_key(text: str) -> str:
    return text.strip().lower().replace("_", "-").replace(" ", "-")


def load_gpu(name: str) -> GpuSpec:
    """A GPU by name or alias, case-insensitively (``h100-sxm``, ``H100``, ``4090``)."""
    wanted = _gpu_key(str(name))
    gpus = _gpus()
    for gpu in gpus:
        if _gpu_key(gpu.name) == wanted:
            return gpu
    for gpu in gpus:
        if any(_gpu_key(alias) == wanted for alias in gpu.aliases):
            return gpu
    suggestions = ", ".join(_closest(str(name), [g.name for g in gpus]))
    raise PlannerError(
        f"unknown GPU {name!r}: closest catalog names are {suggestions} (`planner catalog gpus` lists them all; "
        f"a new GPU is an entry of models_catalog/{GPUS_FILE} with its datasheet's figures)"
    )


def load_spec(name_or_path: str):
    """Catalog name, HF repo id of a catalog entry, or a path to a config.json -> ModelSpec."""
    from planner.specs.model import model_spec_from_config

    config, source = load_model_config(name_or_path)
    return model_spec_from_config(config, name=source.get("name") or name_or_path)
