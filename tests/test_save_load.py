"""Adapters round-trip through safetensors, bit-identically, in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import _stateful_router  # noqa: F401  (registers "test_biased_topk")
import torch
from conftest import make_gpt2, make_llama
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from molora import MoLoraConfig, MoLoraLayer

TESTS_DIR = Path(__file__).parent

LOADER = textwrap.dedent(
    """
    import sys, torch
    import molora
    import _stateful_router  # the custom router must be importable where the adapter is loaded
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, inputs_path, out_path = sys.argv[1:5]
    inputs = torch.load(inputs_path)
    results = {}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        results["peft_model"] = model(**inputs).logits
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        results["auto"] = auto(**inputs).logits
    results["config_type"] = type(auto.peft_config["default"]).__name__
    torch.save(results, out_path)
    """
)


def _roundtrip(tmp_path, base_model, config):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_model.save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    torch.manual_seed(5)
    for layer in (m for m in model.modules() if isinstance(m, MoLoraLayer)):
        router = layer.molora_router["default"]
        if hasattr(router, "selection_bias"):
            router.selection_bias.uniform_(-0.3, 0.3)
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, 90, (2, 9), generator=gen)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, :3] = 0
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(adapter_dir)
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, str(script), str(base_dir), str(adapter_dir), str(tmp_path / "inputs.pt"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, adapter_dir, expected, torch.load(out)


def test_llama_roundtrip_in_fresh_process_is_bit_identical(tmp_path):
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM")
    model, adapter_dir, expected, results = _roundtrip(tmp_path, make_llama(), config)
    assert results["config_type"] == "MoLoraConfig"
    assert torch.equal(results["peft_model"], expected)
    assert torch.equal(results["auto"], expected)
    files = sorted(p.name for p in adapter_dir.iterdir())
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOLORA" and saved["num_experts"] == 4 and saved["router"] == "topk"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    # the experts' banks as LoRA's weights: "<module>.lora_A.weight" -> "<module>.molora_A.weight"
    assert any(k.endswith("self_attn.q_proj.molora_A.weight") for k in tensors)
    assert any(k.endswith("mlp.down_proj.molora_router.weight") for k in tensors)
    assert not any(".default" in k for k in tensors)


def test_router_state_buffers_are_saved_and_restored(tmp_path):
    config = MoLoraConfig(
        r=2, num_experts=3, top_k=1, router="test_biased_topk", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model, adapter_dir, expected, results = _roundtrip(tmp_path, make_llama(), config)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    biases = {k: v for k, v in tensors.items() if k.endswith("molora_router.selection_bias")}
    assert len(biases) == 14 and all(v.abs().sum() > 0 for v in biases.values())
    assert torch.equal(results["peft_model"], expected)
    assert torch.equal(results["auto"], expected)


def test_gpt2_roundtrip_in_fresh_process(tmp_path):
    config = MoLoraConfig(r=4, num_experts=2, top_k=1, router="soft", init_lora_weights=False, task_type="CAUSAL_LM")
    _, _, expected, results = _roundtrip(tmp_path, make_gpt2(), config)
    assert torch.equal(results["peft_model"], expected)
    assert torch.equal(results["auto"], expected)


def test_a_save_that_cannot_write_the_config_leaves_the_previous_adapter_intact(tmp_path):
    """``save_pretrained`` writes the weights, then the config: a field set after construction to a value JSON cannot
    hold left the folder with the new weights and a truncated adapter_config.json. The config is now checked while
    the weights are collected, before anything is written; the error names the field."""
    import pytest

    config = MoLoraConfig(r=2, num_experts=2, top_k=1, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(make_llama(0), config).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = get_peft_model(make_llama(1), MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    other.peft_config["default"].revision = Path("main")
    with pytest.raises(ValueError, match="`revision`=.*cannot be saved in adapter_config.json.*Nothing was written"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    other.peft_config["default"].revision = None
    other.peft_config["default"].aux_loss_coef = -1.0
    with pytest.raises(ValueError, match="`aux_loss_coef`=-1.0 must be >= 0"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # JSON can hold a dict whose keys mix types, but PEFT writes the config with sorted keys, which cannot sort them
    other.peft_config["default"].aux_loss_coef = 0.01
    other.peft_config["default"].auto_mapping = {"base_model_class": "LlamaForCausalLM", 1: "parent_library"}
    with pytest.raises(ValueError, match="`auto_mapping`=.*cannot be saved in adapter_config.json.*Nothing was"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_adapter_is_checked_before_any_is_written(tmp_path):
    """Several adapters are saved one after the other: a bad config of the second left the folder with the first
    one's new weights beside the second's old ones, under "Nothing was written". A module-mode ``top_k`` edited past
    a decoder layer's projections, a ``task_type`` typo and a foreign ``peft_type`` (saved, the folder would not load
    or load as another method) are refused too."""
    import pytest

    def model(seed: int, **extra):
        config = dict(r=2, num_experts=2, top_k=1, init_lora_weights=False, task_type="CAUSAL_LM")
        built = get_peft_model(make_llama(seed), MoLoraConfig(**{**config, **extra}))
        built.add_adapter("second", MoLoraConfig(**{**config, **extra}))
        return built

    model(0).save_pretrained(tmp_path)
    before = _tree(tmp_path)
    assert "second/adapter_model.safetensors" in before
    other = model(1)
    other.peft_config["second"].revision = Path("main")
    with pytest.raises(ValueError, match="Adapter 'second': `revision`=.*Nothing was written"):
        other.save_pretrained(tmp_path)
    assert _tree(tmp_path) == before
    other.peft_config["second"].revision = None
    for field, value, message in (
        ("task_type", "CAUSAL-LM", "`task_type`='CAUSAL-LM' is not a PEFT task type; allowed values: \\['CAUSAL_LM'"),
        ("peft_type", "LORA", "`peft_type`='LORA' must be 'MOLORA'"),
    ):
        # (on the second adapter: PEFT hands an adapter whose peft_type is LORA to LoRA's code, not molora's)
        setattr(other.peft_config["second"], field, value)
        with pytest.raises(ValueError, match=f"Adapter 'second': {message}"):
            other.save_pretrained(tmp_path)
        assert _tree(tmp_path) == before
        setattr(other.peft_config["second"], field, MoLoraConfig(task_type="CAUSAL_LM").__dict__[field])
    module_mode = dict(num_experts=1, top_k=2, router="prompt", router_kwargs={"milora_mode": "module"})
    model(2, **module_mode).save_pretrained(tmp_path / "module")
    before = _tree(tmp_path)
    edited = model(3, **module_mode)
    edited.peft_config["default"].top_k = 99
    with pytest.raises(ValueError, match="Adapter 'default': `top_k`=99 modules per sequence.*Nothing was written"):
        edited.save_pretrained(tmp_path / "module")
    assert _tree(tmp_path) == before


def test_adapters_saved_with_bare_bank_keys_still_load(tmp_path):
    """Before the banks were modules their saved keys were "<module>.molora_A" (no ".weight"): such files load to the
    same outputs, through PeftModel.from_pretrained and after DR-LoRA's compaction alike."""
    from peft import PeftModel
    from safetensors.torch import save_file

    import molora

    config = MoLoraConfig(
        r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM", dynamic_rank={"init_rank": 1}
    )
    model = get_peft_model(make_llama(), config).eval()
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    banks = (".molora_A.", ".molora_B.")
    legacy = {(k.removesuffix(".weight") if any(b in k for b in banks) else k): v for k, v in tensors.items()}
    assert len(legacy) == len(tensors) and sum(k.endswith(".molora_A") for k in legacy) == 14
    save_file(legacy, weights, metadata={"format": "pt"})
    molora.compact_adapter(tmp_path / "a", tmp_path / "compact")
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        # compaction's smaller GEMMs may round differently (docs/dynamic_rank.md)
        for folder, atol in (("a", 0.0), ("compact", 1e-5)):
            loaded = PeftModel.from_pretrained(make_llama(), tmp_path / folder).eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=atol)


def test_a_pickled_model_loads_and_generates_the_same(tmp_path, batch):
    """``torch.save(model)`` of a whole PeftModel, as for PEFT LoRA, after a training step and a generation: the
    runtime's last-forward state (aux records with autograd graphs, weak references to the KV cache) and the layers'
    decode plans are not pickled (they could not be: it raised ``cannot pickle 'weakref.ReferenceType'``); the
    configuration stays shared between model and runtime, and the routing statistics come along."""
    config = MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False, aux_loss_coef=0.01)
    model = get_peft_model(make_llama(seed=2), config)
    model.train()
    model(**batch).loss.backward()
    model.eval()
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4)
    with torch.no_grad():
        model.generate(**kwargs, do_sample=False, pad_token_id=0)  # leaves decode plans and a KV-cache context
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        want = model.generate(**kwargs, do_sample=False, pad_token_id=0)
        got = loaded.generate(**kwargs, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert loaded.base_model.molora_runtime.peft_config is loaded.base_model.peft_config
    stats, loaded_stats = model.get_routing_stats(), loaded.get_routing_stats()
    assert stats.keys() == loaded_stats.keys() and all(stats[k].tokens == loaded_stats[k].tokens for k in stats)
    loaded.train()
    loaded(**batch).loss.backward()  # trains after loading
