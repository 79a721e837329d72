"""Datasets for ``molora sft`` / ``molora eval``: local files, hub ids or the bundled multi-task data.

Rows come in one of three layouts, detected from the columns (``data.format: auto``) or forced:

* ``chat``: a list of ``{"role", "content"}`` messages (``data.messages_field``, default ``messages``);
* ``prompt_completion``: ``prompt`` and ``completion`` (strings, or message lists for conversational data); TRL
  trains on the completion only;
* ``text``: one string per row (``data.text_field``, default ``text``).

An optional ``task`` column (``data.task_field``) groups rows for per-task exact match in ``molora eval``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .recipe import BUNDLED, BUNDLED_EVAL_SPLITS, RecipeError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def bundled_path(split: str) -> str:
    """Path of the bundled multi-task dataset's ``"train"`` or ``"eval"`` split (``molora/data/tasks_*.jsonl``)."""
    path = resources.files("molora") / "data" / f"tasks_{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"The bundled dataset file {path} is missing; reinstall molora.")
    return str(path)


def load_rows(spec: str, split: str = "train", *, split_setting: str | None = None, strict: bool | None = None):
    """Load a ``datasets.Dataset`` from a local file, the bundled data (``"bundled"``) or a hub dataset id.

    ``split`` names the split of a hub dataset, of a folder of split files or of a ``DatasetDict`` saved with
    ``save_to_disk``; a single file or a saved ``Dataset`` holds one split, ``"train"``. ``split_setting``: the
    option that chooses ``split`` (errors name it). ``strict``: the split was asked for, not a default, so a
    single-split source refuses another name (default: whether ``split_setting`` is given).

    Raises:
        FileNotFoundError: ``spec`` looks like a local file (it has a known extension or a path separator) but does
            not exist.
        RecipeError: a strict ``split`` a single-split source does not have, or a split the source lacks.
    """
    import datasets

    if spec == BUNDLED:
        if split not in ("train", *BUNDLED_EVAL_SPLITS):
            raise RecipeError(
                f"{split_setting or 'split'}={split!r}: the bundled dataset has the splits 'train' and 'eval' (also "
                f"read as {list(BUNDLED_EVAL_SPLITS[1:])})."
            )
        spec = bundled_path("eval" if split in BUNDLED_EVAL_SPLITS else "train")
        split = "train"
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    single = path.is_file() or (path.is_dir() and (path / "dataset_info.json").exists())
    if strict is None:
        strict = split_setting is not None
    if single and strict and split != "train":
        kind = "file" if path.is_file() else "saved Dataset (save_to_disk)"
        raise RecipeError(
            f"{split_setting}={split!r}, but {spec!r} is one {kind}: it holds a single split, 'train'. Give the "
            "held-out rows their own file, or select splits by name from a hub dataset, a folder of split files or "
            "a DatasetDict saved with save_to_disk."
        )
    if path.is_file():
        if suffix not in LOCAL_BUILDERS:
            raise RecipeError(f"Cannot read {spec!r}: supported files are {', '.join(sorted(LOCAL_BUILDERS))}.")
        if path.stat().st_size == 0:
            raise RecipeError(f"{spec!r} holds no rows.")
        try:
            rows = datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - datasets wraps the parser's errors in several types
            cause = err.__cause__ or err
            raise RecipeError(f"Cannot read {spec!r} as {suffix[1:]}: {type(cause).__name__}: {cause}") from err
        if len(rows) == 0:
            raise RecipeError(f"{spec!r} holds no rows.")
        return rows
    if path.is_dir():
        if single:
            return datasets.load_from_disk(str(path))
        try:
            return _load_dir(path, split)
        except ValueError as err:  # an unknown split: datasets lists the folder's own
            raise RecipeError(f"Cannot read split {split!r} of {spec!r}: {err}{_split_hint(split_setting)}") from err
    if suffix in LOCAL_BUILDERS or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"Dataset file not found: {spec!r}.")
    try:
        return datasets.load_dataset(spec, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; say what was tried
        raise RecipeError(
            f"Could not load dataset {spec!r} (not a local file, so it was tried as a hub dataset id, split "
            f"{split!r}): {type(err).__name__}: {err}{_split_hint(split_setting)}"
        ) from err


def _split_hint(split_setting: str | None) -> str:
    return f" (choose the split with {split_setting})" if split_setting else ""


def _load_dir(path: Path, split: str):
    import datasets

    return datasets.load_dataset(str(path), split=split)


#: what a recipe can do about columns that do not match (``molora eval`` has no field options: rename the columns)
RECIPE_FIELD_HINT = "set data.messages_field / prompt_field / completion_field / text_field to the right column names"


def detect_format(
    columns: list[str],
    data_cfg: dict[str, Any],
    field_hint: str = RECIPE_FIELD_HINT,
    format_setting: str = "data.format",
) -> str:
    """The row layout (``chat``, ``prompt_completion`` or ``text``) of a dataset with these columns; ``field_hint``
    says how to point the reader at other columns, ``format_setting`` names where the format was chosen (the recipe
    key, or ``molora eval``'s ``--format``)."""
    fmt = data_cfg.get("format", "auto")
    fields = {
        "chat": [data_cfg["messages_field"]],
        "prompt_completion": [data_cfg["prompt_field"], data_cfg["completion_field"]],
        "text": [data_cfg["text_field"]],
    }
    if fmt != "auto":
        missing = [c for c in fields[fmt] if c not in columns]
        if missing:
            raise RecipeError(
                f"{format_setting}={fmt!r} needs the column(s) {missing}, but the dataset has {columns}; {field_hint}."
            )
        return fmt
    for candidate in ("chat", "prompt_completion", "text"):
        if all(c in columns for c in fields[candidate]):
            return candidate
    raise RecipeError(
        f"Cannot tell the dataset format from its columns {columns}: expected {fields['chat']} (chat), "
        f"{fields['prompt_completion']} (prompt/completion) or {fields['text']} (text); {field_hint}."
    )


def prepare(
    dataset,
    data_cfg: dict[str, Any],
    max_examples: int | None,
    keep_task: bool = False,
    field_hint: str = RECIPE_FIELD_HINT,
    format_setting: str = "data.format",
):
    """Rename the layout's columns to TRL's names and drop the rest; return ``(dataset, format)``."""
    fmt = detect_format(list(dataset.column_names), data_cfg, field_hint, format_setting)
    mapping = {
        "chat": {data_cfg["messages_field"]: "messages"},
        "prompt_completion": {data_cfg["prompt_field"]: "prompt", data_cfg["completion_field"]: "completion"},
        "text": {data_cfg["text_field"]: "text"},
    }[fmt]
    _check_rows(dataset, fmt, mapping)
    keep = dict(mapping)
    task_field = data_cfg.get("task_field")
    if keep_task and task_field in dataset.column_names:
        keep[task_field] = "task"
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    renames = {old: new for old, new in keep.items() if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    if max_examples is not None and len(dataset) > max_examples:
        dataset = dataset.select(range(max_examples))
    return dataset, fmt


def _check_rows(dataset, fmt: str, mapping: dict[str, str]) -> None:
    """Fail with the column, the row and what is expected when rows do not hold what the format needs (TRL's
    preprocessing would stop with an AttributeError or IndexError deep inside)."""
    for column, role in mapping.items():
        setting = f"{role}_field"  # data.messages_field, prompt_field, completion_field, text_field
        for index, value in enumerate(dataset[column]):
            problem = _row_problem(value, role)
            if problem:
                raise RecipeError(
                    f"Row {index} of the data: column {column!r} (data.{setting}) {problem}; a {fmt} row needs "
                    + {
                        "chat": "a non-empty list of {role, content} messages.",
                        "prompt_completion": "a prompt and a completion, each a string or a list of messages.",
                        "text": "a string.",
                    }[fmt]
                )


def _row_problem(value: Any, role: str) -> str | None:
    """What is wrong with one row's value of a column in ``role`` (messages, prompt, completion, text), or None."""
    if isinstance(value, str):
        return "is a string" if role == "messages" else None
    if isinstance(value, list) and role != "text":
        if not value and role != "prompt":
            return "is an empty list"
        bad = [m for m in value if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m]
        return f"holds {bad[0]!r}, not a {{role, content}} message" if bad else None
    return f"holds {type(value).__name__} {value!r}"


def load_split(data_cfg: dict[str, Any], which: str, keep_task: bool = False):
    """The prepared ``"train"`` or ``"eval"`` dataset of a recipe's ``data`` section, or ``None`` if there is none.

    With ``data.train: null`` both splits come from the bundled dataset.
    """
    if which == "train":
        spec = data_cfg["train"] if data_cfg["train"] is not None else BUNDLED
        split, setting = data_cfg["train_split"], "data.train_split"
        limit = data_cfg["max_examples"]
    else:
        spec = data_cfg["eval"]
        if spec is None and data_cfg["train"] is None:
            spec = BUNDLED
        if spec is None:
            return None
        split, setting = data_cfg["eval_split"], "data.eval_split"
        limit = data_cfg["max_eval_examples"]
    # unset, the eval split is a default (the bundled data's eval split, else the training data's split name), which
    # a single file does not have to hold
    strict = split is not None
    if split is None:
        split = "eval" if spec == BUNDLED else data_cfg["train_split"]
    dataset = load_rows(str(spec), split, split_setting=setting, strict=strict)
    if data_cfg.get("shuffle_seed") is not None and which == "train":
        dataset = dataset.shuffle(seed=data_cfg["shuffle_seed"])
    return prepare(dataset, data_cfg, limit, keep_task=keep_task)[0]
