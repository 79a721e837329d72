"""MoLoRA on bitsandbytes-quantized bases (QLoRA style) on CPU: injection, identity, training, save/load.

Every quantized model is loaded from a tiny Llama saved to disk (nothing is downloaded).

CPU gotcha (bitsandbytes >= 0.48 on CPUs with AVX512-BF16): the first forward of a ``Linear4bit`` in eval mode with
an input that does not require grad repacks its weight into an inference layout whose matmul has no autograd; later
training forwards then silently drop the gradient through the base layer. ``from_pretrained`` returns the model in
eval mode, so the training tests below use freshly loaded models and never run an eval forward before training.
"""

from __future__ import annotations

import pytest

bnb = pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
from conftest import make_llama  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from molora import MoLoraConfig, MoLoraLayer  # noqa: E402

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

QUANT_KINDS = ["nf4-fp32", "nf4-bf16", "int8"]
INTERMEDIATE = 128


def quant_config(kind: str) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = {"nf4-fp32": torch.float32, "nf4-bf16": torch.bfloat16}[kind]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def base_layer_type(kind: str) -> type:
    return bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    # intermediate_size 128 rather than conftest's 96: bitsandbytes' CPU eval-mode 4-bit path (the repack described
    # in the module docstring) needs in_features to be a multiple of the 64-wide quantization block; down_proj with
    # in_features=96 fails inside bitsandbytes with "shape '[64, 1]' is invalid for input of size 96", plain
    # quantized model, no adapter involved
    make_llama(intermediate_size=INTERMEDIATE).save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    """A freshly loaded quantized model (in eval mode, as ``from_pretrained`` returns it)."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant_config(kind), device_map="cpu")


def is_repacked_for_cpu_inference(layer) -> bool:
    quant_state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def molora_layers(model) -> dict[str, MoLoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLoraLayer)}


def inputs_of(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_injection_and_fresh_adapter_is_identity(llama_dir, batch, kind):
    base = load_quantized(llama_dir, kind)
    qtype = base_layer_type(kind)
    assert isinstance(base.model.layers[0].self_attn.q_proj, qtype)
    # eval + no_grad forward: fine here (no backward follows), even if it repacks 4-bit weights
    with torch.no_grad():
        expected = base(**inputs_of(batch)).logits

    model = get_peft_model(base, MoLoraConfig(num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    layers = molora_layers(model)
    assert len(layers) == 7 * 2
    assert {name.rsplit(".", 1)[-1] for name in layers} == LLAMA_TARGETS
    for name, layer in layers.items():
        assert isinstance(layer.get_base_layer(), qtype), name
        assert layer.quantization_backend is not None, name
        assert (layer.in_features, layer.out_features) == (
            layer.get_base_layer().in_features,
            layer.get_base_layer().out_features,
        )
    q = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    assert q.molora_A["default"].weight.shape == (4, 64, 8)
    assert q.molora_B["default"].weight.shape == (4, 8, 64)
    down = layers["base_model.model.model.layers.0.mlp.down_proj"]
    assert down.molora_A["default"].weight.shape == (4, INTERMEDIATE, 8)
    assert down.molora_B["default"].weight.shape == (4, 8, 64)
    # only adapter parameters are trainable, and they are not quantized
    params = trainable(model)
    assert params and all("molora_" in n for n in params)
    assert all(p.dtype == torch.float32 for p in params.values())

    with torch.no_grad():
        got = model(**inputs_of(batch)).logits
    assert got.dtype == expected.dtype
    assert torch.equal(expected, got)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_training_reaches_every_adapter_parameter_and_lowers_the_loss(llama_dir, batch, kind):
    # freshly loaded and never run in eval mode: see the module docstring
    base = load_quantized(llama_dir, kind)
    model = get_peft_model(base, MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM"))
    model.train()
    params = trainable(model)
    n_layers = len(molora_layers(model))
    for key in ("molora_A", "molora_B", "molora_router"):
        assert sum(key in n for n in params) == n_layers, key

    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in params.items():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # the quantized base weights get nothing, and no 4-bit weight was repacked into the no-autograd CPU layout
    for layer in molora_layers(model).values():
        assert not layer.get_base_layer().weight.requires_grad
        assert layer.get_base_layer().weight.grad is None
        assert not is_repacked_for_cpu_inference(layer.get_base_layer())

    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = [out.loss.item()]
    optimizer.step()
    optimizer.zero_grad()
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(**batch).loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_milora_module_mode_trains_on_a_4bit_base(llama_dir, batch):
    # MiLoRA's module mode (one router per decoder layer over its projections) on QLoRA's base, with the gradient
    # checkpointing that prepare_model_for_kbit_training turns on
    from peft import prepare_model_for_kbit_training

    base = prepare_model_for_kbit_training(load_quantized(llama_dir, "nf4-fp32"))
    config = MoLoraConfig(
        num_experts=1, top_k=3, router="prompt", router_kwargs={"milora_mode": "module"}, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config).train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        routers = [p for n, p in params.items() if "molora_milora" in n]
        assert len(routers) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_4bit_gradients_match_the_dequantized_fp32_model(llama_dir, batch):
    """With fp32 compute, QLoRA-MoLoRA must give the loss and gradients of MoLoRA on the dequantized weights.

    Non-zero adapter gradients alone do not show that the gradient flows through the quantized base layers: when a
    ``Linear4bit`` has been repacked for CPU inference (see the module docstring) every adapter parameter still gets
    a non-zero gradient through the residual stream and the adapter path, but a wrong one.
    """
    from bitsandbytes.functional import dequantize_4bit

    quantized = load_quantized(llama_dir, "nf4-fp32")
    reference = make_llama(intermediate_size=INTERMEDIATE)
    ref_modules = dict(reference.named_modules())
    n_replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            with torch.no_grad():
                ref_modules[name].weight.copy_(weight.reshape(ref_modules[name].weight.shape))
            n_replaced += 1
    assert n_replaced == 7 * 2

    config = dict(num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM")
    quantized = get_peft_model(quantized, MoLoraConfig(**config))
    reference = get_peft_model(reference, MoLoraConfig(**config))
    adapter = {n: p.detach().clone() for n, p in trainable(quantized).items()}
    missing, unexpected = reference.load_state_dict(adapter, strict=False)
    assert not unexpected and not [n for n in missing if "molora_" in n]

    results = []
    for model in (quantized, reference):
        model.train()
        out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in trainable(model).items()}))
    (loss_q, grads_q), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss_q, loss_ref, rtol=1e-5, atol=1e-5)
    assert set(grads_q) == set(grads_ref) == set(adapter)
    for name in grads_ref:
        torch.testing.assert_close(grads_q[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_bf16_adapter_weights_on_quantized_base(llama_dir, batch, kind):
    """TRL casts the trainable parameters to bf16 when the base is quantized; the adapter must still train."""
    base = load_quantized(llama_dir, kind)
    model = get_peft_model(base, MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM"))
    params = trainable(model)
    for param in params.values():
        param.data = param.data.to(torch.bfloat16)
    model.train()
    out = model(**batch)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in params.items():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_save_and_reload_onto_fresh_quantized_base(llama_dir, tmp_path, batch, kind):
    model = get_peft_model(
        load_quantized(llama_dir, kind),
        MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.eval()
    with torch.no_grad():
        expected = model(**inputs_of(batch)).logits
        with model.disable_adapter():
            base_logits = model(**inputs_of(batch)).logits
    assert not torch.allclose(expected, base_logits)  # the random adapter does change the output

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("molora_" in key for key in saved), sorted(saved)[:5]
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert len(saved) == 3 * len(molora_layers(model))

    loaded = PeftModel.from_pretrained(load_quantized(llama_dir, kind), tmp_path)
    assert isinstance(loaded.peft_config["default"], MoLoraConfig)
    layers = molora_layers(loaded)
    assert len(layers) == 7 * 2
    assert all(isinstance(layer.get_base_layer(), base_layer_type(kind)) for layer in layers.values())
    loaded.eval()
    with torch.no_grad():
        got = loaded(**inputs_of(batch)).logits
    assert torch.equal(expected, got)


# molora bug: on a base whose adapted layers report a bf16 dtype (here 4-bit with bnb_4bit_compute_dtype=bfloat16; a
# plain ``model.to(torch.bfloat16)`` base is hit the same way), ``MoLoraLayer.update_layer`` lets PEFT's
# ``_move_adapter_to_device_of_base_layer`` cast molora_A / molora_B to bf16. ``PeftModel.__init__`` then runs
# ``_cast_adapter_dtype`` *after* ``inject_adapter`` froze the adapter (inference_mode), and that upcast reassigns
# each ParameterDict entry (``pdict[name] = p.to(torch.float32)``), which ``nn.ParameterDict`` wraps in a fresh
# ``nn.Parameter`` with requires_grad=True. The routers are unaffected (modules, ``.float()``-ed in place).
@pytest.mark.parametrize(
    "kind",
    [
        "nf4-fp32",
        "nf4-bf16",
        "int8",
    ],
)
def test_adapter_loaded_for_inference_is_frozen(llama_dir, tmp_path, kind):
    """Regression: on a bf16-compute base, PEFT's fp32 upcast re-wrapped molora_A/B as new trainable Parameters."""
    model = get_peft_model(
        load_quantized(llama_dir, kind), MoLoraConfig(num_experts=2, top_k=1, task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_quantized(llama_dir, kind), tmp_path)  # is_trainable=False by default
    assert loaded.peft_config["default"].inference_mode
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "molora_" in n)
    assert sorted(trainable(loaded)) == []

    trainable_again = PeftModel.from_pretrained(load_quantized(llama_dir, kind), tmp_path, is_trainable=True)
    names = trainable(trainable_again)
    assert names and all("molora_" in n for n in names)
    assert len(names) == 3 * len(molora_layers(trainable_again))
