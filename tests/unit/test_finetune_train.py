"""The LoRA training loop on a tiny random llama model (milliseconds per step): a checkpoint
per epoch, Ctrl-C stops between steps and keeps a checkpoint, the same call resumes and ends
exactly where an uninterrupted run ends, a checkpoint of other data is refused."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from llmlab.finetune import train
from llmlab.finetune.data import IGNORE, Tokens


def tiny_model(lora_seed: int = 0, last_layers=None):
    """The same tiny base model every time; ``lora_seed`` sets the adapter's initial weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    torch.manual_seed(lora_seed)
    return train.add_lora(base, train.LoraSettings(rank=4, last_layers=last_layers))


def tokens(n: int = 6) -> list[Tokens]:
    rows = []
    for i in range(n):
        ids = [(i * 7 + j) % 60 + 1 for j in range(5 + i % 3)]
        rows.append(Tokens(i + 1, ids, [IGNORE] * 3 + ids[3:]))
    return rows


CONFIG = train.TrainConfig(epochs=2, batch_size=2, learning_rate=1e-2, seed=3)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_a_checkpoint_per_epoch_and_a_falling_loss(tmp_path):
    result = train.train(tiny_model(), tokens(), tmp_path, CONFIG, progress=False)
    assert (result.steps, result.total_steps, result.interrupted) == (6, 6, False)
    assert [p.name for p in result.checkpoints] == ["step-00003", "step-00006"]
    assert len(result.losses) == 6 and result.losses[-1] < result.losses[0]
    assert train.latest_checkpoint(tmp_path).name == "step-00006"


def test_ctrl_c_stops_between_steps_and_the_rerun_loses_nothing(tmp_path):
    straight = tiny_model()
    expected = train.train(straight, tokens(), tmp_path / "straight", CONFIG, progress=False)

    def press_ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl-C

    stopped = train.train(
        tiny_model(), tokens(), tmp_path / "run", CONFIG, progress=False, on_step=press_ctrl_c
    )
    assert stopped.interrupted and stopped.steps == 2
    assert stopped.checkpoint.name == "step-00002"

    again = tiny_model(lora_seed=99)  # another start: its adapter comes from the checkpoint
    resumed = train.train(again, tokens(), tmp_path / "run", CONFIG, progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 6 and not resumed.interrupted
    assert resumed.losses == pytest.approx(expected.losses, rel=1e-5)
    want, got = adapter_weights(straight), adapter_weights(again)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_max_steps_stops_early_and_a_longer_run_continues_from_there(tmp_path):
    short = train.TrainConfig(**{**vars(CONFIG), "max_steps": 2})
    first = train.train(tiny_model(), tokens(), tmp_path, short, progress=False)
    assert (first.steps, first.total_steps) == (2, 2)
    rest = train.train(tiny_model(), tokens(), tmp_path, CONFIG, progress=False)
    assert rest.resumed_from == 2 and rest.steps == 6


def test_a_checkpoint_of_other_data_is_refused_with_what_to_do(tmp_path):
    train.train(tiny_model(), tokens(), tmp_path, CONFIG, progress=False)
    with pytest.raises(train.TrainingError, match="other data or settings.*--fresh"):
        train.train(tiny_model(), tokens(5), tmp_path, CONFIG, progress=False)


def test_last_layers_puts_the_adapter_only_in_the_top_layers():
    model = tiny_model(last_layers=1)
    names = {k for k, _ in model.named_parameters() if "lora_A" in k}
    assert names and all(".layers.2." in k for k in names)
    trainable, total = train.trainable_parameters(model)
    assert 0 < trainable < total


def test_the_data_order_is_fixed_by_the_seed_and_differs_between_epochs():
    assert train.epoch_order(10, 0, 1) == train.epoch_order(10, 0, 1)
    assert train.epoch_order(10, 0, 1) != train.epoch_order(10, 1, 1)
    assert sorted(train.epoch_order(10, 1, 1)) == list(range(10))


def test_adding_lora_shows_no_library_warnings(recwarn, caplog):
    # Notebook 10 shows what this cell prints: peft's deprecation warning and bitsandbytes'
    # note about a kernel it cannot fetch offline are the libraries' business, not a lesson.
    tiny_model()
    assert [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == []


def test_quiet_bitsandbytes_hides_its_warnings_only_and_restores_the_level(caplog):
    import logging

    from llmlab.hardware import quiet_bitsandbytes

    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb = logging.getLogger("bitsandbytes")
    saved = bnb.level  # other code (the frameworks bench) may have quieted it already
    bnb.setLevel(logging.NOTSET)
    try:
        with caplog.at_level(logging.INFO), quiet_bitsandbytes():
            ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
            ops.error("a real error")
        assert [r.getMessage() for r in caplog.records] == ["a real error"]
        assert bnb.level == logging.NOTSET
    finally:
        bnb.setLevel(saved)
