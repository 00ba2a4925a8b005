"""Bad input files, fuzzed (hypothesis): config.json files given by path, CSV runs for `scaling
fit`, CSV and trainer_state.json logs for `stop`, plan and compare files, calibration profiles,
and the files of `calibrate --from`. Each is read by the verb in-process; the contract is the one
of ``tests/test_fuzz_cli.py``: an answer, or one line on stderr and exit code 2, never a
traceback, and never a silent answer to nonsense (negative losses, zero heads, a directory given
for a file, one measurement fitting five corrections).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from cli_run import assert_answer_or_error, assert_one_line_error, run
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

SMALL = "smollm2-135m-instruct"
CATALOG_PROFILE = Path(__file__).resolve().parents[1] / "models_catalog/calibrations/cpu-smollm2-135m-instruct.json"


# JSON values of every kind, the wrong ones included
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
JSON_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                        max_leaves=8)


def _positive_int(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            and value == int(value) and 1 <= value <= 2**24)


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# ------------------------------------------------------------------------------------ config.json

def _catalog_config(name: str) -> dict:
    from planner.specs.catalog import load_model_config

    return load_model_config(name)[0]


BASES = ("smollm2-135m-instruct", "gpt2", "qwen1.5-moe-a2.7b-chat", "phi-2", "gemma-2-2b")
REQUIRED = {
    "smollm2-135m-instruct": ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"),
    "gpt2": ("n_embd", "n_head", "n_layer", "vocab_size"),
    "qwen1.5-moe-a2.7b-chat": ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_experts_per_tok"),
    "phi-2": ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"),
    "gemma-2-2b": ("hidden_size", "num_attention_heads", "num_hidden_layers", "head_dim"),
}


@FUZZ
@given(data=st.data(), base=st.sampled_from(BASES), value=JUNK)
def test_config_with_any_value_of_any_key(tmp_path, data, base, value):
    config = _catalog_config(base)
    key = data.draw(st.sampled_from(sorted(config) + ["head_dim", "text_config", "num_key_value_heads"]))
    path = _write(tmp_path, "config.json", {**config, key: value})
    assert_answer_or_error(run("estimate", "--model", path, "--json"))


@FUZZ
@given(data=st.data(), base=st.sampled_from(BASES), value=JUNK.filter(lambda v: v is not None and not _positive_int(v)))
@example(data=None, base="smollm2-135m-instruct", value=0)  # num_attention_heads: 0 was a ZeroDivisionError
@example(data=None, base="smollm2-135m-instruct", value="twenty")  # num_hidden_layers: "twenty" was a TypeError
@example(data=None, base="smollm2-135m-instruct", value=-576)  # a negative hidden_size was accepted
def test_config_dimension_that_is_not_a_positive_integer(tmp_path, data, base, value):
    """Widths, head and layer counts must be positive integers: anything else is an error naming the key."""
    keys = REQUIRED[base]
    if data is None:  # the explicit examples: heads 0, layers "twenty", hidden -576
        key = {0: "num_attention_heads", "twenty": "num_hidden_layers", -576: "hidden_size"}[value]
    else:
        key = data.draw(st.sampled_from(keys))
    path = _write(tmp_path, "config.json", {**_catalog_config(base), key: value})
    assert_one_line_error(run("estimate", "--model", path, "--json"), key)


@pytest.mark.parametrize("change, needle", [
    ({"hidden_size": 577}, "not divisible"),  # was accepted
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"head_dim": 0}, "head_dim"),  # was read as "no head_dim"
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # "false" was true
    ({"attention_bias": "yes"}, "attention_bias"),
    ({"model_type": ["llama"]}, "model_type"),  # was a TypeError (unhashable list)
    ({"model_type": 7}, "model_type"),
    ({"text_config": "llama", "model_type": "llava"}, "text_config"),  # was a TypeError
    ({"max_position_embeddings": "8k"}, "max_position_embeddings"),
    ({"attention_dropout": 2.0}, "attention_dropout"),
])
def test_config_values_that_describe_no_transformer(tmp_path, change, needle):
    path = _write(tmp_path, "config.json", {**_catalog_config(SMALL), **change})
    assert_one_line_error(run("estimate", "--model", path), needle)


def test_moe_config_values(tmp_path):
    config = _catalog_config("qwen1.5-moe-a2.7b-chat")
    for change, needle in (({"mlp_only_layers": 3}, "mlp_only_layers"), ({"final_logit_softcapping": "x"}, "softcapping")):
        path = _write(tmp_path, "config.json", {**config, **change})
        assert_one_line_error(run("estimate", "--model", path), needle)


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON_ANY.map(json.dumps)))
@example(content=b"")
@example(content=bytes(range(256)))
@example(content="null")
def test_config_file_that_is_not_a_config(tmp_path, content):
    path = _write(tmp_path, "config.json", content)
    assert_one_line_error(run("estimate", "--model", path))
    assert_one_line_error(run("fit", path, "--gpu", "h100"))


# ------------------------------------------------------------------------------------ directories and garbage

def _every_file_argument(path: str) -> list[tuple[str, ...]]:
    """Each verb with ``path`` where it expects a file."""
    return [
        ("estimate", "--model", SMALL, "--calibration", path),
        ("fit", SMALL, "--gpu", "h100", "--calibration", path),
        ("scaling", "fit", path, "--bootstrap", "0"),
        ("scaling", "optimal", "--compute", "1e21", "--law", path),
        ("stop", "--log", path, "--cost-per-step", "1", "--threshold", "1e-6", "--bootstrap", "0"),
        ("plan", "--request", path),
        ("plan", "--from-plan", path),
        ("compare", path),
        ("calibrate", "--from", path, "--model", SMALL, "--gpu", "h100", "--out", path + ".out.json"),
    ]


def test_a_directory_where_a_file_is_expected(tmp_path):
    """Was "no such file" (or a traceback): now it says a directory was given."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for argv in _every_file_argument(str(folder)):
        line = assert_one_line_error(run(*argv), "is a directory")
        assert "no such file" not in line
    assert_one_line_error(run("estimate", "--model", str(folder)), "is a directory")  # a folder without config.json


@FEW
@given(content=st.tuples(st.binary(max_size=300), st.binary(max_size=30)).map(lambda p: p[0] + b"\xff\x80" + p[1]))
@example(content=bytes(range(256)) * 4)
def test_binary_garbage_in_every_file_argument(tmp_path, content):
    """Binary files were UnicodeDecodeError tracebacks in `stop`, `plan --request` and `scaling optimal --law`."""
    for suffix in (".json", ".csv"):
        path = _write(tmp_path, f"garbage{suffix}", content)
        for argv in _every_file_argument(path):
            assert_one_line_error(run(*argv))


def test_writing_into_a_directory(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    state = _write(tmp_path, "trainer_state.json", {"global_step": 10, "log_history": [{"train_runtime": 20.0}]})
    assert_one_line_error(run("calibrate", "--from", state, "--model", SMALL, "--gpu", "h100", "--out", folder),
                          "is a directory")
    assert_one_line_error(run("plan", "--model", SMALL, "--budget-usd", "100", "--save", folder), "is a directory")


# ------------------------------------------------------------------------------------ scaling fit runs

CELL = st.one_of(
    st.floats(min_value=1e6, max_value=1e13).map(repr),
    st.sampled_from(["-1e9", "0", "nan", "", "inf", "-inf", "1e400", "7B", "abc", " ", "-2.5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
RUN_COLUMNS = ("params", "tokens", "loss", "flops", "junk")


def _csv(columns, rows) -> str:
    return ",".join(columns) + "\n" + "".join(",".join(row) + "\n" for row in rows)


@FUZZ
@given(data=st.data(), columns=st.lists(st.sampled_from(RUN_COLUMNS), min_size=1, max_size=5, unique=True))
def test_scaling_fit_few_or_odd_runs(tmp_path, data, columns):
    """Up to seven runs with any columns and cells: never enough for a fit, always a one-line error."""
    rows = data.draw(st.lists(st.lists(CELL, min_size=len(columns), max_size=len(columns)), max_size=7))
    path = _write(tmp_path, "runs.csv", _csv(columns, rows))
    assert_one_line_error(run("scaling", "fit", path, "--bootstrap", "0"))


@FUZZ
@given(bad=st.sampled_from(["-1", "0", "nan", "", "inf", "abc", "-3.5e9"]), row=st.integers(min_value=0, max_value=15),
       column=st.sampled_from(["params", "tokens", "loss"]))
@example(bad="-2.5", row=3, column="loss")  # a negative loss
def test_scaling_fit_one_bad_cell(tmp_path, bad, row, column):
    """Sixteen good runs and one bad cell: an error naming the column (never a fit that drops it)."""
    rows = [[repr(n), repr(d), repr(1.8 + 482 / n ** 0.35 + 2085 / d ** 0.37)]
            for n in (3e7, 1e8, 1e9, 1e10) for d in (1e9, 1e10, 1e11, 1e12)]
    rows[row][("params", "tokens", "loss").index(column)] = bad
    path = _write(tmp_path, "runs.csv", _csv(("params", "tokens", "loss"), rows))
    assert_one_line_error(run("scaling", "fit", path, "--bootstrap", "0"), column)


# ------------------------------------------------------------------------------------ stop logs

def _decay(t: int) -> float:
    return 2.2 + 4.0 * t ** -0.4


@FEW
@given(negative_at=st.integers(min_value=0, max_value=39), value=st.floats(min_value=-1e6, max_value=-1e-9),
       as_json=st.booleans())
@example(negative_at=0, value=-2.0, as_json=False)
def test_stop_log_with_a_negative_loss(tmp_path, negative_at, value, as_json):
    """Negative losses were fitted and answered ("stop now ... loss -2.19"): a loss is never negative."""
    steps = list(range(25, 1001, 25))
    losses = [_decay(t) for t in steps]
    losses[negative_at] = value
    path = _log(tmp_path, steps, losses, as_json)
    assert_one_line_error(run("stop", "--log", path, "--cost-per-step", "1", "--threshold", "1e-6", "--bootstrap", "0"),
                          f"row {negative_at + 1}")


def _log(tmp_path, steps, losses, as_json: bool) -> str:
    if as_json:
        return _write(tmp_path, "trainer_state.json",
                      {"log_history": [{"step": s, "loss": v} for s, v in zip(steps, losses, strict=True)]})
    return _write(tmp_path, "log.csv", _csv(("step", "loss"), [(repr(s), repr(v)) for s, v in zip(steps, losses, strict=True)]))


@FUZZ
@given(steps=st.lists(st.one_of(st.integers(min_value=-5, max_value=10**6), st.floats(allow_nan=True)), max_size=20),
       loss=st.one_of(st.floats(min_value=0, max_value=20), st.floats(allow_nan=True, allow_infinity=True)),
       as_json=st.booleans())
@example(steps=[10] * 12, loss=2.0, as_json=False)  # repeated steps
@example(steps=list(range(12, 0, -1)), loss=2.0, as_json=True)  # steps going back
@example(steps=list(range(1, 13)), loss=1e300, as_json=False)  # was a scipy traceback (infs or NaNs)
def test_stop_log_any_steps(tmp_path, steps, loss, as_json):
    losses = [loss * (1 + 1 / (i + 1)) for i in range(len(steps))]
    path = _log(tmp_path, steps, losses, as_json)
    result = run("stop", "--log", path, "--cost-per-step", "1", "--threshold", "1e-6", "--bootstrap", "0")
    after_zero = [s for s in steps if s > 0]  # rows at step 0 are left out (and counted)
    if (not all(math.isfinite(s) and s >= 0 for s in steps) or len(after_zero) < 8
            or any(b <= a for a, b in zip(after_zero, after_zero[1:], strict=False))
            or not math.isfinite(loss) or 2 * loss > 1e9):
        assert_one_line_error(result)
    else:
        assert_answer_or_error(result)


@FUZZ
@given(entry=st.dictionaries(st.sampled_from(["step", "loss", "epoch"]), JUNK, min_size=1),
       state=st.one_of(st.none(), JSON_ANY))
@example(entry={"step": "ten", "loss": 2.0}, state=None)  # was a ValueError traceback
@example(entry={"step": 5, "loss": [1]}, state=None)
def test_stop_trainer_state_with_junk_entries(tmp_path, entry, state):
    history = [{"step": t, "loss": _decay(t)} for t in range(25, 501, 25)]
    data = {"log_history": history + [entry]} if state is None else state
    path = _write(tmp_path, "trainer_state.json", data)
    assert_answer_or_error(run("stop", "--log", path, "--cost-per-step", "1", "--threshold", "1e-6", "--bootstrap", "0"))


# ------------------------------------------------------------------------------------ plan and compare files

REQUEST_FIELDS = ("models", "gpu", "num_gpus", "compute_flops", "budget_usd", "gpu_hours", "deadline_s", "seq_len",
                  "methods", "lora_ranks", "zero", "tensor_parallel", "micro_batches", "keep_fractions", "objective",
                  "law", "calibration", "bogus")


@FUZZ
@given(request=st.dictionaries(st.sampled_from(REQUEST_FIELDS), JUNK.filter(lambda v: v is not None), min_size=1, max_size=3),
       as_yaml=st.booleans())
@example(request={"compute_flops": -1e21}, as_yaml=False)
@example(request={"models": ["nosuchmodel"], "budget_usd": 100}, as_yaml=False)
@example(request={"bogus": 1}, as_yaml=True)
def test_plan_request_files(tmp_path, request, as_yaml):
    """Numbers made negative: every such request is an error; strings and lists may happen to plan.
    (``models`` neither a string nor a list: test_plan_request_models_not_a_list.)"""
    request = {k: (v if not isinstance(v, int | float) or isinstance(v, bool) else -abs(v) - 1) for k, v in request.items()}
    if not isinstance(request.get("models", ""), str | list):
        request["models"] = str(request["models"])
    text = yaml.safe_dump(request) if as_yaml else json.dumps(request)
    path = _write(tmp_path, "request.yaml" if as_yaml else "request.json", text)
    result = run("plan", "--request", path)
    if any(isinstance(v, int | float) and not isinstance(v, bool) for v in request.values()) or "bogus" in request:
        assert_one_line_error(result)
    else:
        assert_answer_or_error(result)


@pytest.mark.parametrize("models", [False, 7, {"a": 1}])
def test_plan_request_models_not_a_list(tmp_path, models):
    path = _write(tmp_path, "request.json", {"models": models, "budget_usd": 100})
    assert_one_line_error(run("plan", "--request", path), "models")


@FEW
@given(content=st.one_of(st.text(max_size=100), JSON_ANY.map(json.dumps)), suffix=st.sampled_from([".json", ".yaml", ".txt"]))
@example(content="compute_flops: [1, 2\n", suffix=".yaml")
@example(content="- 1\n- 2\n", suffix=".yaml")
def test_plan_and_compare_files_that_are_not_requests(tmp_path, content, suffix):
    path = _write(tmp_path, "file" + suffix, content)
    assert_one_line_error(run("plan", "--request", path))
    assert_one_line_error(run("compare", path))


@FEW
@given(allocation=st.dictionaries(st.sampled_from(["name", "model", "method", "lora_rank", "zero", "tokens", "bogus"]),
                                  JUNK, max_size=3))
def test_compare_files_with_junk_allocations(tmp_path, allocation):
    data = {"base": {"gpu": "h100-sxm", "num_gpus": 8, "budget_usd": 5000}, "allocations": [allocation]}
    path = _write(tmp_path, "compare.json", data)
    result = run("compare", path)
    if "bogus" in allocation or "name" not in allocation:
        assert_one_line_error(result)
    else:
        assert_answer_or_error(result)


# ------------------------------------------------------------------------------------ calibration profiles

CORRECTIONS = ("efficiency_scale", "memory_time_factor", "optimizer_time_factor", "reserve_fraction", "context_bytes",
               "host_overhead_s_per_op", "communication_factor")


@FUZZ
@given(key=st.sampled_from(CORRECTIONS),
       value=st.one_of(st.floats(max_value=-1e-12), st.sampled_from([0.0, math.nan, math.inf, "fast", [1], True])))
@example(key="efficiency_scale", value=-1.0)  # was applied
@example(key="reserve_fraction", value=math.nan)
def test_calibration_profile_with_a_nonsense_correction(tmp_path, key, value):
    if value == 0.0 and key in ("reserve_fraction", "context_bytes", "host_overhead_s_per_op"):
        value = -1.0  # zero is a real reserve, context or overhead (a CPU has none)
    profile = json.loads(CATALOG_PROFILE.read_text())
    profile["corrections"][key] = value
    path = _write(tmp_path, "profile.json", json.dumps(profile))
    assert_one_line_error(run("estimate", "--model", SMALL, "--calibration", path), key)


@FEW
@given(content=st.one_of(st.binary(max_size=100), JSON_ANY.map(json.dumps)))
@example(content=json.dumps({"schema_version": 99}))
def test_calibration_file_that_is_not_a_profile(tmp_path, content):
    path = _write(tmp_path, "profile.json", content)
    assert_one_line_error(run("estimate", "--model", SMALL, "--calibration", path))


# ------------------------------------------------------------------------------------ calibrate --from

def _calibrate(path, *extra):
    return run("calibrate", "--from", path, "--model", SMALL, "--gpu", "h100", "--out", str(path) + ".profile.json", *extra)


@FUZZ
@given(state=st.fixed_dictionaries({}, optional={"global_step": JUNK, "train_batch_size": JUNK, "log_history": st.one_of(
    JUNK, st.lists(st.fixed_dictionaries({}, optional={"train_runtime": JUNK, "step": JUNK}), max_size=3))}))
@example(state={"global_step": "x", "log_history": [{"train_runtime": "fast"}]})  # was a ValueError
@example(state={"global_step": 100, "train_batch_size": -4, "log_history": [{"train_runtime": 250.0}]})  # scipy traceback
@example(state={"global_step": 100, "log_history": [{"train_runtime": -250.0}]})
@example(state={"global_step": 100, "log_history": 5})  # was a TypeError
def test_calibrate_from_a_junk_trainer_state(tmp_path, state):
    path = _write(tmp_path, "trainer_state.json", state)
    result = _calibrate(path)
    runtime = [e.get("train_runtime") for e in state.get("log_history") or [] if isinstance(e, dict) and "train_runtime" in e] \
        if isinstance(state.get("log_history"), list) else []
    if not runtime or not _positive_int(state.get("global_step")):
        assert_one_line_error(result)
    else:
        assert_answer_or_error(result)


@FEW
@given(column=st.sampled_from(["micro_batch", "seq_len", "num_layers", "peak_allocated_bytes", "step_time_s"]),
       value=st.sampled_from(["-1", "0", "two", "-1e9", "1e400"]))
@example(column="num_layers", value="two")  # was a ValueError
@example(column="peak_allocated_bytes", value="-1e9")  # was accepted
def test_calibrate_from_a_csv_with_a_bad_cell(tmp_path, column, value):
    cells = {"micro_batch": "1", "seq_len": "512", "num_layers": "2", "peak_allocated_bytes": "1e9", "step_time_s": "0.5"}
    cells[column] = value
    path = _write(tmp_path, "runs.csv", _csv(tuple(cells), [tuple(cells.values())]))
    assert_one_line_error(_calibrate(path), column)


@pytest.mark.parametrize("trace", [
    {"traceEvents": [{"name": "ProfilerStep#1", "ph": "X", "dur": "slow"}]},  # was a ValueError
    {"traceEvents": [{"name": "[memory]", "args": {"Device Type": "gpu", "Total Allocated": 5}}]},
    {"traceEvents": [{"name": "[memory]", "args": 7}]},
    {"traceEvents": 5},
])
def test_calibrate_from_a_junk_chrome_trace(tmp_path, trace):
    assert_one_line_error(_calibrate(_write(tmp_path, "trace.json", trace)))


def test_calibrate_from_one_trainer_state_says_what_it_assumed_and_fits_one_correction(tmp_path):
    """One measured step time fits one time correction (it fitted five), and what the file does
    not say (sequence length, method, precision) is said to be assumed, in the note and the profile."""
    state = {"global_step": 100, "train_batch_size": 4, "log_history": [{"train_runtime": 250.0}]}
    path = _write(tmp_path, "trainer_state.json", state)
    code, out, err = _calibrate(path, "--json")
    assert code == 0, err
    profile = json.loads(out)
    time_fields = {"efficiency_scale", "efficiency_size_exponent", "memory_time_factor", "optimizer_time_factor",
                   "host_overhead_s_per_op"}
    assert len(time_fields & set(profile["corrections"]["fitted"])) == 1
    assert "assumed" in err and "sequence length 2048" in err and "method full" in err and "precision bf16" in err
    assert "micro-batch" not in err  # the file gives train_batch_size
    assert any("sequence length 2048" in note for note in profile["notes"])
    # what the flags say is not assumed
    code, out, err = _calibrate(path, "--seq-len", "1024", "--method", "lora", "--precision", "bf16")
    assert code == 0 and "sequence length" not in err and "method" not in err and "fewer timed points" in out


def test_calibrate_from_two_csv_rows_fits_at_most_two_of_each(tmp_path):
    path = _write(tmp_path, "runs.csv", _csv(("micro_batch", "seq_len", "peak_allocated_bytes", "step_time_s"),
                                             [("1", "512", "1e9", "0.5"), ("2", "512", "1.5e9", "0.9")]))
    code, out, err = _calibrate(path, "--json")
    assert code == 0, err
    fitted = json.loads(out)["corrections"]["fitted"]
    assert len([f for f in fitted if not f.startswith("memory")]) <= 2
    assert "sequence length" not in err and "method full" in err  # seq_len is a column of the file


def test_calibrate_from_checks_the_set_up_against_the_model(tmp_path):
    """The assumed sequence is no longer than the model's context; a given one past it, or a LoRA
    rank past the adapted matrices, is the same one-line error as in `planner estimate`."""
    state = {"global_step": 10, "log_history": [{"train_runtime": 20.0}]}
    path = _write(tmp_path, "trainer_state.json", state)
    out = str(tmp_path / "p.json")
    code, _, err = run("calibrate", "--from", path, "--model", "gpt2", "--gpu", "h100", "--out", out)
    assert code == 0 and "sequence length 1024" in err
    assert_one_line_error(run("calibrate", "--from", path, "--model", "gpt2", "--gpu", "h100", "--out", out,
                              "--seq-len", "4096"), "1024")
    assert_one_line_error(run("calibrate", "--from", path, "--model", "gpt2", "--gpu", "h100", "--out", out,
                              "--method", "lora", "--lora-rank", "5000"), "rank")
