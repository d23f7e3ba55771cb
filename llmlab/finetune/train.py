"""LoRA training with PEFT on the lab's own transformers model, resumable, with a fixed seed::

    from llmlab.finetune import train
    model = train.load_base()                                   # a TransformersBackend, loaded
    peft_model = train.add_lora(model.model, train.LoraSettings(rank=8))
    result = train.train(peft_model, tokens, "runs/json-qa", train.TrainConfig(epochs=2))
    result.losses                                               # one value per step: the loss curve
    train.save_adapter(peft_model, "runs/json-qa/adapter", base=model.spec, ...)

The base model is the transformers backend's: the default GGUF read into PyTorch from
the lab's cached checkpoint (fp32 on a CPU, the GPU automatically where there is one).
``add_lora`` wraps it *in place*, so the backend's ``chat`` now answers with the adapter
(and ``with peft_model.disable_adapter():`` without it).

Checkpoints go to ``<out>/checkpoints/step-NNNNN/`` at the end of every epoch and when the
run is interrupted (Ctrl-C is caught between two steps, so a step is never half applied).
Calling ``train`` again with the same ``out`` folder, data and settings continues from the
newest checkpoint: the batches of every epoch come from the seed, so a resumed run takes
exactly the steps the uninterrupted one would have taken.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.finetune.adapters import META_FILE
from llmlab.finetune.data import IGNORE, Tokens
from llmlab.hardware import quiet_bitsandbytes

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE_FILE = "training_state.pt"


class TrainingError(RuntimeError):
    """Training cannot start or continue (the message says what to do)."""


@dataclass
class LoraSettings:
    """Shape of the adapter: rank, alpha (the update is scaled by alpha / rank), which
    projections get one, and in how many of the last layers (None: all of them).

    Training only the last layers is cheaper: the backward pass stops where the first
    adapter is.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    last_layers: int | None = None


@dataclass
class TrainConfig:
    """How to train: epochs, batch size, learning rate (linear decay to zero), seed, and
    ``max_steps`` to stop early (CI-sized runs)."""

    epochs: int = 2
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    max_steps: int | None = None


@dataclass
class TrainResult:
    """What a run did: steps taken of the total, the loss of every step, whether it was
    interrupted (then ``checkpoint`` is where it stopped) and where it resumed from."""

    steps: int
    total_steps: int
    losses: list[float]
    interrupted: bool = False
    checkpoint: Path | None = None
    resumed_from: int = 0
    checkpoints: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- model


def load_base(model: str | None = None, *, threads: int | None = None, device: str | None = None):
    """The base model as a loaded transformers backend (fp32 on CPU, GPU where present)."""
    from llmlab import backends

    backend = backends.load(model, backend="transformers", threads=threads, device=device)
    backend.ensure_loaded()
    return backend


def add_lora(model, lora: LoraSettings):
    """Wrap ``model`` with fresh LoRA layers (PEFT); only those are trainable."""
    with quiet_bitsandbytes():
        from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = None
    if lora.last_layers is not None:
        layers = list(range(max(0, n_layers - lora.last_layers), n_layers))
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets),
        layers_to_transform=layers,
        lora_dropout=0.0,  # none: steps are reproducible, so a resumed run equals a straight one
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``; nothing to act on.
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        return get_peft_model(model, config)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- batches


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Batches in one pass over the data (the last one may be smaller)."""
    return math.ceil(n_examples / batch_size)


def epoch_order(n_examples: int, epoch: int, seed: int) -> list[int]:
    """The example order of one epoch: a shuffle fixed by ``seed`` and the epoch number."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def collate(batch: list[Tokens], pad_id: int, device) -> dict[str, Any]:
    """Right-padded tensors: input ids, attention mask, and labels (padding ignored)."""
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = [t.input_ids + [pad_id] * (width - len(t.input_ids)) for t in batch]
    labels = [t.labels + [IGNORE] * (width - len(t.labels)) for t in batch]
    mask = [[1] * len(t.input_ids) + [0] * (width - len(t.input_ids)) for t in batch]
    return {
        "input_ids": torch.tensor(ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "labels": torch.tensor(labels, device=device),
    }


def fingerprint(tokens: list[Tokens], config: TrainConfig, lora: dict) -> str:
    """A digest of the data and settings; a checkpoint resumes only a run with the same one."""
    digest = hashlib.sha256()
    for t in tokens:
        digest.update(json.dumps([t.input_ids, t.labels]).encode())
    settings = {**asdict(config), "max_steps": None}  # a longer or shorter run may resume
    # Where the base weights were read from (the GGUF on a first load, the converted
    # checkpoint after it) says nothing about the run; the data's token ids pin the model.
    lora = {k: v for k, v in lora.items() if k != "base_model_name_or_path"}
    digest.update(json.dumps([settings, lora], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``value`` with sets as sorted lists, so its JSON is the same in every process."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints`` (None if there is none)."""
    folder = Path(out) / "checkpoints"
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def _save_checkpoint(out: Path, model, optimizer, scheduler, state: dict) -> Path:
    import torch

    folder = Path(out) / "checkpoints" / f"step-{state['step']:05d}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        payload = {
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        torch.save(payload, tmp / STATE_FILE)  # written last: its presence marks a complete one
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _restore(folder: Path, model, optimizer, scheduler, expected: str) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(folder / STATE_FILE, weights_only=False)
    if state.get("fingerprint") != expected:
        raise TrainingError(
            f"{folder.parent.parent} holds a run with other data or settings "
            f"({folder.name}). Use another --out folder, or --fresh to start over there."
        )
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


@contextmanager
def _ctrl_c_between_steps() -> Iterator[threading.Event]:
    """An event set by the first Ctrl-C (SIGINT); a second one interrupts at once.

    Outside the main thread no handler can be installed; Ctrl-C then stops mid-step and
    the last checkpoint is what is kept.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- training


def train(
    model,
    tokens: list[Tokens],
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    pad_id: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the LoRA layers of the PEFT ``model`` on ``tokens``, continuing from the newest
    checkpoint in ``out`` if there is one.

    ``on_step(step, loss)`` is called after every step (the notebook plots with it). The
    first Ctrl-C stops after the running step and saves a checkpoint (``interrupted`` in
    the result); run ``train`` again to continue.

    Raises:
        TrainingError: ``out`` holds a checkpoint of a run with other data or settings.
    """
    import torch
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    out = Path(out)
    torch.manual_seed(config.seed)
    per_epoch = steps_per_epoch(len(tokens), config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    full = per_epoch * config.epochs  # the schedule of the whole run, even when cut short
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / full))
    lora = _plain(model.peft_config["default"].to_dict())
    mark = fingerprint(tokens, config, lora)
    state: dict[str, Any] = {"step": 0, "losses": [], "fingerprint": mark}
    resumed = latest_checkpoint(out)
    if resumed is not None:
        state = _restore(resumed, model, optimizer, scheduler, mark)
        state = {"step": state["step"], "losses": list(state["losses"]), "fingerprint": mark}
    result = TrainResult(state["step"], total, state["losses"], resumed_from=state["step"])
    device = next(iter(params)).device
    model.train()
    bar = tqdm(
        total=total, initial=state["step"], desc="training", unit="step", disable=not progress
    )
    try:
        with _ctrl_c_between_steps() as stop:
            while state["step"] < total:
                step = state["step"]
                epoch, index = divmod(step, per_epoch)
                order = epoch_order(len(tokens), epoch, config.seed)
                batch = [tokens[i] for i in order[index * config.batch_size :][: config.batch_size]]
                loss = model(**collate(batch, pad_id, device)).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["losses"].append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{state['losses'][-1]:.3f}", epoch=epoch + 1)
                if on_step is not None:
                    on_step(state["step"], state["losses"][-1])
                end_of_epoch = state["step"] % per_epoch == 0 or state["step"] == total
                if end_of_epoch or stop.is_set():
                    result.checkpoints.append(
                        _save_checkpoint(out, model, optimizer, scheduler, state)
                    )
                if stop.is_set() and state["step"] < total:
                    result.interrupted = True
                    break
    finally:
        bar.close()
        model.eval()
    result.steps, result.losses = state["step"], state["losses"]
    result.checkpoint = latest_checkpoint(out)
    return result


def save_adapter(model, folder: str | Path, *, base, **info: Any) -> Path:
    """Save the PEFT adapter and ``llmlab-adapter.json`` (base model name, ref and sha256,
    plus ``info`` such as the loss curve and the scores) into ``folder``."""
    folder = Path(folder)
    model.save_pretrained(folder)
    meta = {"base_model": base.name, "base_ref": base.ref, "base_sha256": base.sha256, **info}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return folder


def load_adapter(backend, folder: str | Path):
    """Put the PEFT adapter saved in ``folder`` on the loaded transformers ``backend``
    (in place, as :func:`add_lora` does) and return the PEFT model.

    Raises:
        AdapterMismatchError: the adapter was made for another base model.
    """
    with quiet_bitsandbytes():
        from peft import PeftModel

    from llmlab.finetune.adapters import check_adapter

    check_adapter(folder, backend.spec)
    backend.ensure_loaded()
    return PeftModel.from_pretrained(backend.model, str(folder)).eval()
