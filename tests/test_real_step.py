"""``planner.truth.real_step.FamilyModel`` on the CPU: the optimizer gets the model (GaLore picks its
projected weights by module name), so a galore-adamw calibration step runs for real."""

from __future__ import annotations

import pytest

TINY = dict(
    model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


def test_galore_family_model_steps_on_cpu():
    pytest.importorskip("transformers")
    pytest.importorskip("galore_torch")
    import torch

    from planner.specs.setup import TrainingSetup
    from planner.truth.calibration_grid import GridPoint
    from planner.truth.real_step import FamilyModel

    setup = TrainingSetup(optimizer="galore-adamw", galore_rank=8, precision="fp32", micro_batch=1, seq_len=16,
                          dropout=0.0)
    family = FamilyModel(TINY, GridPoint(setup, 1), "cpu")
    projected = [g for g in family.optimizer.param_groups if "rank" in g]
    assert projected and projected[0]["rank"] == 8 and projected[0]["params"]
    before = projected[0]["params"][0].detach().clone()
    family.step(setup, *family.inputs(setup))
    assert not torch.equal(before, projected[0]["params"][0])
    family.close()
