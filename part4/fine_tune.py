"""python part4/fine_tune.py [--name json-qa] [--epochs 2] [--max-steps N] [--no-export]

Fine-tune the lab's default model (SmolLM2-135M-Instruct) with LoRA so that it answers
questions about the makerspace documents in one fixed JSON shape that cites its source
file, measure it before and after on the held-out split, and take it back to llama.cpp:

1. read and check the train and held-out splits (``part4/data``; bad lines are skipped and
   reported by line number, examples over ``--max-length`` tokens too);
2. load the model through transformers from the lab's cached checkpoint of the GGUF file
   (fp32 on a CPU, the GPU automatically where there is one) and score its greedy replies;
3. train a LoRA adapter with PEFT: progress bar, a checkpoint per epoch in ``--out``, the
   first Ctrl-C stops after the running step and saves one; the same command resumes;
4. score the tuned model, save the adapter (PEFT folder) and its loss curve;
5. write it as a GGUF LoRA adapter that llama.cpp loads on top of the base file, and as a
   merged GGUF (base metadata, tokenizer and chat template) quantized to ``--quant`` and
   registered as ``smollm2-135m-instruct:<name>``; score both with llama.cpp and say how
   often their replies are the transformers model's.

Exit codes: 0 done, 2 bad input (data, names, an adapter for another model), 130
interrupted (the checkpoint is kept; run the same command again to continue).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from llmlab import registry
from llmlab.backends import BackendError
from llmlab.finetune import data, evaluate, export_gguf, train
from llmlab.settings import get_settings

DATA = Path(__file__).resolve().parent / "data"
EPILOG = """examples:
  python part4/fine_tune.py                          # train, measure, export (a few minutes)
  python part4/fine_tune.py --max-steps 4 --eval-limit 4 --no-export   # a quick look
  python part4/fine_tune.py --name short --epochs 1 --last-layers 10
  python part4/fine_tune.py --fresh                  # forget the checkpoints, start over
then:
  python part3/simple_chat.py --model smollm2-135m-instruct:json-qa
  python part3/batch_process.py prompts.txt -o answers.jsonl --model smollm2-135m-instruct:json-qa
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python part4/fine_tune.py",
        description="LoRA fine-tuning of the lab's model, measured, exported to GGUF and registered.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--name", default="json-qa", help="tag of the result, <model>:<name> (default: %(default)s)"
    )
    add("--model", help="catalog name of the base model (default: the lab's default)")
    add("--train", type=Path, default=DATA / "train.jsonl", help="training split (JSONL)")
    add("--heldout", type=Path, default=DATA / "heldout.jsonl", help="held-out split (JSONL)")
    add(
        "--out",
        type=Path,
        help="run folder: checkpoints, adapter, report (default: $LLMLAB_HOME/finetune/<name>)",
    )
    add(
        "--epochs",
        type=int,
        default=2,
        help="passes over the training split (default: %(default)s)",
    )
    add("--max-steps", type=int, help="stop after this many steps in all (CI-sized runs)")
    add("--batch-size", type=int, default=4, help="examples per step (default: %(default)s)")
    add("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    add("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
    add(
        "--alpha",
        type=float,
        default=16.0,
        help="LoRA alpha; updates scale by alpha/rank (default: %(default)s)",
    )
    add("--last-layers", type=int, default=None, help="adapt only the last N layers (default: all)")
    add(
        "--max-length",
        type=int,
        default=256,
        help="longest example in tokens (default: %(default)s)",
    )
    add("--eval-limit", type=int, help="score only the first N held-out examples")
    add(
        "--max-tokens",
        type=int,
        default=48,
        help="reply length when scoring (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of the data order and the adapter's init")
    add("--quant", default="q8_0", help="llama.cpp type of the merged model (default: %(default)s)")
    add(
        "--strict",
        action="store_true",
        help="refuse a split with malformed lines instead of skipping them",
    )
    add("--fresh", action="store_true", help="delete the run's checkpoints and start over")
    add(
        "--no-export",
        action="store_true",
        help="stop after the adapter (no GGUF files, no registry entry)",
    )
    add("--threads", type=int, help="CPU threads (default: LLMLAB_THREADS or every core)")
    return parser


def say(message: str) -> None:
    print(message, flush=True)


def read_splits(args) -> tuple[data.Split, data.Split]:
    """Both splits, with every skipped line reported on stderr."""
    splits = []
    for path in (args.train, args.heldout):
        split = data.read_split(path, strict=args.strict)
        if split.problems:
            print(
                f"{path}: skipped {len(split.problems)} malformed line(s) "
                f"(use --strict to refuse the file):\n{data.describe_problems(split.problems)}",
                file=sys.stderr,
            )
        splits.append(split)
    return splits[0], splits[1]


def fit(split: data.Split, tokenizer, max_length: int) -> list[data.Tokens]:
    """Tokens of a split, examples over ``max_length`` left out and reported."""
    tokens, too_long = data.tokenize(split.examples, tokenizer, max_length)
    if too_long:
        print(
            f"{split.path}: skipped {len(too_long)} example(s) over {max_length} tokens "
            f"(raise --max-length to keep them):\n{data.describe_problems(too_long)}",
            file=sys.stderr,
        )
    return tokens


def score(model, examples, label: str, args) -> evaluate.Report:
    """Greedy replies of ``model`` on the held-out examples, timed and summarized."""
    start = time.perf_counter()
    report = evaluate.run(model, examples, label=label, max_tokens=args.max_tokens)
    s = report.summary()
    say(
        f"  {label}: exact {s['exact']:.0%}, valid JSON {s['valid_json']:.0%}, "
        f"answer F1 {s['answer_f1']:.0%} ({time.perf_counter() - start:.0f} s)"
    )
    return report


def export(args, adapter: Path, out: Path, examples, tuned: evaluate.Report) -> dict:
    """The GGUF adapter and the registered merged model, each scored with llama.cpp."""
    from llmlab import backends

    base = registry.resolve(args.model)
    lora = export_gguf.write_adapter(adapter, base.path, out / f"{args.name}.lora.gguf")
    say(f"GGUF LoRA adapter: {lora}")
    spec = export_gguf.export_merged(
        adapter, args.name, quant=args.quant, base=args.model, progress=say
    )
    say(f"registered {spec.ref} ({spec.path}, sha256 {spec.sha256[:12]}...)")
    results = {}
    for label, model in (
        ("llama.cpp base + adapter", backends.load(base.ref, backend="llama.cpp", lora=str(lora))),
        (f"llama.cpp {spec.ref}", backends.load(spec.ref, backend="llama.cpp")),
    ):
        try:
            report = score(model, examples, label, args)
        finally:
            model.close()
        same = evaluate.agreement(report, tuned)
        say(f"    same reply as the tuned transformers model: {same:.0%}")
        results[label] = {"summary": report.summary(), "same_as_transformers": same}
    return {
        "adapter_gguf": str(lora),
        "merged": spec.ref,
        "merged_path": str(spec.path),
        "llama_cpp": results,
    }


def run(args) -> int:
    settings = get_settings()
    out = args.out or settings.home / "finetune" / args.name
    if args.fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    train_split, heldout_split = read_splits(args)
    say(
        f"data: {len(train_split.examples)} training, {len(heldout_split.examples)} held-out examples"
    )
    base = train.load_base(args.model, threads=args.threads)
    say(f"base model: {base.spec.ref} via transformers on {base.device} ({base.loaded_from})")
    tokens = fit(train_split, base.tokenizer, args.max_length)
    kept = {t.line for t in fit(heldout_split, base.tokenizer, args.max_length)}
    examples = [e for e in heldout_split.examples if e.line in kept][: args.eval_limit]
    say("scoring the base model on the held-out split")
    before = score(base, examples, "base", args)
    lora = train.LoraSettings(rank=args.rank, alpha=args.alpha, last_layers=args.last_layers)
    model = train.add_lora(base.model, lora)
    trainable, total = train.trainable_parameters(model)
    say(f"LoRA: {trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")
    config = train.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    start = time.perf_counter()
    pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    result = train.train(model, tokens, out, config, pad_id=pad)
    seconds = time.perf_counter() - start
    if result.interrupted:
        print(
            f"Interrupted at step {result.steps} of {result.total_steps}; checkpoint saved in "
            f"{result.checkpoint}. Run the same command again to continue from there.",
            file=sys.stderr,
        )
        return 130
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    say(
        f"trained {result.steps} steps in {seconds:.0f} s{resumed}; last loss {result.losses[-1]:.3f}"
    )
    say("scoring the tuned model")
    after = score(base, examples, "tuned (transformers)", args)
    adapter = train.save_adapter(
        model,
        out / "adapter",
        base=base.spec,
        lora=vars(lora),
        config=vars(config),
        losses=result.losses,
        scores={"base": before.summary(), "tuned": after.summary()},
    )
    say(f"adapter: {adapter}")
    report = {
        "base": before.summary(),
        "tuned": after.summary(),
        "train_seconds": seconds,
        "steps": result.steps,
        "losses": result.losses,
    }
    base.close()
    if not args.no_export:
        report["export"] = export(args, adapter, out, examples, after)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    say(f"report: {out / 'report.json'}")
    if not args.no_export:
        say(f"chat with it: python part3/simple_chat.py --model {report['export']['merged']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (data.DatasetError, registry.RegistryError, export_gguf.ExportError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except (BackendError, train.TrainingError) as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "Interrupted. Finished checkpoints are kept; run the same command again to continue.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
