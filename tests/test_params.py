"""Parameter counts: ours equal transformers' own count for every catalog entry."""

import pytest

from planner.cost.params import count_params, lora_params
from planner.specs.catalog import list_models, load_model_config
from planner.specs.model import model_spec_from_config


@pytest.mark.parametrize("name", list_models())
def test_count_equals_transformers_recorded(name):
    """source.json records transformers' count (re-checked by the oracle test below)."""
    config, source = load_model_config(name)
    assert count_params(model_spec_from_config(config, name)).total == source["transformers_params"]


@pytest.mark.oracle
@pytest.mark.parametrize("name", list_models())
def test_count_equals_transformers_on_meta(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config, _ = load_model_config(name)
    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    expected = sum(p.numel() for p in model.parameters())
    counts = count_params(model_spec_from_config(config, name))
    assert counts.total == expected
    # groups add up and the non-embedding count excludes embedding and head
    assert counts.non_embedding == counts.total - counts.embedding - counts.lm_head


@pytest.mark.oracle
@pytest.mark.parametrize(
    "name,targets",
    [("llama-3.2-1b", ("all-linear",)), ("qwen2.5-0.5b", ("q_proj", "v_proj")), ("phi-2", ("all-linear",)),
     ("gpt2", ("all-linear",)), ("phi-3-mini-4k-instruct", ("qkv_proj",))],
)
def test_lora_params_equal_peft(name, targets):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.specs.configs import reduce_layers
    from planner.truth.training_model import peft_ignoring_old_torchao

    config = reduce_layers(load_model_config(name)[0], 2)
    with torch.device("meta"), peft_ignoring_old_torchao():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        target = "all-linear" if targets == ("all-linear",) else list(targets)
        model = get_peft_model(model, LoraConfig(r=8, target_modules=target))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(model_spec_from_config(config, name), targets, 8) == trainable
