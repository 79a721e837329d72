"""Supervised fine-tuning of a MoLoRA adapter with TRL's ``SFTTrainer``, driven by a recipe (``molora sft``).

:func:`build_trainer` turns a validated recipe (see :mod:`molora.training.recipe`) into an ``SFTTrainer`` with the
adapter attached and molora's callbacks installed (:class:`~molora.training.callbacks.MoLoraCallback` for per-step
router state, :class:`~molora.training.dynamic_rank_callback.DynamicRankCallback` for rank growth,
:class:`~molora.training.logging.RoutingStatsCallback` for the logs); :func:`run_sft` trains,
saves the adapter with its tokenizer, routing statistics, base-model record, recipe and model card, and evaluates
exact match on held-out tasks before and after when the recipe asks for it.

Defaults that differ from ``trl.SFTConfig`` (a recipe's ``training`` section overrides them): ``bf16`` only on a
GPU that supports it (``SFTConfig`` turns it on everywhere), ``gradient_checkpointing: false`` (``SFTConfig`` turns
it on; it costs a second forward per layer), ``use_cpu`` when there is no GPU, ``report_to: none``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

from .recipe import RecipeError, build_adapter_config, dump_recipe

RECIPE_FILE = "molora_recipe.yaml"
RESULTS_FILE = "molora_results.json"


def sft_config(training: dict[str, Any], default_output_dir: str = "runs/molora-sft"):
    """A ``trl.SFTConfig`` from a recipe's ``training`` section plus molora's CPU-friendly defaults."""
    from trl import SFTConfig

    kwargs = sft_kwargs(training, default_output_dir)
    kwargs.pop("resume_from_checkpoint", None)  # given to train(), see run_sft
    if kwargs.get("push_to_hub"):
        # the trainer's own push would upload at its save, before molora writes the card and its files (and with
        # training_args.bin): run_sft pushes the finished folder as `molora push` does
        hub_repo(training)
        kwargs["push_to_hub"] = False
    try:
        config = SFTConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"training: {err}") from None
    from transformers.integrations import get_available_reporting_integrations, get_reporting_integration_callbacks

    try:  # the trainer checks it only once the model and data have loaded
        get_reporting_integration_callbacks(config.report_to)
    except ValueError as err:
        raise RecipeError(f"training.report_to: {err}") from None
    available = get_available_reporting_integrations()
    missing = [name for name in config.report_to if name not in available]
    if missing:  # the trainer's callback would fail at its construction, after the model has loaded
        raise RecipeError(
            f"training.report_to: {missing} needs its package, which is not installed (e.g. pip install "
            f"{' '.join(missing)}); the loggers installed here: {available or 'none'}."
        )
    return config


def hub_repo(training: dict[str, Any]) -> str | None:
    """The repository ``training.push_to_hub`` uploads the finished adapter to (``training.hub_model_id``), checked;
    ``None`` without ``push_to_hub``."""
    if not training.get("push_to_hub"):
        return None
    from ..hub import check_repo_id

    repo = training.get("hub_model_id")
    if not isinstance(repo, str):
        raise RecipeError(
            f"training.push_to_hub=true needs training.hub_model_id='user/name' (got {repo!r}): molora pushes the "
            "finished adapter folder there, with its card, as `molora push` does."
        )
    try:
        check_repo_id(repo)
    except ValueError as err:
        raise RecipeError(f"training.hub_model_id: {err}") from None
    return repo


def sft_kwargs(training: dict[str, Any], default_output_dir: str = "runs/molora-sft") -> dict[str, Any]:
    """A recipe's ``training`` section with molora's defaults (no reports, CPU, bf16 where the GPU has it, no
    checkpointing) and the YAML spellings normalised: the keyword arguments of ``trl.SFTConfig``."""
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    defaults: dict[str, Any] = {
        "output_dir": default_output_dir,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "report_to": "none",
    }
    training = dict(training)
    if training.get("output_dir") is None:  # null: the default folder, not transformers' "trainer_output"
        training.pop("output_dir", None)
    if any(f.name == "activation_checkpointing" for f in dataclasses.fields(SFTConfig)):
        # transformers 5 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and warns
        # whenever only the old name is set, TRL's own default included: recipes may use either name
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if old in training and training.get(new) is None:
                training[new] = training.pop(old)
        defaults["activation_checkpointing"] = False
    else:
        defaults["gradient_checkpointing"] = False
    if not cuda:
        defaults["use_cpu"] = True
    kwargs = {**defaults, **training}
    # YAML 1.1 reads an unquoted `no` as False (`save_strategy: no`, `--set training.report_to=none` is fine)
    for key in ("save_strategy", "eval_strategy", "logging_strategy", "hub_strategy"):
        if kwargs.get(key) is False:
            kwargs[key] = "no"
    if kwargs.get("report_to") is False:
        kwargs["report_to"] = "none"
    if kwargs.get("bf16") and kwargs.get("fp16"):
        raise RecipeError("training.bf16 and training.fp16 are both true; choose one.")
    if not cuda and kwargs.get("fp16"):
        raise RecipeError("training.fp16 needs a GPU; on a CPU use bf16 or neither.")
    return kwargs


@contextlib.contextmanager
def keep_4bit_training_layout(model):
    """Restore bitsandbytes 4-bit weights after an inference pass exactly as they were before it.

    On CPUs with AVX512-BF16 an eval-mode forward of a ``Linear4bit`` (``eval.before``) repacks its weight into an
    inference layout whose matmul has no autograd, so training afterwards would silently get no gradient through
    the base layers. bitsandbytes' inverse conversion is lossy (it keeps the block scales in bf16), so the weights
    and quantization states are copied before the pass and put back after it.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        yield
        return
    saved = [
        (module, module.weight.data.clone(), copy.deepcopy(module.weight.quant_state))
        for module in model.modules()
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_state", None) is not None
    ]
    try:
        yield
    finally:
        for module, data, state in saved:
            module.weight.data = data
            module.weight.quant_state = state


def build_trainer(recipe: dict[str, Any], default_output_dir: str = "runs/molora-sft", model=None, tokenizer=None):
    """An ``SFTTrainer`` for a validated recipe: ``(trainer, context)`` where context holds the resolved pieces.

    Args:
        recipe: the output of :func:`molora.training.recipe.load_recipe`.
        default_output_dir: ``training.output_dir`` when the recipe gives none.
        model, tokenizer: an already loaded base model / tokenizer to use instead of ``recipe["model"]``.
    """
    from transformers import set_seed
    from trl import SFTTrainer

    import molora  # noqa: F401  (registers the PEFT type)

    from .callbacks import MoLoraCallback
    from .data import load_split
    from .dynamic_rank_callback import DynamicRankCallback
    from .logging import install_routing_stats_callback
    from .models import load_base_model, load_tokenizer, resolve_model

    model_cfg = resolve_model(recipe["model"])
    args = sft_config(recipe["training"], default_output_dir)
    adapter_config = build_adapter_config(recipe["adapter"])
    train = load_split(recipe["data"], "train")
    eval_rows = load_split(recipe["data"], "eval", keep_task=True)
    eval_dataset = (
        eval_rows.remove_columns(["task"]) if eval_rows is not None and "task" in eval_rows.column_names else eval_rows
    )
    if args.eval_strategy != "no" and eval_dataset is None:
        # (before the model loads; the strategy is an enum by now: its value, as the recipe wrote it)
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        raise RecipeError(f"training.eval_strategy={strategy!r} needs data.eval.")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    model = model if model is not None else load_base_model(model_cfg)
    # TRL creates the adapter before Trainer seeds anything: seed here so that training.seed fixes the expert and
    # router initialisation too
    set_seed(args.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_dataset if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=adapter_config,
    )
    if len(trainer.train_dataset) == 0:
        raise RecipeError(
            f"No training rows are left after TRL's tokenization (training.max_length={args.max_length}): rows "
            "whose supervised tokens all lie beyond max_length are dropped; raise training.max_length or check "
            "the data."
        )
    # TRL writes its generic model card into output_dir at every checkpoint: a run that stops early in a folder
    # holding an earlier adapter would leave that adapter under TRL's card. molora writes its own when it saves
    trainer.create_model_card = _no_model_card
    # per-step router state (loss-free balancing biases, ReMoE's L1 coefficient) and DR-LoRA rank growth: both are
    # no-ops for adapters without those features; the stats callback goes first so the loggers see its values
    trainer.add_callback(MoLoraCallback())
    dynamic_rank = DynamicRankCallback.install(trainer)
    callback = install_routing_stats_callback(trainer)
    context = {
        "model_cfg": model_cfg,
        "eval_rows": eval_rows,
        "callback": callback,
        "dynamic_rank": dynamic_rank,
        "tokenizer": tokenizer,
    }
    return trainer, context


def _no_model_card(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``SFTTrainer.create_model_card`` (see :func:`build_trainer`)."""


def _resume_arg(value: Any, output_dir: str) -> Any:
    if value in (None, False):
        return None
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        if not Path(output_dir).is_dir() or get_last_checkpoint(output_dir) is None:
            raise FileNotFoundError(
                f"training.resume_from_checkpoint=true but {output_dir!r} holds no checkpoint-* folder to resume from."
            )
        return True
    return str(Path(str(value)).expanduser())  # (a folder with trainer_state.json: the recipe checked it)


def _warn_earlier_checkpoints(output_dir: str) -> None:
    """Warn when a run that does not resume trains into a folder holding an earlier run's checkpoints: the ``Trainer``
    replaces those of the steps it saves and leaves the others, which a later ``resume_from_checkpoint: true`` (the
    highest step) may then pick."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        return
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    steps = [p.name.removeprefix(prefix) for p in folder.glob(f"{prefix}*") if p.is_dir()]
    steps = sorted(int(step) for step in steps if step.isdigit())
    if steps:
        shown = ", ".join(f"{prefix}{step}" for step in steps[:4]) + (", ..." if len(steps) > 4 else "")
        warnings.warn(
            f"training.output_dir {str(output_dir)!r} holds checkpoints of an earlier run ({shown}): this run saves "
            "its own checkpoints there, replacing those of the same steps. To continue that run set "
            "training.resume_from_checkpoint=true; to keep its checkpoints choose another training.output_dir.",
            stacklevel=3,
        )


#: the adapter fields that decide what a checkpoint's weights mean (shapes, routing, scaling): a resumed run must
#: keep them. Coefficients, dropout, the compute path and the statistics may change between the runs.
RESUME_FIXED_FIELDS = (
    "r",
    "lora_alpha",
    "use_rslora",
    "num_experts",
    "top_k",
    "router",
    "router_kwargs",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "bias",
    "fan_in_fan_out",
    "dynamic_rank",
)


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value):
        return sorted(value)  # (target_modules is a set once injected)
    return list(value) if isinstance(value, tuple) else value


def _filled_at_injection(name: str, value: Any) -> bool:
    """A recipe value PEFT replaces when it injects the adapter: unset ``target_modules`` / ``modules_to_save`` (the
    architecture's and the task's defaults) and ``target_modules="all-linear"`` (the model's linear layers)."""
    if name not in ("target_modules", "modules_to_save"):
        return False
    return value is None or (name == "target_modules" and isinstance(value, str) and value.lower() == "all-linear")


def _same_field(name: str, saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    if name == "router_kwargs" and saved.get("router") == wanted["router"]:
        # the router's hyper-parameters with their defaults filled in: `{}` and `{"jitter_noise": 0.0}` are equal
        from ..routers.base import build_router_params

        def params(config: dict[str, Any]) -> Any:
            kwargs = config["router_kwargs"]
            return build_router_params(config["router"], kwargs, config["num_experts"], config["top_k"])

        with contextlib.suppress(TypeError, ValueError, KeyError):
            return params(saved) == params(wanted)
    return _comparable(saved[name]) == _comparable(wanted[name])


def check_resume_adapter(checkpoint: str | Path, adapter: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint whose adapter another recipe wrote (``adapter``: the recipe's section).

    The ``Trainer`` loads whatever weights match by name and shape: a checkpoint of another router or rank pattern
    resumed silently (the saved adapter then claimed a configuration its first steps did not train), and other
    shapes died in a size-mismatch dump. ``target_modules`` and ``modules_to_save`` are not compared when PEFT fills
    them in at injection (:func:`_filled_at_injection`)."""
    path = Path(checkpoint) / "adapter_config.json"
    if not path.is_file():
        return  # not a PEFT checkpoint of this kind: the Trainer says what it cannot load
    saved = json.loads(path.read_text())
    wanted = build_adapter_config(adapter).to_dict()
    differ = [
        f"{name}={saved[name]!r} (the recipe: {wanted[name]!r})"
        for name in RESUME_FIXED_FIELDS
        if name in saved and not _filled_at_injection(name, wanted.get(name)) and not _same_field(name, saved, wanted)
    ]
    if saved.get("peft_type") not in (None, "MOLORA"):
        differ.insert(0, f"peft_type={saved['peft_type']!r} (the recipe: 'MOLORA')")
    if "lora_alpha" not in adapter and saved.get("lora_alpha") == 16 and wanted["lora_alpha"] == 8:
        # the same recipe file: molora's default was 16 before it became peft.LoraConfig's 8
        differ = [
            d + " [the default changed from 16 to 8: set adapter.lora_alpha: 16]" if d.startswith("lora_alpha=") else d
            for d in differ
        ]
    if differ:
        raise RecipeError(
            f"training.resume_from_checkpoint: {checkpoint} holds an adapter trained with other settings: "
            f"{', '.join(differ)}. Resume with the recipe that wrote it, or train into a new training.output_dir "
            "(without resume_from_checkpoint). Nothing was changed."
        )


def run_sft(recipe: dict[str, Any], default_output_dir: str = "runs/molora-sft", log=print) -> dict[str, Any]:
    """Train and save an adapter for a validated recipe; return a summary (losses, timings, evaluations).

    The output folder receives the adapter (``adapter_model.safetensors``, ``adapter_config.json``), the tokenizer,
    ``routing_stats.json``, ``molora_base_model.json``, the effective recipe (``molora_recipe.yaml``), a model card
    (``README.md``) and ``molora_results.json``.
    """
    from ..hub import HEATMAP_FILE, push, write_model_card
    from .evaluate import evaluate, format_table
    from .models import write_base_info

    start = time.time()
    # read (and a resume that cannot work fails) before the model loads
    output_dir = recipe["training"].get("output_dir") or default_output_dir
    if Path(output_dir).expanduser().exists() and not Path(output_dir).expanduser().is_dir():
        raise FileExistsError(f"training.output_dir={str(output_dir)!r} is a file, not a folder to save the run in.")
    resume = _resume_arg(recipe["training"].get("resume_from_checkpoint"), output_dir)
    checkpoint = None
    if resume is not None:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(output_dir) if resume is True else resume
        check_resume_adapter(checkpoint, recipe["adapter"])
    else:
        _warn_earlier_checkpoints(output_dir)
    trainer, ctx = build_trainer(recipe, default_output_dir)
    # the run's routing statistics are written once the adapter they describe is saved (_save_adapter)
    ctx["callback"].defer_run_files = True
    out_dir = trainer.args.output_dir
    main_process = trainer.is_world_process_zero()
    ev = recipe["eval"]
    results: dict[str, Any] = {"output_dir": out_dir}
    eval_kwargs = dict(
        max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"], max_per_task=ev["max_per_task"]
    )
    if ev["before"] and ctx["eval_rows"] is not None and main_process:
        with trainer.model.disable_adapter(), keep_4bit_training_layout(trainer.model):
            results["eval_before"] = evaluate(trainer.model, ctx["tokenizer"], ctx["eval_rows"], **eval_kwargs)
        log(format_table(results["eval_before"], "held-out tasks before training (base model):"))
    trainer.model.train()
    results["load_seconds"] = time.time() - start
    if checkpoint is not None:
        ctx["callback"].resume_from(checkpoint)
        ctx["dynamic_rank"].resume_from(checkpoint)
    train_start = time.time()
    output = trainer.train(resume_from_checkpoint=resume)
    results["train_seconds"] = time.time() - train_start
    if trainer.state.global_step == 0:
        # nothing trained: saving would put a fresh adapter over the folder's earlier one
        raise RecipeError(
            f"No training step ran ({len(trainer.train_dataset)} training rows, training.max_steps="
            f"{trainer.args.max_steps}, training.num_train_epochs={trainer.args.num_train_epochs}); nothing was saved "
            f"and {out_dir} is unchanged."
        )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    results["losses"] = losses
    results["train_loss"] = output.training_loss
    results["global_step"] = trainer.state.global_step
    results["log_history"] = trainer.state.log_history
    _save_adapter(trainer, out_dir, main_process)
    ctx["callback"].write_run_files()
    if main_process:
        # a heat map left by `molora inspect` of an earlier adapter in this folder (push draws a new one)
        Path(out_dir, HEATMAP_FILE).unlink(missing_ok=True)
        write_base_info(out_dir, ctx["model_cfg"])
        dump_recipe(recipe, Path(out_dir) / RECIPE_FILE)

        def write_results() -> None:
            results["total_seconds"] = time.time() - start
            Path(out_dir, RESULTS_FILE).write_text(json.dumps(results, indent=1, default=_json_default))
            write_model_card(out_dir)

        # this run's results and card before the evaluation after training: interrupted there, the folder would hold
        # the new adapter beside an earlier run's results and card (which `molora push` would then publish)
        write_results()
        if ev["after"] and ctx["eval_rows"] is not None:
            results["eval_after"] = evaluate(trainer.model, ctx["tokenizer"], ctx["eval_rows"], **eval_kwargs)
            log(format_table(results["eval_after"], "held-out tasks after training (with the adapter):"))
            write_results()
        if losses:
            first, last = losses[0], losses[-1]
            log(
                f"training loss {first:.4f} -> {last:.4f} in {trainer.state.global_step} steps "
                f"({results['train_seconds']:.0f} s); adapter saved to {out_dir}"
            )
        else:
            log(
                f"{trainer.state.global_step} training steps ({results['train_seconds']:.0f} s, no loss logged: "
                f"training.logging_steps is larger); adapter saved to {out_dir}"
            )
        repo = hub_repo(recipe["training"])
        if repo is not None:
            push(out_dir, repo, private=bool(recipe["training"].get("hub_private_repo")), token=_token(recipe))
            log(f"pushed {out_dir} to {repo}")
    return results


#: the folder inside ``training.output_dir`` that the final save writes before its files replace the folder's
SAVING_DIR = ".molora-saving"


def _save_adapter(trainer, out_dir: str, main_process: bool) -> None:
    """``trainer.save_model`` into :data:`SAVING_DIR` inside ``out_dir``, then every file moved over the folder's
    earlier one, the adapter's config last (as PEFT writes it).

    Saved in place, a save that failed part-way (a full disk, an interrupt) left the folder's earlier adapter with
    some files of the new one or a truncated weights file; now it fails in the staging folder and the earlier files
    stay whole (the run's routing statistics are written after this, see ``RoutingStatsCallback.defer_run_files``).
    Every process calls it (a sharded model is gathered by all of them); the main process moves the files."""
    import shutil

    from peft.utils import CONFIG_NAME

    from .._io import replace_files

    staging = Path(out_dir) / SAVING_DIR
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)  # (what a killed save left)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        if main_process:
            replace_files(staging, Path(out_dir), last=(CONFIG_NAME,))
    finally:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)


def _token(recipe: dict[str, Any]) -> str | None:
    token = recipe["training"].get("hub_token")
    return token if isinstance(token, str) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
