"""The ``molora`` command line: ``sft``, ``generate``, ``eval``, ``inspect`` and ``push``.

Examples::

    molora sft --config configs/default.yaml
    molora sft --config configs/default.yaml --set adapter.num_experts=4 --set training.max_steps=20
    molora generate --adapter runs/default "What is the capital of France?"
    molora eval --adapter runs/default --data bundled
    molora inspect runs/default
    molora push runs/default --repo-id me/smollm2-molora

Heavy libraries are imported inside the commands, so ``molora --help`` answers quickly. Errors in what the user
gave (missing files, unknown recipe keys, incompatible options) print one line ``molora <command>: error: ...``
and exit with status 2 (``MOLORA_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def _sft(args: argparse.Namespace) -> int:
    from .training.recipe import RecipeError, load_recipe
    from .training.sft import run_sft

    if args.config is None and not args.overrides:
        # every default would train the default model for 3 epochs (hours on a CPU): make it a deliberate choice
        raise RecipeError(
            "molora sft needs --config RECIPE (e.g. configs/default.yaml; the recipes are in configs/, the schema in "
            "docs/cli.md), or --set options to run on every other default."
        )
    if args.config is not None and not args.overrides and Path(args.config).is_file():
        from .training.recipe import read_recipe_file

        if not read_recipe_file(Path(args.config)):
            # an empty file (or only comments) is no deliberate choice of every default either
            raise RecipeError(
                f"--config {args.config!r} holds no recipe (the file is empty or only comments): write the sections "
                "to change (see configs/default.yaml and docs/cli.md), or add --set options to run on every other "
                "default."
            )
    recipe = load_recipe(args.config, args.overrides)
    stem = Path(args.config).stem if args.config else "molora-sft"
    # the folder docs/cli.md promises (shown by --print-recipe, recorded in molora_recipe.yaml)
    if recipe["training"].get("output_dir") is None:  # (left out, or null: the default, as in the other sections)
        recipe["training"]["output_dir"] = str(Path("runs") / stem)
    if args.print_recipe:
        print(_full_recipe(recipe), end="")
        return 0
    results = run_sft(recipe)
    _leave_process_group()
    return 0 if results.get("global_step", 0) > 0 else 1


def _leave_process_group() -> None:
    """End a distributed run (``accelerate launch`` / ``torchrun``) by leaving its process group once every process is
    done, as accelerate's ``end_training`` does: a group left to be torn down at interpreter exit may hang or abort
    the process (PyTorch warns about it for NCCL), after the adapter is saved but with a failing exit code."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _full_recipe(recipe: dict) -> str:
    """The recipe as YAML with the adapter's every ``MoLoraConfig`` value and the training section's molora defaults
    filled in, after checking them as ``molora sft`` would (``SFTConfig`` included)."""

    import yaml

    from .training.recipe import adapter_keys, build_adapter_config
    from .training.sft import sft_config, sft_kwargs

    config = build_adapter_config(recipe["adapter"])
    adapter = {}
    for key in adapter_keys():
        value = getattr(config, key)
        adapter[key] = sorted(value) if isinstance(value, set) else value
    adapter["task_type"] = str(getattr(config.task_type, "value", config.task_type))
    sft_config(recipe["training"], recipe["training"]["output_dir"])  # the values SFTConfig itself rejects
    training = sft_kwargs(recipe["training"], recipe["training"]["output_dir"])
    full = {**recipe, "adapter": adapter, "training": training}
    return yaml.safe_dump(json.loads(json.dumps(full, default=str)), sort_keys=False)


def _generate(args: argparse.Namespace) -> int:
    from .training.evaluate import generate
    from .training.models import load_adapter_model

    model, tokenizer, _ = load_adapter_model(args.adapter, model=args.model)
    prompts = [p if args.raw else [{"role": "user", "content": p}] for p in args.prompts]
    if not args.raw and tokenizer.chat_template is None:
        raise ValueError("The tokenizer has no chat template; pass --raw to feed the prompt text as is.")
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    for prompt, text in zip(args.prompts, generate(model, tokenizer, prompts, args.max_new_tokens, **kwargs)):
        if len(args.prompts) > 1:
            print(f">>> {prompt}")
        print(text.strip())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training.data import load_rows, prepare
    from .training.evaluate import evaluate, format_table
    from .training.models import load_adapter_model, load_base_model, load_tokenizer, resolve_model
    from .training.recipe import DATA_KEYS

    _check_output_parent(args.json, "--json")
    data_cfg = {**DATA_KEYS, "format": args.format}
    hint = "molora eval reads the columns messages (chat), prompt + completion, or text: rename the file's columns"
    # the bundled data's held-out split, or the named one; a single file (or saved Dataset) is read whole
    rows = load_rows(args.data, args.split or "eval", split_setting="--split", strict=args.split is not None)
    dataset, _ = prepare(rows, data_cfg, args.max_examples, keep_task=True, field_hint=hint, format_setting="--format")
    if args.adapter:
        model, tokenizer, _ = load_adapter_model(args.adapter, model=args.model)
        title = f"{args.adapter} on {args.data}"
    else:
        cfg = resolve_model({"name_or_path": None if args.model in (None, "default") else args.model})
        tokenizer, model = load_tokenizer(cfg), load_base_model(cfg).eval()
        title = f"base model {cfg['display_name']} on {args.data}"
    result = evaluate(
        model,
        tokenizer,
        dataset,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_per_task=args.max_per_task,
        exact_match=not args.no_exact_match,
        return_predictions=args.json is not None,
    )
    print(format_table(result, title))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .hub import HEATMAP_FILE, config_summary, heatmap_title, read_adapter_folder
    from .training.report import save_heatmap

    _check_output_parent(args.output, "--output", folder_ok=True)  # (a folder receives expert_load.png)
    if args.output and args.output.endswith(("/", os.sep)) and not Path(args.output).is_dir():
        raise FileNotFoundError(f"--output {args.output!r}: the folder does not exist.")
    info = read_adapter_folder(args.adapter_dir)
    width = max(len(k) for k, _ in config_summary(info))
    for key, value in config_summary(info):
        print(f"{key:<{width}}  {value}")
    if info["config"].get("dynamic_rank") is not None:  # ({} is DR-LoRA with the defaults)
        from .adapters.dynamic_rank import format_rank_table, rank_stats_from_adapter

        print("\nDR-LoRA ranks per expert (and the steps at which each bank grew):")
        print(format_rank_table(rank_stats_from_adapter(args.adapter_dir)))
    if info["stats"] is None:
        print("no routing_stats.json in this folder: no heat map (molora sft writes it during training)")
        return 0
    if not info["stats"]:
        print("routing_stats.json in this folder holds no layer (no routed token was counted): no heat map")
        return 0
    out = Path(args.output) if args.output else Path(args.adapter_dir) / HEATMAP_FILE
    # (the map in the adapter folder is uploaded by `molora push`: no path of this machine in its title)
    written = save_heatmap(info["stats"], out, title=heatmap_title(info))
    print(f"expert-load heat map written to {written}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import CARD_FILE, is_generated_card, prepare_upload, push

    if not is_generated_card(Path(args.adapter_dir) / CARD_FILE):
        print(f"keeping the folder's own {CARD_FILE} as the model card (molora writes one where there is none)")
    if args.dry_run:
        files = prepare_upload(args.adapter_dir, args.repo_id)
        print(f"dry run: would upload to {args.repo_id}:")
        for name in files:
            print(f"  {name}")
        return 0
    info = push(args.adapter_dir, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.adapter_dir} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def output_parent_problem(path: str | None, option: str, folder_ok: bool = False) -> str | None:
    """Why an output file cannot be written (its folder does not exist; unless ``folder_ok``, it names a folder),
    checked before the work; ``None`` if fine."""
    if path is not None and not Path(path).expanduser().resolve().parent.is_dir():
        return f"{option} {path!r}: the folder {str(Path(path).parent)!r} does not exist"
    if path is not None and not folder_ok and Path(path).expanduser().is_dir():
        return f"{option} {path!r} is a folder; give a file name"
    return None


def _check_output_parent(path: str | None, option: str, folder_ok: bool = False) -> None:
    problem = output_parent_problem(path, option, folder_ok)
    if problem:
        raise FileNotFoundError(f"{problem}.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``molora`` command."""
    parser = argparse.ArgumentParser(
        prog="molora", description="Train, run, evaluate, inspect and share MoLoRA (mixture-of-LoRA-experts) adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sft", help="fine-tune a MoLoRA adapter with TRL's SFTTrainer from a YAML recipe")
    p.add_argument("--config", "-c", help="YAML recipe (sections model, data, adapter, training, eval)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set adapter.num_experts=4 (repeatable; the value is parsed as YAML)",
    )
    p.add_argument("--print-recipe", action="store_true", help="print the validated recipe with defaults and exit")
    p.set_defaults(func=_sft)

    p = sub.add_parser("generate", help="generate text with a trained adapter")
    p.add_argument(
        "--adapter",
        required=True,
        help="adapter folder (written by `molora sft` or save_pretrained), or a hub repository user/name",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
    p.add_argument(
        "--model",
        help="base model to use instead of the one recorded with the adapter ('default' = SmolLM2-135M-Instruct)",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="loss / perplexity and exact match per task on a dataset")
    p.add_argument(
        "--adapter",
        help="adapter folder or hub repository user/name; without it the base model (--model) is evaluated",
    )
    p.add_argument("--model", help="base model folder or hub id ('default' = SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="JSONL/JSON/CSV/parquet file, hub dataset id, or 'bundled'")
    p.add_argument(
        "--split",
        help="split of a hub dataset, a folder of split files or a saved DatasetDict (default: eval; a single file "
        "is read whole)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "chat", "prompt_completion", "text"],
        help="the rows' format, as the recipe's data.format (default auto: from their columns)",
    )
    p.add_argument("--max-examples", type=_positive_int, help="evaluate at most this many rows")
    p.add_argument("--max-per-task", type=_positive_int, help="evaluate at most this many rows per task")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--no-exact-match", action="store_true", help="only loss and perplexity (no generation)")
    p.add_argument("--json", help="also write the results (with predictions) to this JSON file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("inspect", help="adapter summary and per-layer expert-load heat map (PNG)")
    p.add_argument("adapter_dir", metavar="DIR")
    p.add_argument(
        "--output",
        "-o",
        help="image path (.png, .pdf, .svg, ...; .png is added to a name without a suffix) or an existing folder "
        "(default: DIR/expert_load.png)",
    )
    p.set_defaults(func=_inspect)

    p = sub.add_parser("push", help="upload an adapter with a generated model card to the Hugging Face Hub")
    p.add_argument("adapter_dir", metavar="DIR")
    p.add_argument("--repo-id", required=True, help="'user/name' of the model repository")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="hub token (default: the logged-in user's)")
    p.add_argument("--dry-run", action="store_true", help="write the card and list the files, upload nothing")
    p.set_defaults(func=_push)

    # listed for `molora --help`; its own options are parsed by molora.bench.main (see main below)
    sub.add_parser("bench", help="layer and training-step time and peak memory as ratios to PEFT LoRA", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``molora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .training.recipe import RecipeError

    try:
        return args.func(args)
    except (RecipeError, OSError, ValueError) as err:
        # what the user gave is wrong (a file, a key, a value, a combination; ValueError also covers the checks of
        # MoLoraConfig, TRL and PEFT) or the machine refused (a path, permissions, the network: OSError): one line,
        # no traceback. MOLORA_DEBUG=1 shows the traceback.
        if os.environ.get("MOLORA_DEBUG"):
            raise
        print(f"molora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
