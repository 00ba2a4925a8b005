"""The catalogs (models_catalog/) and their loader (planner.specs.catalog).

Structure and coverage tests read JSON only. The ``oracle`` tests build every catalog model with
transformers on the meta device (no weights) and compare its parameter count with the published one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from planner.errors import PlannerError
from planner.specs.catalog import catalog_root, list_gpus, list_models, load_gpu, load_model_config
from planner.specs.hardware import GpuSpec

# Published counts are rounded ("7.61B", "70B"); transformers' exact count must lie within this band.
PARAM_TOLERANCE = 0.025

SOURCE_KEYS = {
    "hf_repo",
    "revision",
    "copy_found_at",
    "published_params",
    "published_params_source",
    "transformers_params",
    "notes",
}
GPU_SOURCED_FIGURES = {"memory_bytes", "memory_bandwidth_bytes_per_s", "peak_flops"}
PEAK_DTYPES = {"fp32", "tf32", "bf16", "fp16", "fp8", "int8"}
REQUIRED_GPUS = set(
    "a100-40gb a100-80gb h100-sxm h100-pcie h200 b200 l4 l40s a10g t4 v100-32gb rtx-3090 rtx-4090 rtx-5090 mi300x".split()
)

MODELS = list_models()


def _config(name: str) -> dict:
    return load_model_config(name)[0]


# ---- feature predicates, from config keys only ---------------------------------------------------

# Model types whose config may omit tie_word_embeddings because the transformers class ties by default.
TIED_BY_DEFAULT = {"gpt2", "gemma", "gemma2", "gemma3_text"}
# Model types whose MLP is a plain up/act/down (no gate projection).
PLAIN_MLP_TYPES = {"gpt2", "phi", "gpt_neox", "falcon", "gptj"}


def n_heads(cfg: dict) -> int:
    return cfg.get("num_attention_heads", cfg.get("n_head"))


def n_kv_heads(cfg: dict) -> int:
    if cfg.get("multi_query"):
        return 1
    kv = cfg.get("num_key_value_heads")
    return n_heads(cfg) if kv is None else kv


def is_mha(cfg):
    return n_kv_heads(cfg) == n_heads(cfg) > 1


def is_gqa(cfg):
    return 1 < n_kv_heads(cfg) < n_heads(cfg)


def is_mqa(cfg):
    return n_kv_heads(cfg) == 1


def is_plain_mlp(cfg):
    return cfg["model_type"] in PLAIN_MLP_TYPES and "num_local_experts" not in cfg


def is_gated_mlp(cfg):
    return cfg["model_type"] not in PLAIN_MLP_TYPES


def is_tied(cfg):
    return cfg.get("tie_word_embeddings", cfg["model_type"] in TIED_BY_DEFAULT)


def is_moe(cfg):
    return max(cfg.get("num_local_experts", 0), cfg.get("num_experts", 0)) > 1


def has_shared_expert(cfg):
    return is_moe(cfg) and cfg.get("shared_expert_intermediate_size", 0) > 0


def head_dim_decoupled(cfg):
    return "head_dim" in cfg and cfg["head_dim"] * n_heads(cfg) != cfg.get("hidden_size")


def is_parallel_residual(cfg):
    return bool(
        cfg.get("use_parallel_residual") or cfg.get("parallel_attn") or cfg["model_type"] in {"phi", "gptj"}
    )


FEATURES = {
    "multi-head attention": is_mha,
    "grouped-query attention": is_gqa,
    "multi-query attention": is_mqa,
    "gated MLP": is_gated_mlp,
    "plain MLP": is_plain_mlp,
    "tied embeddings": is_tied,
    "untied embeddings": lambda cfg: not is_tied(cfg),
    "mixture of experts": is_moe,
    "MoE with a shared expert": has_shared_expert,
    "head_dim decoupled from hidden/heads": head_dim_decoupled,
    "parallel attention/MLP residual": is_parallel_residual,
}


# ---- catalog structure ----------------------------------------------------------------------------


def test_catalog_root_is_the_package_directory():
    root = catalog_root()
    assert (root / "gpus.json").is_file()
    assert (root / "models").is_dir()


def test_at_least_25_models():
    assert len(MODELS) >= 25, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_model_entry_files(name):
    entry = catalog_root() / "models" / name
    config = json.loads((entry / "config.json").read_text())
    source = json.loads((entry / "source.json").read_text())
    assert name == name.lower() and " " not in name
    assert isinstance(config.get("model_type"), str) and config["model_type"]
    assert SOURCE_KEYS <= set(source), SOURCE_KEYS - set(source)
    assert "/" in source["hf_repo"]
    assert source["copy_found_at"].strip()
    assert source["published_params_source"].strip()
    assert source["published_params"] > 0 and source["transformers_params"] > 0


def test_hf_repos_are_unique():
    repos = [load_model_config(n)[1]["hf_repo"].lower() for n in MODELS]
    assert len(repos) == len(set(repos))


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_coverage(feature):
    having = [n for n in MODELS if FEATURES[feature](_config(n))]
    assert having, f"no catalog model has {feature}"


def test_feature_examples():
    """The examples the memory model is tested on have the features their configs claim."""
    expect = {
        "gpt2": [is_mha, is_plain_mlp, is_tied],
        "llama-2-7b": [is_mha, is_gated_mlp],
        "llama-2-70b": [is_gqa],
        "llama-3.1-8b": [is_gqa, lambda c: not is_tied(c)],
        "gemma-2b": [is_mqa, is_tied],
        "qwen2.5-0.5b": [is_gqa, is_tied],
        "llama-3.2-1b": [is_tied],
        "phi-2": [is_mha, is_plain_mlp, is_parallel_residual],
        "mixtral-8x7b": [is_moe, lambda c: not has_shared_expert(c)],
        "qwen3-30b-a3b": [is_moe, head_dim_decoupled],
        "qwen1.5-moe-a2.7b-chat": [has_shared_expert],
        "qwen3-0.6b": [head_dim_decoupled],
    }
    for name, predicates in expect.items():
        cfg = _config(name)
        for predicate in predicates:
            assert predicate(cfg), (name, getattr(predicate, "__name__", "lambda"))


def test_size_range():
    published = {n: load_model_config(n)[1]["published_params"] for n in MODELS}
    assert min(published.values()) <= 200e6, "no model of about 100M parameters"
    assert max(published.values()) >= 400e9, "no model of about 400B parameters"


# ---- oracle: transformers builds every entry and counts what was published ------------------------


def _build_on_meta(config: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(hf_config)


@pytest.mark.oracle
@pytest.mark.parametrize("name", MODELS)
def test_transformers_builds_and_counts_published_params(name):
    config, source = load_model_config(name)
    model = _build_on_meta(config)
    count = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    ratio = count / source["published_params"]
    assert abs(ratio - 1) <= PARAM_TOLERANCE, (
        f"{name}: transformers counts {count:,}, published {source['published_params']:,} "
        f"({source['published_params_source']}), ratio {ratio:.4f}"
    )
    assert count == source["transformers_params"], "source.json's transformers_params is stale"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == is_tied(config), f"{name}: transformers ties embeddings: {tied}"


# ---- GPUs -----------------------------------------------------------------------------------------


def test_gpu_catalog_validates_and_covers_the_list():
    gpus = list_gpus()
    assert len(gpus) >= 12
    assert all(isinstance(g, GpuSpec) for g in gpus)
    assert REQUIRED_GPUS <= {g.name for g in gpus}


def test_gpu_json_objects_match_the_schema_exactly():
    raw = json.loads((catalog_root() / "gpus.json").read_text())
    for item in raw:
        GpuSpec.model_validate(item)  # extra="forbid": no stray keys


@pytest.mark.parametrize("gpu", list_gpus(), ids=lambda g: g.name)
def test_gpu_figures_have_sources_and_sane_values(gpu):
    assert GPU_SOURCED_FIGURES <= set(gpu.sources), GPU_SOURCED_FIGURES - set(gpu.sources)
    assert all(gpu.sources[k].strip() for k in GPU_SOURCED_FIGURES)
    assert set(gpu.peak_flops) <= PEAK_DTYPES and "fp32" in gpu.peak_flops
    assert gpu.memory_bytes % 2**30 == 0 and 8 * 2**30 <= gpu.memory_bytes <= 256 * 2**30
    assert 1e11 <= gpu.memory_bandwidth_bytes_per_s <= 1e13
    for dtype in ("tf32", "bf16", "fp16", "fp8", "int8"):
        if dtype in gpu.peak_flops:
            assert gpu.peak_flops[dtype] >= gpu.peak_flops["fp32"], (gpu.name, dtype)
    if "bf16" in gpu.peak_flops:
        assert gpu.peak_flops_for("bf16-mixed") == gpu.peak_flops["bf16"]
    if gpu.price_usd_per_hour is not None:
        assert 0 < gpu.price_usd_per_hour < 100 and "price_usd_per_hour" in gpu.sources


def test_gpu_names_and_aliases_are_unambiguous():
    """Every name or alias (matched as the loader does) leads to exactly one GPU, and to that GPU."""
    owner: dict[str, str] = {}
    for gpu in list_gpus():
        for key in {gpu.name, *gpu.aliases}:
            normal = key.strip().lower().replace("_", "-").replace(" ", "-")
            assert owner.setdefault(normal, gpu.name) == gpu.name, (key, owner[normal], gpu.name)
            assert load_gpu(key).name == gpu.name


def test_gpu_without_bf16_says_so():
    with pytest.raises(PlannerError, match="no peak FLOP/s for 'bf16'"):
        load_gpu("t4").peak_flops_for("bf16")


# ---- loader ---------------------------------------------------------------------------------------


def test_load_by_name_case_insensitive_and_by_hf_repo():
    config, source = load_model_config("Qwen2.5-7B")
    assert source["name"] == "qwen2.5-7b" and config["model_type"] == "qwen2"
    assert load_model_config("Qwen/Qwen2.5-7B")[1]["name"] == "qwen2.5-7b"
    assert load_model_config("meta-llama/llama-3.1-405b")[1]["name"] == "llama-3.1-405b"


def test_load_local_file_and_directory(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for arg in (tmp_path / "config.json", tmp_path):
        config, source = load_model_config(str(arg))
        assert config == cfg
        assert source == {"path": str((tmp_path / "config.json").resolve())}


def _one_line_error(call, *args) -> str:
    with pytest.raises(PlannerError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_model_names_closest_entries():
    message = _one_line_error(load_model_config, "llama-3.1-8")
    assert "unknown model 'llama-3.1-8'" in message
    assert "llama-3.1-8b" in message
    assert "or a path to a config.json" in message


def test_malformed_json_names_file_and_position(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    message = _one_line_error(load_model_config, str(bad))
    assert str(bad) in message and "not valid JSON" in message and "line 3 column" in message


def test_missing_model_type(tmp_path):
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"hidden_size": 64}))
    message = _one_line_error(load_model_config, str(tmp_path))
    assert str(file) in message and "model_type" in message


def test_config_that_is_not_an_object(tmp_path):
    file = tmp_path / "config.json"
    file.write_text("[1, 2]")
    assert "not an object" in _one_line_error(load_model_config, str(file))


def test_directory_without_config_and_missing_file(tmp_path):
    assert "without a config.json" in _one_line_error(load_model_config, str(tmp_path))
    assert "no such file" in _one_line_error(load_model_config, str(tmp_path / "nope.json"))


def test_load_gpu_by_name_and_alias():
    assert load_gpu("h100-sxm").name == "h100-sxm"
    assert load_gpu("H100").name == "h100-sxm"
    assert load_gpu("4090").name == "rtx-4090"
    assert load_gpu("RTX 4090").name == "rtx-4090"
    assert load_gpu("A100").name == "a100-80gb"
    assert load_gpu("MI300X").vendor == "amd"


def test_unknown_gpu_names_closest_entries():
    message = _one_line_error(load_gpu, "h100-nvl")
    assert "unknown GPU 'h100-nvl'" in message and "h100-" in message


def test_catalog_imports_neither_torch_nor_transformers():
    code = (
        "import sys, planner.specs.catalog as c; c.list_gpus(); c.load_model_config('gpt2'); "
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
