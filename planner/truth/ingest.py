"""Learning from runs the user already profiled (``planner calibrate --from FILE``): a
``torch.cuda.memory._snapshot()`` pickle (through a restricted unpickler), a ``torch.profiler``
Chrome trace, an HF ``trainer_state.json`` or a CSV, turned into ``Measurement`` rows.

Nothing here imports torch; a pickle may name only plain containers.
"""

from __future__ import annotations

import json
import math
import pickle
import statistics
from pathlib import Path

from pydantic import ValidationError

from planner.errors import PlannerError, read_user_text, user_file
from planner.specs.profile import Measurement
from planner.specs.setup import TrainingSetup

# -------------------------------------------------------------------------------- ingestion

SNAPSHOT_MAX_BYTES = 4 * 1024**3
_SNAPSHOT_ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _SnapshotUnpickler(pickle.Unpickler):
    """Unpickler for ``torch.cuda.memory._snapshot()`` dumps: a snapshot is dicts, lists,
    strings, numbers, booleans and None, which pickle writes without naming any class; any
    request for a global (the way a pickle runs code) is refused before anything is called."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _SNAPSHOT_ALLOWED:
            return super().find_class(module, name)
        raise PlannerError(
            f"{self._path}: refused: the pickle asks for {module}.{name}; a PyTorch memory snapshot holds only "
            "dicts, lists, strings and numbers, so this file is not one (or was tampered with)"
        )

    def persistent_load(self, pid):
        raise PlannerError(f"{self._path}: refused: persistent references are not part of a memory snapshot")


def read_memory_snapshot(path: str | Path) -> dict:
    """Safely unpickle a memory snapshot and check its documented structure (torch/cuda/memory.py,
    ``_snapshot``: ``{"segments": [...], "device_traces": [[...]]}``)."""
    path = user_file(path, "memory snapshot")
    size = path.stat().st_size
    if size > SNAPSHOT_MAX_BYTES:
        raise PlannerError(f"{path}: {size} bytes is larger than any memory snapshot this reads")
    with path.open("rb") as fh:
        try:
            data = _SnapshotUnpickler(fh, str(path)).load()
        except PlannerError:
            raise
        except Exception as exc:  # truncated or not a pickle at all
            raise PlannerError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
        raise PlannerError(f"{path}: not a memory snapshot (expected a dict with a 'segments' list, "
                           "as torch.cuda.memory._snapshot() returns)")
    return data


def snapshot_summary(data: dict) -> dict:
    """Peak allocated and reserved bytes of a snapshot: the segments' state at the snapshot, and
    the highest levels reached over the recorded trace (``_record_memory_history``), replayed
    backward from the final state (alloc / free_completed, segment_alloc / segment_free and
    segment_map / segment_unmap)."""
    segments = data["segments"]
    reserved_now = float(sum(int(s.get("total_size", 0)) for s in segments))
    allocated_now = 0.0
    for seg in segments:
        if "allocated_size" in seg:
            allocated_now += int(seg["allocated_size"])
        else:
            allocated_now += sum(int(b.get("size", 0)) for b in seg.get("blocks", []) if b.get("state") == "active_allocated")
    events = [e for trace in data.get("device_traces", []) or [] for e in trace if isinstance(e, dict)]
    uses_completed = any(e.get("action") == "free_completed" for e in events)
    free_action = "free_completed" if uses_completed else "free_requested"
    alloc_level, reserved_level = allocated_now, reserved_now
    peak_alloc, peak_reserved = allocated_now, reserved_now
    ooms = 0
    for event in reversed(events):
        action, size = event.get("action"), float(event.get("size", 0) or 0)
        # undo the event: the level before it
        if action == "alloc":
            alloc_level -= size
        elif action == free_action:
            alloc_level += size
        elif action in ("segment_alloc", "segment_map"):
            reserved_level -= size
        elif action in ("segment_free", "segment_unmap"):
            reserved_level += size
        elif action == "oom":
            ooms += 1
        peak_alloc = max(peak_alloc, alloc_level)
        peak_reserved = max(peak_reserved, reserved_level)
    devices = sorted({int(s.get("device", 0)) for s in segments})
    return {"peak_allocated_bytes": peak_alloc, "peak_reserved_bytes": peak_reserved,
            "allocated_bytes": allocated_now, "reserved_bytes": reserved_now, "trace_events": len(events),
            "ooms": ooms, "devices": devices}


def read_chrome_trace(path: str | Path) -> dict:
    """A ``torch.profiler`` Chrome trace (``prof.export_chrome_trace``): step times from the
    ``ProfilerStep#N`` spans (``schedule`` + ``prof.step()``), peak allocated and reserved from
    the ``[memory]`` events (``profile_memory=True``), the GPU name from ``deviceProperties``."""
    import re

    path = Path(path)
    try:
        data = json.loads(read_user_text(path, "Chrome trace"))
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path}: not a readable Chrome trace JSON ({exc})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise PlannerError(f"{path}: no 'traceEvents' list: not a torch.profiler Chrome trace")
    step_re = re.compile(r"ProfilerStep#(\d+)")
    steps = {}
    allocated: dict[int, float] = {}
    reserved: dict[int, float] = {}
    for e in events:
        if not isinstance(e, dict):
            continue
        name = str(e.get("name", ""))
        match = step_re.fullmatch(name)
        if match and e.get("ph") == "X" and e.get("dur") is not None:
            dur = _number(e["dur"], f"{path}: {name} 'dur'")
            steps[int(match.group(1))] = max(steps.get(int(match.group(1)), 0.0), dur * 1e-6)
        if name == "[memory]":
            args = e.get("args", {})
            if not isinstance(args, dict):
                raise PlannerError(f"{path}: a [memory] event's 'args' is not an object: not a torch.profiler trace")
            dev = int(_number(args.get("Device Type", 0), f"{path}: [memory] 'Device Type'"))
            if "Total Allocated" in args:
                total = _number(args["Total Allocated"], f"{path}: [memory] 'Total Allocated'")
                allocated[dev] = max(allocated.get(dev, 0.0), total)
            if "Total Reserved" in args:
                total = _number(args["Total Reserved"], f"{path}: [memory] 'Total Reserved'")
                reserved[dev] = max(reserved.get(dev, 0.0), total)
    durations = [steps[k] for k in sorted(steps)]
    props = data.get("deviceProperties") if isinstance(data, dict) else None
    device_name = props[0].get("name") if isinstance(props, list) and props and isinstance(props[0], dict) else None
    # CUDA is device type 1 in the profiler's memory events, CPU 0
    dev = 1 if 1 in allocated else (0 if 0 in allocated else None)
    return {
        "step_times_s": durations,
        "step_time_s": float(statistics.median(durations[1:] if len(durations) > 2 else durations)) if durations else None,
        "peak_allocated_bytes": allocated.get(dev) if dev is not None else None,
        "peak_reserved_bytes": reserved.get(dev) if dev is not None and dev == 1 else None,
        "device_name": device_name,
        "memory_device": {1: "cuda", 0: "cpu", None: None}[dev],
    }


def read_trainer_state(path: str | Path) -> dict:
    """HF Trainer's ``trainer_state.json``: seconds per optimizer step = ``train_runtime /
    global_step`` (the whole loop, first steps and data loading included), and the per-device
    batch size (``train_batch_size``)."""
    path = Path(path)
    try:
        data = json.loads(read_user_text(path, "trainer_state.json"))
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path}: not a readable trainer_state.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("log_history"), list):
        raise PlannerError(f"{path}: no 'log_history' list: not an HF Trainer trainer_state.json")
    runtime = None
    for entry in data["log_history"]:
        if isinstance(entry, dict) and "train_runtime" in entry:
            runtime = _number(entry["train_runtime"], f"{path}: train_runtime", positive=True)
    steps = data.get("global_step") or 0
    if runtime is None or steps == 0:
        raise PlannerError(f"{path}: no train_runtime and global_step: the run did not finish training")
    steps = _count(steps, f"{path}: global_step")
    batch = data.get("train_batch_size")
    return {"step_time_s": runtime / steps, "global_step": steps,
            "micro_batch": None if batch is None else _count(batch, f"{path}: train_batch_size")}


def _number(value, what: str, positive: bool = False) -> float:
    """A finite number read from a file (not a string, not a boolean); ``positive``: > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
            positive and value <= 0):
        raise PlannerError(f"{what} must be a {'positive' if positive else 'finite'} number, got {value!r}")
    return float(value)


def _count(value, what: str) -> int:
    """A positive integer read from a file."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
            value != int(value) or value <= 0):
        raise PlannerError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


CSV_MEASURE_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes", "step_time_s")
_CSV_ALIASES = {"peak_bytes": "peak_allocated_bytes", "reserved_bytes": "peak_reserved_bytes",
                "step_time": "step_time_s"}


def read_csv(path: str | Path) -> list[dict]:
    """Rows of (configuration, measurements): TrainingSetup field names (``micro_batch``,
    ``seq_len``, ``method``, ``precision``, ...), optionally ``model`` and ``num_layers``, and
    at least one of ``peak_allocated_bytes``, ``peak_reserved_bytes``, ``step_time_s``."""
    import pandas as pd

    path = user_file(path, "CSV")
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise PlannerError(f"{path} is empty; expected a header with {', '.join(CSV_MEASURE_COLUMNS[:1])} "
                           "or another measurement column") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise PlannerError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    frame = frame.rename(columns={c: _CSV_ALIASES.get(c.strip(), c.strip()) for c in frame.columns})
    if not any(c in frame.columns for c in CSV_MEASURE_COLUMNS):
        raise PlannerError(f"{path}: no measurement column; expected one of {', '.join(CSV_MEASURE_COLUMNS)}")
    rows = []
    for record in frame.to_dict(orient="records"):
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
    return rows


def detect_format(path: str | Path) -> str:
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".pickle", ".pkl")):
        return "snapshot"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".json"):
        head = path.open("rb").read(4096).decode("utf-8", "replace")
        if "log_history" in head or name == "trainer_state.json":
            return "trainer-state"
        return "chrome-trace"
    with path.open("rb") as fh:
        first = fh.read(2)
    if first[:1] == b"\x80":
        return "snapshot"
    raise PlannerError(f"{path}: cannot tell the format; pass --format snapshot|chrome-trace|trainer-state|csv")


_SETUP_FIELDS = set(TrainingSetup.model_fields)


def measurements_from_file(path: str | Path, fmt: str, model: str, setup: TrainingSetup,
                           num_layers: int | None = None) -> tuple[list[Measurement], dict]:
    """Measurements from one profiled run (or a CSV of runs) of ``model`` under ``setup``
    (a CSV row's columns override ``setup``). Returns (measurements, facts read from the file)."""
    path = Path(path)
    if fmt == "snapshot":
        try:
            facts = snapshot_summary(read_memory_snapshot(path))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            if isinstance(exc, PlannerError):
                raise
            raise PlannerError(f"{path}: its segments or trace events are not those of a memory snapshot "
                               f"({type(exc).__name__}: {exc}); write it with torch.cuda.memory._dump_snapshot()") from None
        m = Measurement(label=f"{path.name}", model=model, num_layers=num_layers, setup=setup, source="snapshot",
                        peak_allocated_bytes=facts["peak_allocated_bytes"],
                        peak_reserved_bytes=facts["peak_reserved_bytes"],
                        note=f"{facts['trace_events']} trace events, {facts['ooms']} OOM events")
        return [m], facts
    if fmt == "chrome-trace":
        facts = read_chrome_trace(path)
        if facts["step_time_s"] is None and facts["peak_allocated_bytes"] is None:
            raise PlannerError(f"{path}: no ProfilerStep#N spans and no [memory] events: profile with "
                               "schedule=... and prof.step(), and profile_memory=True")
        m = Measurement(label=path.name, model=model, num_layers=num_layers, setup=setup, source="chrome-trace",
                        step_time_s=facts["step_time_s"], steps_timed=len(facts["step_times_s"]),
                        peak_allocated_bytes=facts["peak_allocated_bytes"],
                        peak_reserved_bytes=facts["peak_reserved_bytes"])
        return [m], facts
    if fmt == "trainer-state":
        facts = read_trainer_state(path)
        if facts.get("micro_batch"):
            try:
                setup = TrainingSetup.model_validate({**setup.model_dump(), "micro_batch": facts["micro_batch"]})
            except ValidationError as exc:
                raise PlannerError(f"{path}: train_batch_size {facts['micro_batch']}: "
                                   f"{exc.errors()[0]['msg']}") from None
            facts["setup_from_file"] = ("micro_batch",)
        m = Measurement(label=path.name, model=model, num_layers=num_layers, setup=setup, source="trainer-state",
                        step_time_s=facts["step_time_s"], steps_timed=facts["global_step"],
                        note="train_runtime / global_step (includes warm-up and data loading)")
        return [m], facts
    if fmt == "csv":
        out = []
        rows = read_csv(path)
        for index, row in enumerate(rows):
            overrides = {k: row[k] for k in row if k in _SETUP_FIELDS and row[k] is not None}
            try:
                row_setup = TrainingSetup(**{**setup.model_dump(), **overrides})
            except ValidationError as exc:
                first = exc.errors()[0]
                raise PlannerError(f"{path}: row {index + 1}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
            where = f"{path}: row {index + 1}:"
            layers = row.get("num_layers")
            values = {k: None if row.get(k) is None else _number(row[k], f"{where} {k}", positive=True)
                      for k in CSV_MEASURE_COLUMNS}
            out.append(Measurement(
                label=f"{path.name}:{index + 1}", model=str(row.get("model") or model),
                num_layers=_count(layers, f"{where} num_layers") if layers is not None else num_layers,
                setup=row_setup, source="csv", **values, steps_timed=1 if values["step_time_s"] else 0))
        columns = tuple(k for k in (rows[0] if rows else {}) if k in _SETUP_FIELDS)
        return out, {"rows": len(out), "setup_from_file": columns}
    raise PlannerError(f"unknown format {fmt!r}; use snapshot, chrome-trace, trainer-state or csv")
