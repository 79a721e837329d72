"""MoLoraConfig validates every field early, naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftConfig

from molora import MoLoraConfig

BAD_CONFIGS = [
    ({"r": 0}, r"`r`=0 must be an integer >= 1"),
    ({"r": 2.5}, r"`r`=2.5 must be an integer"),
    ({"lora_alpha": 0}, r"`lora_alpha`=0 must be > 0"),
    ({"lora_dropout": 1.0}, r"`lora_dropout`=1.0 must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"`lora_dropout`=-0.1 must be in \[0, 1\)"),
    ({"num_experts": 0}, r"`num_experts`=0 must be an integer >= 1"),
    ({"top_k": 0}, r"`top_k`=0 must be an integer >= 1"),
    ({"top_k": 9, "num_experts": 8}, r"`top_k`=9 must be <= num_experts=8"),
    ({"router": "nope"}, r"`router`='nope' is not a registered router; allowed values: \[.*'soft'.*'topk'"),
    ({"router": "topp_typo_k"}, r"allowed values"),
    ({"router_kwargs": {"renormalise": True}}, r"unknown key\(s\) \['renormalise'\].*'renormalize'"),
    ({"router_kwargs": {"renormalize": True, 1: 2}}, r"`router_kwargs` keys must be .*got 1; allowed .*'renormalize'"),
    ({"router_kwargs": {"renormalize": "yes"}}, r"`router_kwargs\['renormalize'\]`='yes'.*bool"),
    ({"router_kwargs": {"jitter_noise": 1.5}}, r"jitter_noise.*must be in \[0, 1\)"),
    ({"router": "soft", "router_kwargs": {"temperature": 0.0}}, r"temperature.*must be > 0"),
    ({"router_kwargs": [1]}, r"`router_kwargs` must be a dict"),
    ({"router_init": "xavier"}, r"`router_init`='xavier' is not supported; allowed values: \['kaiming', 'normal'\]"),
    ({"router_init_std": 0}, r"`router_init_std`=0 must be > 0"),
    ({"target_modules": []}, r"`target_modules` is empty"),
    ({"target_modules": ""}, r"`target_modules` is an empty string"),
    ({"target_modules": ["q_proj", ""]}, r"`target_modules` must contain non-empty strings"),
    ({"target_modules": 3}, r"`target_modules` must be a list"),
    ({"target_parameters": ["w"]}, r"`target_parameters`.*not supported"),
    ({"layers_pattern": "layers"}, r"`layers_pattern` only has an effect together with `layers_to_transform`"),
    ({"bias": "boft_only"}, r"`bias`='boft_only' is not supported; allowed values: \['none', 'all', 'molora_only'\]"),
    ({"aux_loss_coef": -1.0}, r"`aux_loss_coef`=-1.0 must be >= 0"),
    ({"z_loss_coef": float("nan")}, r"`z_loss_coef`=nan must be a finite number"),
    ({"balance_loss_type": "hf"}, r"`balance_loss_type`='hf' is not supported; allowed values: \['megatron'"),
    ({"loss_reduction": "avg"}, r"`loss_reduction`='avg' is not supported; allowed values: \['mean', 'sum'"),
    ({"kernel": "triton9"}, r"`kernel`='triton9' is not supported; allowed values"),
    ({"init_lora_weights": "pissa"}, r"`init_lora_weights`='pissa' is not supported; allowed values: True, False"),
    ({"init_lora_weights": 1}, r"`init_lora_weights`=1 is not supported; allowed values: True, False, 'gaussian'"),
    ({"rank_pattern": {"down_proj": 0}}, r"`rank_pattern\['down_proj'\]`=0 must be an integer >= 1"),
    ({"alpha_pattern": {"q_proj": "big"}}, r"`alpha_pattern\['q_proj'\]`='big' must be a finite number"),
    ({"rank_pattern": [("q_proj", 4)]}, r"`rank_pattern` must be a dict"),
    ({"rank_pattern": {"q_proj": 4}, "dynamic_rank": {}}, r"`rank_pattern` sets fixed per-module ranks"),
    ({"use_dora": True}, r"`use_dora`=True: DoRA is not supported by MoLoRA"),
    ({"fan_in_fan_out": "yes"}, r"`fan_in_fan_out`='yes' must be True or False"),
    ({"use_rslora": "false"}, r"`use_rslora`='false' must be True or False"),
    ({"track_routing_stats": 0}, r"`track_routing_stats`=0 must be True or False"),
    ({"modules_to_save": "lm_head"}, r"`modules_to_save`='lm_head' must be a list of module names"),
    ({"layers_to_transform": "1"}, r"`layers_to_transform`='1' must be a layer index, a list of them, or None"),
    ({"router": "soft", "router_kwargs": {"temperature": float("inf")}}, r"temperature.*must be a finite number"),
    ({"layers_to_transform": [0], "layers_pattern": 3}, r"`layers_pattern`=3 must be the name of the model's layer"),
    ({"layers_to_transform": [0], "layers_pattern": [""]}, r"`layers_pattern`=\[''\] must be the name"),
    # as peft.LoraConfig: PEFT would match the regex as given and ignore the layer selection
    ({"target_modules": r".*q_proj", "layers_to_transform": [0]}, r"`layers_to_transform` cannot be used when `targ"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS, ids=[next(iter(k)) for k, _ in BAD_CONFIGS])
def test_bad_values_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoLoraConfig(**kwargs)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, r"`r`=0 must be an integer >= 1"),
        ("aux_loss_coef", -1.0, r"`aux_loss_coef`=-1.0 must be >= 0"),
        ("loss_reduction", "bogus", r"`loss_reduction`='bogus' is not supported; allowed values"),
        ("init_lora_weights", "olora", r"`init_lora_weights`='olora' is not supported; allowed values"),
    ],
)
def test_a_config_edited_after_it_was_built_is_checked_again_when_injected(field, value, message):
    """A sweep that sets a field on a built config bypasses ``__post_init__``; get_peft_model and add_adapter check
    every field again (``r=0`` was a ZeroDivisionError deep in the layers, a negative aux coefficient trained
    against balance, an unknown reduction acted as 'sum'), as PEFT's LoRA layers re-check ``r``."""
    from conftest import make_llama
    from peft import get_peft_model

    config = MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_llama(), config)
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=message):
        model.add_adapter("second", config)


def test_lora_spellings_of_bias_and_init_are_accepted():
    """A `LoraConfig(bias="lora_only", init_lora_weights="gaussian")` swapped for `MoLoraConfig` keeps working: PEFT's
    `lora_only` is MoLoRA's `molora_only`, and "gaussian" draws every expert's A from N(0, 1/r) as LoRA's A."""
    from conftest import make_gpt2
    from peft import LoraConfig, get_peft_model

    config = MoLoraConfig(r=4, num_experts=3, top_k=1, bias="lora_only", init_lora_weights="gaussian")
    assert config.bias == "molora_only" and config.init_lora_weights == "gaussian"
    assert LoraConfig(r=4, lora_alpha=8).lora_alpha == MoLoraConfig(r=4).lora_alpha == 8  # the same default scaling
    model = get_peft_model(make_gpt2(), config)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    A, B = layer.molora_A["default"].weight, layer.molora_B["default"].weight
    assert not B.any() and A.shape == (3, 48, 4)
    assert abs(model.base_model.model.transformer.h[1].mlp.c_fc.molora_A["default"].weight.std().item() - 0.25) < 0.03
    assert layer.base_layer.bias.requires_grad  # the adapted layers' biases train, as LoRA's "lora_only"
    assert not model.base_model.model.transformer.ln_f.bias.requires_grad
    default = get_peft_model(make_gpt2(), MoLoraConfig(r=4, num_experts=3, top_k=1))
    bound = 1 / 48**0.5  # kaiming-uniform: U(+-1/sqrt(d_in))
    assert default.base_model.model.transformer.h[0].attn.c_attn.molora_A["default"].weight.abs().max() <= bound


def test_defaults_are_valid_and_documented():
    config = MoLoraConfig()
    assert (config.r, config.num_experts, config.top_k, config.router) == (8, 8, 2, "topk")
    doc = MoLoraConfig.__doc__
    for field in dataclasses.fields(MoLoraConfig):
        if field.name in {f.name for f in dataclasses.fields(PeftConfig)}:
            continue
        assert field.metadata.get("help"), f"{field.name} has no help text"
        assert f"{field.name} (" in doc, f"{field.name} is missing from the class docstring"


def test_config_json_roundtrip(tmp_path):
    config = MoLoraConfig(
        r=4, num_experts=3, top_k=1, router="topk", router_kwargs={"renormalize": False}, target_modules=["q_proj"]
    )
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "MOLORA" and raw["router_kwargs"] == {"renormalize": False}
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MoLoraConfig)
    assert loaded.router_kwargs == {"renormalize": False} and loaded.target_modules == {"q_proj"}
    assert loaded.scaling == config.scaling


def test_numpy_scalars_are_taken_as_the_same_python_numbers(tmp_path):
    """A hyper-parameter search's ``np.int64(8)`` / ``np.float32(0.1)``: refused as "not a finite number" (LoRA takes
    them and fails at save_pretrained, JSON cannot hold them); now the Python number of the same value, saved."""
    np = pytest.importorskip("numpy")
    config = MoLoraConfig(
        r=np.int64(8),
        lora_alpha=np.float32(16),
        lora_dropout=np.float64(0.25),
        num_experts=np.int32(4),
        top_k=np.int64(2),
        rank_pattern={"q_proj": np.int64(4)},
        alpha_pattern={"q_proj": np.float32(8)},
    )
    assert (config.r, config.lora_alpha, config.lora_dropout, config.num_experts, config.top_k) == (
        8,
        16.0,
        0.25,
        4,
        2,
    )
    assert type(config.r) is int and type(config.lora_alpha) is float and type(config.rank_pattern["q_proj"]) is int
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.num_experts, loaded.rank_pattern, loaded.alpha_pattern) == (
        8,
        4,
        {"q_proj": 4},
        {"q_proj": 8.0},
    )
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        MoLoraConfig(r=np.float64(2.5))
    # also inside the router's and DR-LoRA's settings ("np.int64(2) must be an integer in [1, 2]")
    nested = MoLoraConfig(
        r=8, router="relu", router_kwargs={"target_sparsity": np.float32(0.5)}, dynamic_rank={"init_rank": np.int64(2)}
    )
    assert type(nested.router_kwargs["target_sparsity"]) is float and type(nested.dynamic_rank["init_rank"]) is int


def test_design_example_config_builds_and_wraps_a_model():
    """The example in DESIGN.md, verbatim: router_kwargs={"q": 1.1} is DynMoLE's Tsallis index."""
    from conftest import make_llama
    from peft import get_peft_model

    cfg = MoLoraConfig(
        r=8,
        lora_alpha=16,
        num_experts=8,
        top_k=2,
        router="dynmole",
        router_kwargs={"q": 1.1},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        aux_loss_coef=0.01,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(make_llama(), cfg)
    ids = torch.randint(3, 90, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and model.molora_aux_loss() is not None


def test_rank_and_alpha_patterns_follow_lora_config(tmp_path):
    """``rank_pattern``/``alpha_pattern`` give a module its own rank and alpha, matched as ``LoraConfig`` matches them
    (the same per-module ranks and scalings as PEFT LoRA), and survive a save and reload."""
    from conftest import make_llama
    from peft import LoraConfig, PeftModel, get_peft_model

    import molora

    patterns = dict(rank_pattern={"down_proj": 16, "layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})
    targets = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, target_modules=targets, **patterns))
    lora = get_peft_model(make_llama(), LoraConfig(target_modules=targets, **patterns))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, molora.MoLoraLayer)}
    lora_layers = {n: m for n, m in lora.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert layers.keys() == lora_layers.keys()
    for name, layer in layers.items():
        assert layer.r["default"] == lora_layers[name].r["default"], name
        assert layer.scaling["default"] == lora_layers[name].scaling["default"], name
        assert layer.molora_A["default"].weight.shape[-1] == layer.r["default"]
    assert {layer.r["default"] for layer in layers.values()} == {2, 8, 16}
    assert layers["base_model.model.model.layers.0.self_attn.v_proj"].scaling["default"] == 0.5
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    for name, layer in loaded.named_modules():
        if isinstance(layer, molora.MoLoraLayer):
            assert layer.r == layers[name].r and layer.scaling == layers[name].scaling, name


def test_lora_config_options_convert_or_explain():
    """A ``LoraConfig``'s keyword arguments carry over: GPT-2's ``fan_in_fan_out=True`` is accepted (Conv1D is
    recognised by type), options at ``LoraConfig``'s default are dropped, and the others name themselves."""
    from conftest import make_gpt2
    from peft import get_peft_model

    config = MoLoraConfig(r=4, num_experts=2, top_k=1, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(make_gpt2(), config)(input_ids=torch.randint(0, 32, (1, 6))).logits.sum()
    assert MoLoraConfig(layer_replication=None, lora_bias=False, use_dora=False).r == 8
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'layer_replication'.*LoraConfig option"):
        MoLoraConfig(layer_replication=[[0, 2]])
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'no_such_option'"):
        MoLoraConfig(no_such_option=1)


def test_the_router_container_name_is_refused_as_an_adapter_name():
    """An adapter named like the MiLoRA router container saved fine but loaded none of its weights back (the keys
    of that container are rewritten on load): the name is refused when the adapter is created."""
    from conftest import make_llama
    from peft import get_peft_model

    config = MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="Adapter name 'molora_milora' is reserved by molora"):
        get_peft_model(make_llama(), config, adapter_name="molora_milora")
    model = get_peft_model(make_llama(), config)
    with pytest.raises(ValueError, match="is reserved"):
        model.add_adapter("molora_milora", MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    assert list(model.peft_config) == ["default"]


def test_empty_layers_to_transform_warns_and_adapts_every_layer_as_peft_does(tmp_path):
    """PEFT reads ``layers_to_transform=[]`` as no selection: every layer is adapted. molora does the same (adapters
    saved with it load as they were trained) and warns that the list selects nothing."""
    from conftest import make_llama
    from peft import PeftModel, get_peft_model

    from molora.adapters.layer import MoLoraLayer

    with pytest.warns(UserWarning, match=r"`layers_to_transform`=\[\] selects no layer: .* every layer is adapted"):
        config = MoLoraConfig(layers_to_transform=[], target_modules=["q_proj"], num_experts=2, top_k=1)
    with pytest.warns(UserWarning, match="selects no layer"):
        model = get_peft_model(make_llama(), config)
        layers = len(model.base_model.model.model.layers)
        assert sum(isinstance(m, MoLoraLayer) for m in model.modules()) == layers
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert sum(isinstance(m, MoLoraLayer) for m in loaded.modules()) == layers
