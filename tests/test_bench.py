"""``molora.bench``: the peak-memory tracker, the paired ratios, and a smoke run of ``main(["--quick"])``.

Nothing here asserts on wall time: the quick run only has to produce a complete table whose ratios are consistent.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from molora import bench


def test_peak_tensor_memory_counts_live_storages():
    a = torch.ones(256, 1024)  # exists before tracking: not counted
    with bench.PeakTensorMemory() as tracker:
        b = a * 2  # 1 MiB
        c = b.view(-1)  # a view shares b's storage: no new bytes
        del b, c
        d = torch.cat([a, a])  # 2 MiB, after the 1 MiB tensor was freed
        assert tracker.current == 2 * 2**20
        e = d + 1  # 2 MiB more while d is alive
        del d, e
    assert tracker.peak == 4 * 2**20
    assert tracker.current == 0


def test_peak_tensor_memory_does_not_count_views_of_existing_tensors():
    weight = torch.randn(512, 512)  # a parameter, say: exists before tracking
    x = torch.ones(8, 512)
    with bench.PeakTensorMemory() as tracker:
        transposed = weight.t()  # what F.linear does with the weight: a view, no new bytes
        rows = weight[:16]
        weight.mul_(1.0)  # in place: no new bytes either
        y = x @ transposed  # 16 KiB
        del transposed, rows
        assert tracker.current == y.numel() * 4
    assert tracker.peak == y.numel() * 4


def test_resident_bytes_count_each_storage_once_with_the_optimizer_state():
    model = torch.nn.Linear(64, 32)
    model.register_buffer("tied", model.weight[:4])  # a view: its storage is the weight's
    params = (64 * 32 + 32) * 4
    assert bench._resident_bytes(model) == params
    optimizer = torch.optim.AdamW(model.parameters())
    assert bench._resident_bytes(model, optimizer) == params  # no state before the first step
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    # exp_avg and exp_avg_sq per parameter, plus one 4-byte step counter per parameter
    assert bench._resident_bytes(model, optimizer) == 3 * params + 2 * 4


def test_peak_tensor_memory_sees_backward():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(64, 512)
    with bench.PeakTensorMemory() as tracker:
        (x @ w).sum().backward()
    # the weight gradient (1 MiB) alone is already more than the forward output (128 KiB)
    assert tracker.peak >= w.numel() * 4


def test_paired_ratio_cancels_drift():
    reference = [10.0, 20.0, 40.0, 80.0]  # the machine slows down during the run
    candidate = [11.0, 22.0, 44.0, 88.0]
    assert abs(bench._paired_ratio(candidate, reference) - 1.1) < 1e-12


def test_quick_run_prints_a_complete_table(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1", "--json", str(out_json)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| layer |" in printed and "| train step |" in printed
    table = json.loads(out_json.read_text())
    rows = table["rows"]
    layer = [r for r in rows if r["section"] == "layer"]
    # the headline shape with an input that requires grad, then with a frozen one
    shapes = ["d=128 T=32 E=8 k=2 r=8", "d=128 T=32 E=8 k=2 r=8 frozen x"]
    assert [r["shape"] for r in layer] == [shape for shape in shapes for _ in range(6)]
    assert [r["candidate"] for r in layer] == 2 * [
        "lora r=16",
        "lora r=64 (bank width)",
        "molora auto",
        "molora dense",
        "molora grouped",
        "naive",
    ]
    assert {r["candidate"] for r in rows if r["section"] == "train step"} == {"lora r=16", "molora auto", "naive"}
    assert {r["candidate"] for r in rows if r["section"] == "generate"} == {"lora r=16", "molora auto", "naive"}
    assert "| generate | llama d=64 L=2 2x8+8 E=8 k=2 r=8 |" in printed
    for row in rows:
        assert row["time_ms"] > 0 and row["peak_mb"] > row["step_mb"] > 0  # the peak adds the weights held
        assert row["vs_lora"] > 0 and row["vs_naive"] > 0 and row["mem_vs_lora"] > 0 and row["step_mem_vs_lora"] > 0
        if row["candidate"] == "lora r=16":  # the reference
            assert row["vs_lora"] == 1.0 and row["mem_vs_lora"] == 1.0 and row["step_mem_vs_lora"] == 1.0
        if row["candidate"] == "molora auto":
            assert row["kernel"] in ("dense", "grouped")
    assert table["threads"] == 1


@pytest.mark.slow  # a minute or more on 2 cores; test_quick_run_prints_a_complete_table runs the bench by default
def test_molora_bench_command_runs():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "molora", "bench", "--quick", "--no-model", "--no-extra-shapes"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora r=16" in proc.stdout and "molora" in proc.stdout and "naive" in proc.stdout
    assert "| generate |" in proc.stdout and "| train step |" not in proc.stdout


def test_generate_benchmark_makes_the_same_number_of_tokens_for_every_candidate(monkeypatch):
    # the ratio compares like with like only if no candidate stops early at an end-of-sequence token
    from transformers import GenerationMixin

    lengths = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        # make each prompt's first greedy token an end-of-sequence token: without min_new_tokens, generation would
        # stop right after it
        probe_kwargs = {k: v for k, v in kwargs.items() if k != "min_new_tokens"}
        probe = original(self, *args, **{**probe_kwargs, "max_new_tokens": 1})
        out = original(self, *args, eos_token_id=probe[:, -1].tolist(), **kwargs)
        lengths.append(out.shape[-1])
        return out

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    rows = bench.bench_generate(32, 1, 2, 4, 6, 4, 4, 2, ["lora r·k", "molora auto", "naive"], 0, 2)
    assert [r.section for r in rows] == ["generate"] * 3
    assert lengths and set(lengths) == {4 + 6}
    assert all(r.time_ms > 0 and r.vs_lora > 0 for r in rows)
    assert next(r for r in rows if r.candidate == "molora auto").kernel == "dense"


@pytest.mark.slow  # the Triton interpreter: ~30 s
def test_bench_triton_script_smoke_under_the_interpreter(tmp_path):
    """``scripts/bench_triton.py`` (the GPU benchmark) runs end to end on tiny shapes under TRITON_INTERPRET=1."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_triton.py"
    out = tmp_path / "triton.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if "candidate" in r]
    assert {r["candidate"] for r in rows} == {"triton", "dense", "grouped", "lora r*k", "base gemm"}
    checks = [r["value"] for r in result["rows"] if "check" in r]
    assert checks and max(checks) < 1e-4  # the Triton delta matches the dense path (fp32 in the interpreter)
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_x_floor"] > 0


def test_bad_device_and_dtype_are_clear_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--device", "tpu"])
    assert exc.value.code == 2
    assert "`device`='tpu' is not supported; allowed values: 'cpu', 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--dtype", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`dtype`='int8' is not supported"):
        bench.run_benchmarks(quick=True, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            bench.run_benchmarks(quick=True, device="cuda")


@pytest.mark.parametrize(
    "flag, value, name, minimum",
    [
        ("--repeats", "0", "repeats", 1),
        ("--width", "0", "width", 1),
        ("--gen-width", "-5", "gen_width", 1),
        ("--warmup", "-1", "warmup", 0),
        ("--threads", "0", "threads", 1),
        ("--seq", "0", "seq", 1),
    ],
)
def test_out_of_range_settings_are_clear_errors(capsys, flag, value, name, minimum):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"`{name}`={value} is out of range; allowed values: whole numbers >= {minimum}." in err
    with pytest.raises(ValueError, match=f"`{name}`={value} is out of range"):
        bench.run_benchmarks(quick=True, **{name: int(value)})


def test_amp_runs_fp32_adapters_on_a_bf16_base_under_autocast(monkeypatch, capsys):
    """``--amp``: what a trainer's ``bf16=True`` runs (a bf16 base, fp32 adapters as PEFT keeps them, autocast)."""
    seen = []
    adapt = bench._adapt

    def spy(model, config):
        adapted = adapt(model, config)
        trainable = {p.dtype for p in adapted.parameters() if p.requires_grad}
        frozen = {p.dtype for p in adapted.parameters() if not p.requires_grad}
        seen.append((trainable, frozen))
        return adapted

    monkeypatch.setattr(bench, "_adapt", spy)
    autocast_dtypes = []
    project = torch.nn.Linear.forward

    def linear(self, x):
        autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return project(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", linear)
    assert bench.main(["--quick", "--dtype", "bfloat16", "--amp", "--no-generate", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 (amp: fp32 adapters, autocast)" in out and "| train step |" in out
    assert seen and all(t == {torch.float32} and f == {torch.bfloat16} for t, f in seen)
    assert autocast_dtypes and set(autocast_dtypes) == {torch.bfloat16}  # every base projection ran under autocast
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--amp"])
    assert exc.value.code == 2 and "--amp needs --dtype bfloat16 or float16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`amp` needs a 16-bit `dtype`"):
        bench.run_benchmarks(quick=True, amp=True)


def test_train_step_optimizer_is_the_trainers_default_fused_adamw():
    # transformers.Trainer (and TRL's SFTTrainer) default to optim="adamw_torch_fused"; the bench times the same.
    param = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = bench._adamw([param])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(param, before)


@pytest.mark.slow  # ~40 s: compiles two training steps and two generations
def test_compile_option_times_compiled_lora_and_molora(monkeypatch, capsys):
    # `molora bench --compile`: compiled copies of LoRA and MoLoRA in the training step (the whole PeftModel) and in
    # the generation (the base model's forward, as transformers documents it), each compared with the compiled LoRA,
    # without memory columns (the tracking mode cannot see inside compiled code); the compiled models really are
    # torch.compile'd (counted here), and the compiled generation makes the same tokens as the eager one
    compiled = []
    original = torch.compile

    def spy(target, *args, **kwargs):
        compiled.append(type(getattr(target, "__self__", target)).__name__)
        return original(target, *args, backend="eager")  # Dynamo's tracing without code generation: seconds

    generated = {}
    generate = LlamaForCausalLM.generate

    def record(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        generated.setdefault(kwargs.get("cache_implementation"), []).append(out)
        return out

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(LlamaForCausalLM, "generate", record)
    assert bench.main(["--quick", "--compile", "--no-extra-shapes", "--repeats", "1"]) == 0
    assert compiled == ["PeftModel", "PeftModel", "LlamaForCausalLM", "LlamaForCausalLM"]
    lines = capsys.readouterr().out.splitlines()
    for section in ("train step", "generate"):
        rows = {line.split("|")[3].strip(): line for line in lines if line.startswith(f"| {section}")}
        assert set(rows) == {
            "lora r=16",
            "molora auto → dense",
            "naive",
            "lora r=16 +compile",
            "molora auto +compile → dense",
        }, section
        cells = [c.strip() for c in rows["lora r=16 +compile"].split("|")]
        assert cells[5] == "1.000" and cells[7:11] == ["", "", "", ""]  # its own reference, no memory
        cells = [c.strip() for c in rows["molora auto +compile → dense"].split("|")]
        assert float(cells[5]) > 0 and cells[7] == ""
        assert float([c.strip() for c in rows["molora auto → dense"].split("|")][7]) > 0  # eager rows keep memory
    # the compiled candidates generate with a static cache, the eager ones with the dynamic one, and the same weights
    # make the same tokens: the last static call is the compiled MoLoRA's last round, the second-to-last dynamic one
    # the eager MoLoRA's memory measurement (after LoRA's, before the naive loop's)
    assert set(generated) == {None, "static"}
    assert torch.equal(generated["static"][-1], generated[None][-2])


def test_compile_failure_is_a_clear_error(monkeypatch):
    # inductor without a C++ compiler fails at the first call: the bench names the option that caused it
    def broken(model, *args, **kwargs):
        def call(*a, **k):
            raise OSError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match=r"torch.compile failed for the 'lora r·k' training step .*--compile"):
        bench.run_benchmarks(quick=True, extra_shapes=False, generation=False, repeats=1, torch_compile=True)


def test_odd_llama_widths_are_clear_errors_and_quick_honours_width(monkeypatch, capsys):
    """An odd ``--gen-width``/``--width`` crashed inside the model's rotary embeddings (a traceback); ``--quick``
    ignored ``--width`` for the training-step benchmark."""
    for flag in ("--gen-width", "--width"):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--quick", flag, "129"])
        assert exc.value.code == 2
        assert "must be even for the Llama benchmarks" in capsys.readouterr().err
    assert bench._small_llama(258, 1, 32).config.num_attention_heads == 1  # head size 258: even
    widths = []
    monkeypatch.setattr(bench, "bench_train_step", lambda width, *args, **kwargs: widths.append(width) or [])
    bench.run_benchmarks(quick=True, width=96, extra_shapes=False, generation=False)
    assert widths == [96]


@pytest.mark.parametrize("router", ["dynmole", "prompt", "topk_bias"])
def test_router_option_benchmarks_that_router(monkeypatch, capsys, router):
    """``--router``: every MoLoRA candidate is built with that router (the LoRA reference is not), the table names
    it, and the training step runs the per-step router update as ``MoLoraCallback`` does (the loss-free bias
    moves)."""
    from molora.routers.base import get_router_class

    built, updates = [], []
    original = bench._peft_config

    def spy(candidate, *args, **kwargs):
        config = original(candidate, *args, **kwargs)
        built.append((candidate, getattr(config, "router", None)))
        return config

    monkeypatch.setattr(bench, "_peft_config", spy)
    cls = get_router_class(router)
    original_step = cls.on_optimizer_step_group.__func__
    monkeypatch.setattr(
        cls, "on_optimizer_step_group", classmethod(lambda c, rs: (updates.append(len(rs)), original_step(c, rs)))
    )
    assert bench.main(["--quick", "--router", router, "--no-extra-shapes", "--no-generate", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert {r for c, r in built if not c.startswith("lora")} == {router}
    assert {r for c, r in built if c.startswith("lora")} == {None}
    rows = [line for line in table.splitlines() if line.startswith("| layer") or line.startswith("| train step")]
    assert rows and all(f"router={router}" in line for line in rows)
    if router == "topk_bias":
        assert updates  # the bias update ran in the MoLoRA training steps
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--router", "topK"])
    assert "Did you mean 'topk'?" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a registered router"):
        bench.run_benchmarks(quick=True, router="nope")


@pytest.mark.parametrize("input_grad", [True, False])
def test_layer_benchmark_input_requires_grad_or_not(monkeypatch, input_grad):
    """The layer benchmark's input requires grad (an adapted layer inside a network: the backward computes the input's
    gradient) or, for the ``frozen x`` row, does not (the first adapted layers of a frozen model)."""
    seen = []
    original = bench._OneProjection.forward

    def spy(self, x):
        seen.append(x.requires_grad)
        return original(self, x)

    monkeypatch.setattr(bench._OneProjection, "forward", spy)
    rows = bench.bench_layer(32, 8, 2, 4, 2, ["lora r·k", "molora auto"], 1, 1, input_grad=input_grad)
    assert seen and set(seen) == {input_grad}
    assert [r.shape.endswith(" frozen x") for r in rows] == [not input_grad] * 2
