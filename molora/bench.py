"""Benchmarks: a MoLoRA layer and a MoLoRA training step against PEFT LoRA of the same active rank.

``python -m molora.bench`` (or ``scripts/bench.py``, or ``molora bench`` once the CLI wires it to :func:`main`)
measures, in one run and with the same thread count:

* **layer**: forward + backward of one adapted ``d x d`` projection (frozen ``nn.Linear`` base, input that requires
  grad, as inside a network; the headline shape also with a ``frozen x``, an input without grad, as the first
  adapted layers of a frozen model see it) on ``T`` tokens, for PEFT LoRA with rank ``r*k`` (the same active rank;
  the reference of every ratio), PEFT LoRA with rank ``E*r`` (as wide as the expert bank: what the dense path
  multiplies), MoLoRA on each compute path (``auto``, ``dense``, ``grouped``) and the naive per-expert loop
  (``kernel="naive"``);
* **train step**: forward with labels, backward and an AdamW step (fused, ``transformers.Trainer``'s default) on a
  small random Llama whose projections are all adapted, for the same candidates (MoLoRA with its defaults: top-k
  router, balance loss, routing statistics; then ``molora_on_optimizer_step()``, as ``MoLoraCallback`` calls it);
* **generate**: greedy ``generate`` with the KV cache (a prefill, then one decode step per new token, always the same
  number of tokens) on a small random Llama whose projections are all adapted, by default 256 wide: a decode step
  has a few tokens per layer, so MoLoRA's per-layer work (router, gating, statistics) shows there more than anywhere.

``--router NAME`` gives the MoLoRA candidates another router (its default ``router_kwargs``); the LoRA reference
keeps the rank ``r*k`` of the adapter's nominal ``top_k``, which a router with a variable number of experts per token
(``topp``, ``dynmole``, ...) does not hold to.

With ``--compile`` the training step and the generation also run ``torch.compile``-d copies of PEFT LoRA and MoLoRA
(candidates ``... +compile``, compiled during their warm-up; their ratio is against the compiled LoRA, and their
memory is not measured: the tracking mode does not see inside compiled code). The compiled training step compiles the
whole ``PeftModel``; the compiled generation compiles the base model's ``forward`` and uses a static KV cache.

Timing: every candidate is built once, warmed up, then the candidates run interleaved (one call each per round, so
that drift in the machine's speed hits all of them alike) and each gets the median over the rounds. A ratio is the
median over rounds of (candidate time / reference time in the same round), the reference being PEFT LoRA or the
naive loop: on a shared machine whose speed drifts, per-round ratios are far steadier than ratios of medians.

Peak memory, two numbers per candidate: **step** is the largest number of bytes held by tensors allocated during
one step (activations kept for backward, temporaries, gradients), tracked per tensor storage by
:class:`PeakTensorMemory` (a ``TorchDispatchMode`` that sees every operator output, forward and backward, and a weak
reference per storage that tells when it is freed); **peak** adds what the model holds through the step (parameters,
buffers, optimizer state: the distinct storages, counted once), i.e. what ``torch.cuda.max_memory_allocated`` would
report without the allocator's caching. This works on a CPU, where that function is not available. It is measured
in a separate call from the timing (the mode slows the call down).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# -- results ---------------------------------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """One measured candidate.

    Attributes:
        section (str): ``"layer"``, ``"train step"`` or ``"generate"``.
        shape (str): what was measured, e.g. ``"d=2048 T=512 E=8 k=2 r=8"``.
        candidate (str): ``"lora r=16"`` (the reference), ``"lora r=64 (bank width)"``, ``"molora auto"``,
            ``"molora dense"``, ``"molora grouped"`` or ``"naive"``.
        time_ms (float): median forward + backward (+ optimizer step) time, or of one ``generate`` call, in
            milliseconds.
        peak_mb (float): peak memory of one step in MiB, the model's parameters, buffers and optimizer state
            included (see the module docstring).
        vs_lora (float or None): time over the LoRA row's: the median over rounds of the per-round ratio.
        vs_naive (float or None): time over the naive row's, the same way.
        mem_vs_lora (float or None): ``peak_mb`` over the LoRA row's.
        kernel (str): the path ``kernel="auto"`` picked (MoLoRA rows), else ``""``.
        step_mb (float): peak of the tensors the step itself allocates (activations, temporaries, gradients), MiB.
        step_mem_vs_lora (float or None): ``step_mb`` over the LoRA row's.
    """

    section: str
    shape: str
    candidate: str
    time_ms: float
    peak_mb: float | None = None
    vs_lora: float | None = None
    vs_naive: float | None = None
    mem_vs_lora: float | None = None
    kernel: str = ""
    step_mb: float | None = None
    step_mem_vs_lora: float | None = None


@dataclass
class BenchTable:
    """All rows of one run plus the settings they were measured with."""

    rows: list[BenchRow] = field(default_factory=list)
    threads: int = 1
    repeats: int = 0
    warmup: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    amp: bool = False
    router: str = "topk"
    torch_version: str = torch.__version__

    def to_dict(self) -> dict:
        return asdict(self)


# -- measuring -------------------------------------------------------------------------------------------------------


class PeakTensorMemory(TorchDispatchMode):
    """Track the bytes held by tensor storages created while the mode is active; ``peak`` is the maximum.

    Every operator output (forward and backward, gradients included) is counted once per storage, from its
    creation until the storage is freed (a weak reference to the storage tells when). Tensors that existed before
    the mode was entered (parameters, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: it allocates nothing (and a view of a parameter,
        # such as the transposed weight inside ``F.linear``, must not count the parameter)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue
            nbytes = storage.nbytes()
            self.live[key] = (weakref.ref(storage, lambda _ref, key=key: self._free(key)), nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _peak_bytes(step: Callable[[], None]) -> float:
    gc.collect()
    with PeakTensorMemory() as tracker:
        step()
    return float(tracker.peak)


def _resident_bytes(*owners: nn.Module | torch.optim.Optimizer) -> float:
    """Bytes of the distinct tensor storages the modules (parameters, buffers) and optimizers (state) hold."""
    storages: dict[int, int] = {}
    for owner in owners:
        if isinstance(owner, torch.optim.Optimizer):
            tensors = [v for state in owner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        else:
            tensors = [*owner.parameters(), *owner.buffers()]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
    return float(sum(storages.values()))


def _time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per candidate, the wall time (ms) of each round; the candidates alternate within every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        # rotate the order so that no candidate always runs right after the same other one
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync()
            start = time.perf_counter()
            steps[name]()
            _sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _sync() -> None:
    # CUDA kernels run asynchronously: wait for them so that a round times the work, not the launches
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _paired_ratio(times: list[float], reference: list[float]) -> float:
    # the median of per-round ratios: both calls of a round ran within a second of each other, so a machine whose
    # speed drifts (shared cores, frequency scaling) moves both and the ratio stays put
    return statistics.median(t / r for t, r in zip(times, reference))


def _make_rows(
    section: str,
    shape: str,
    times: dict[str, list[float]],
    peaks: dict[str, float],
    kernels,
    resident: dict[str, float],
) -> list:
    """Rows from the per-round times, the step's peak tensor bytes and the bytes held through it (per candidate)."""
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        # a compiled candidate is compared with the compiled LoRA, the others with eager LoRA
        lora = "lora r·k" + COMPILED if name.endswith(COMPILED) else "lora r·k"
        lora = lora if lora in times else None
        row = BenchRow(section, shape, name, median, kernel=kernels.get(name, ""))
        if lora is not None:
            row.vs_lora = _paired_ratio(values, times[lora])
        if name in peaks:  # not for compiled candidates
            total = peaks[name] + resident[name]
            row.peak_mb, row.step_mb = total / 2**20, peaks[name] / 2**20
            if lora is not None:
                lora_total = peaks[lora] + resident[lora]
                row.mem_vs_lora = total / lora_total if lora_total else None
                row.step_mem_vs_lora = peaks[name] / peaks[lora] if peaks[lora] else None
        if "naive" in times:
            row.vs_naive = _paired_ratio(values, times["naive"])
        rows.append(row)
    return rows


def _measured_rows(section, shape, steps, times, models, auto_tokens, optimizers=None) -> list:
    """The rows of one benchmark: memory measured per candidate after the timing (``optimizers``: their state counts
    as held by the model), the path ``auto`` picks for ``auto_tokens`` tokens."""
    # the memory-tracking mode does not see the allocations inside compiled code: compiled candidates are not measured
    measured = [name for name in steps if not name.endswith(COMPILED)]
    peaks = {name: _peak_bytes(steps[name]) for name in measured}
    held = {name: _resident_bytes(models[name], *([optimizers[name]] if optimizers else [])) for name in measured}
    kernels = {
        name: _auto_kernel(models[name], auto_tokens) for name in steps if name.removesuffix(COMPILED) == "molora auto"
    }
    return _make_rows(section, shape, times, peaks, kernels, held)


# -- candidates ------------------------------------------------------------------------------------------------------


class _OneProjection(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_config(candidate: str, rank: int, num_experts: int, top_k: int, targets, router: str = "topk"):
    from peft import LoraConfig

    from .config import MoLoraConfig

    if candidate.startswith("lora"):
        # "lora r·k": the same active rank as the MoLoRA candidates (the reference); "lora r·E": as wide as the whole
        # expert bank, i.e. what the dense path computes (tells the bank's width apart from MoLoRA's own overhead)
        width = rank * (num_experts if candidate == "lora r·E" else top_k)
        return LoraConfig(r=width, lora_alpha=2 * width, target_modules=targets)
    kernel = "naive" if candidate == "naive" else candidate.split()[-1]
    return MoLoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        num_experts=num_experts,
        top_k=top_k,
        target_modules=targets,
        kernel=kernel,
        router=router,
    )


def _router_suffix(router: str) -> str:
    # the shape column names a router other than the default
    return "" if router == "topk" else f" router={router}"


def _adapt(model: nn.Module, config) -> nn.Module:
    from peft import get_peft_model

    model = get_peft_model(model, config)
    # a trained adapter: LoRA B (and every expert's B) away from zero, as after some steps
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "molora_B" in name):
                param.normal_(0.0, 0.02)
    return model


def _build(model: nn.Module, config, device: str, dtype: torch.dtype, amp: bool) -> nn.Module:
    """``model`` adapted with ``config`` on ``device``: everything in ``dtype``, or with ``amp`` the base model in
    ``dtype`` and the adapter in fp32, as PEFT keeps it on a low-precision base (``autocast_adapter_dtype``)."""
    if amp:
        return _adapt(model.to(device, dtype), config).to(device)
    return _adapt(model, config).to(device, dtype)


def _autocast(device: str, dtype: torch.dtype, amp: bool):
    """``torch.autocast`` in ``dtype`` with ``amp`` (a trainer's ``bf16=True``/``fp16=True``), else no context."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if amp else contextlib.nullcontext()


def _auto_kernel(model: nn.Module, tokens: int) -> str:
    """The path ``kernel="auto"`` takes in the model's first adapted layer for a call of ``tokens`` tokens."""
    from .adapters.layer import MoLoraLayer

    for module in model.modules():
        if isinstance(module, MoLoraLayer) and getattr(module, "molora_A", None):
            name = next(iter(module.molora_A))
            return module._resolve_kernel(tokens, name, "auto", module.molora_A[name].weight.device)
    return ""


def bench_layer(
    width: int,
    tokens: int,
    rank: int,
    num_experts: int,
    top_k: int,
    candidates,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    amp: bool = False,
    router: str = "topk",
    input_grad: bool = True,
) -> list[BenchRow]:
    """Forward + backward of one adapted ``width x width`` projection on ``tokens`` tokens, per candidate (``amp``: see
    :func:`run_benchmarks`). ``input_grad``: the input requires grad, as for every adapted layer after the first in a
    network, so the backward computes the input's gradient too; ``False``: it does not, as for the first adapted layers
    of a frozen model (layer 0's ``q_proj``, ``k_proj``, ``v_proj``), and the base projection costs only its forward.
    """
    from .routers.base import get_router_class

    gen = torch.Generator().manual_seed(0)
    # one sequence of `tokens` tokens for a router that routes whole sequences (the prompt router), else flat tokens
    lead = (1, tokens) if get_router_class(router).uses_context else (tokens,)
    x = torch.randn(*lead, width, generator=gen).to(device, dtype)
    upstream = torch.randn(*lead, width, generator=gen).to(device, dtype)
    steps, models = {}, {}
    for candidate in candidates:
        torch.manual_seed(0)
        config = _peft_config(candidate, rank, num_experts, top_k, ["proj"], router)
        model = _build(_OneProjection(width), config, device, dtype, amp).train()
        models[candidate] = model
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, params=params) -> None:
            for p in params:
                p.grad = None
            inp = x.detach().requires_grad_(input_grad)
            with _autocast(device, dtype, amp):
                out = model(inp)
            (out * upstream).sum().backward()

        steps[candidate] = step
    times = _time_interleaved(steps, warmup, repeats)
    frozen = "" if input_grad else FROZEN_INPUT
    shape = f"d={width} T={tokens} E={num_experts} k={top_k} r={rank}{frozen}{_router_suffix(router)}"
    return _measured_rows("layer", shape, steps, times, models, tokens)


def _llama_targets() -> list[str]:
    """All seven attention and MLP projections of a Llama: molora's default targets for it."""
    from .model import MOLORA_TARGET_MODULES

    return list(MOLORA_TARGET_MODULES["llama"])


def _small_llama(width: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # heads of 128 (fewer for a width they do not divide): rotary embeddings need an even head size
    heads = next(h for h in range(max(1, width // 128), 0, -1) if width % h == 0 and (width // h) % 2 == 0)
    kv_heads = next(h for h in range(min(heads, max(1, width // 512)), 0, -1) if heads % h == 0)
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config)


def _adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as ``transformers.Trainer`` and TRL's ``SFTTrainer`` build it by default (``optim="adamw_torch_fused"``).

    The fused implementation updates every parameter in one kernel per dtype and device; the default one (a loop
    over the tensors on a CPU, ``foreach`` on CUDA) makes about ten elementwise passes over each parameter and its
    states, which on a CPU costs ~4x more per parameter. Falls back to the default where the fused one is not
    available (it raises at construction there).
    """
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4)


def bench_train_step(
    width: int,
    layers: int,
    batch: int,
    seq: int,
    rank: int,
    num_experts: int,
    top_k: int,
    candidates,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    amp: bool = False,
    router: str = "topk",
) -> list[BenchRow]:
    """One training step (forward with labels, backward, AdamW) of a small random Llama, per candidate (``amp``: see
    :func:`run_benchmarks`).

    A candidate named ``"<candidate> +compile"`` runs ``torch.compile(model)`` (inductor's default mode), compiled by
    two extra warm-up calls (the first compiles, the second runs with the optimizer state in place)."""
    vocab = 512
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    targets = _llama_targets()
    steps, models, optimizers = {}, {}, {}
    for candidate in candidates:
        base_candidate = candidate.removesuffix(COMPILED)
        config = _peft_config(base_candidate, rank, num_experts, top_k, targets, router)
        model = _build(_small_llama(width, layers, vocab), config, device, dtype, amp).train()
        models[candidate] = model
        optimizer = optimizers[candidate] = _adamw([p for p in model.parameters() if p.requires_grad])
        forward = torch.compile(model) if candidate.endswith(COMPILED) else model

        # MoLoRA's per-step router update (the loss-free bias, ReMoE's sparsity), as MoLoraCallback runs it
        on_step = getattr(model, "molora_on_optimizer_step", None)

        def step(forward=forward, optimizer=optimizer, on_step=on_step) -> None:
            with _autocast(device, dtype, amp):
                out = forward(input_ids=input_ids, labels=input_ids)
            out.loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
            optimizer.zero_grad(set_to_none=True)

        if candidate.endswith(COMPILED):
            _compile_by_calling(step, f"the {base_candidate!r} training step")
        steps[candidate] = step
    times = _time_interleaved(steps, warmup, repeats)
    shape = f"llama d={width} L={layers} T={batch}x{seq} E={num_experts} k={top_k} r={rank}{_router_suffix(router)}"
    # after the warm-up and timed steps: AdamW's state exists
    return _measured_rows("train step", shape, steps, times, models, batch * seq, optimizers)


def _compile_by_calling(step: Callable[[], None], what: str) -> None:
    """Run a compiled candidate's ``step`` twice (the first call compiles; the second runs with what the first left,
    e.g. the optimizer state); a backend failure is a ``RuntimeError`` naming the option that asked for it."""
    try:
        for _ in range(2):
            step()
    except Exception as error:  # noqa: BLE001 - whatever the backend raised, say which option caused it
        raise RuntimeError(
            f"torch.compile failed for {what} ({type(error).__name__}: {error}); inductor on a CPU needs a working "
            "C++ compiler. Run without --compile (torch_compile=False)."
        ) from error


def bench_generate(
    width: int,
    layers: int,
    batch: int,
    prompt: int,
    new_tokens: int,
    rank: int,
    num_experts: int,
    top_k: int,
    candidates,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    amp: bool = False,
    router: str = "topk",
) -> list[BenchRow]:
    """Greedy generation of exactly ``new_tokens`` tokens for ``batch`` prompts of ``prompt`` tokens (KV cache on) with
    a small random Llama, per candidate (models in eval mode, no gradient, as ``generate`` runs).

    A candidate named ``"<candidate> +compile"`` compiles the base model's ``forward`` (inductor's default mode), as
    transformers documents for generation, and generates with a static KV cache (fixed shapes: no recompilation as
    the sequence grows); compiled by two extra warm-up calls."""
    vocab = 512
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, vocab, (batch, prompt), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    targets = _llama_targets()
    steps, models = {}, {}
    for candidate in candidates:
        base_candidate = candidate.removesuffix(COMPILED)
        config = _peft_config(base_candidate, rank, num_experts, top_k, targets, router)
        # with `amp`, fp32 adapters on the low-precision base and no autocast: what PeftModel.from_pretrained gives
        model = _build(_small_llama(width, layers, vocab), config, device, dtype, amp).eval()
        models[candidate] = model
        compiled = candidate.endswith(COMPILED)
        if compiled:
            base = model.get_base_model()
            base.forward = torch.compile(base.forward)

        def step(model=model, cache="static" if compiled else None) -> None:
            with torch.no_grad():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,  # no early end of sequence: every candidate makes the same steps
                    do_sample=False,
                    pad_token_id=0,
                    cache_implementation=cache,
                )

        if compiled:
            _compile_by_calling(step, f"the {base_candidate!r} generation")
        steps[candidate] = step
    times = _time_interleaved(steps, warmup, repeats)
    shape = (
        f"llama d={width} L={layers} {batch}x{prompt}+{new_tokens} E={num_experts} k={top_k} r={rank}"
        f"{_router_suffix(router)}"
    )
    # the decode steps' token count, which is what the layers see most of the time
    return _measured_rows("generate", shape, steps, times, models, batch)


# -- the run ---------------------------------------------------------------------------------------------------------

#: suffix of the candidates that run ``torch.compile(model)`` (``run_benchmarks(torch_compile=True)``)
COMPILED = " +compile"

#: the ``dtype`` values :func:`run_benchmarks` accepts
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run the benchmark here, or None: only ``cpu`` and an available ``cuda`` are measured."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        return f"`device`={device!r} is not supported; allowed values: 'cpu', 'cuda' (or 'cuda:N')."
    if kind == "cuda" and not torch.cuda.is_available():
        return f"`device`={device!r} was asked for but this torch build sees no CUDA device; use --device cpu."
    return None


#: the run's whole-number settings and the smallest value each takes
SETTING_MINIMUMS = {
    "threads": 1,
    "warmup": 0,
    "repeats": 1,
    "width": 1,
    "tokens": 1,
    "batch": 1,
    "seq": 1,
    "gen_width": 1,
}


def settings_problem(**settings: int | None) -> str | None:
    """Why one of the run's whole-number settings (:data:`SETTING_MINIMUMS`; None = the default) is out of range, or
    None."""
    for name, value in settings.items():
        if value is not None and value < SETTING_MINIMUMS[name]:
            return f"`{name}`={value} is out of range; allowed values: whole numbers >= {SETTING_MINIMUMS[name]}."
    return None


def llama_width_problem(width: int | None, gen_width: int | None) -> str | None:
    """Why a width of the small-Llama benchmarks (training step: ``width``; generation: ``gen_width``; None = the
    default or not run) cannot build the model, or None: rotary embeddings need an even head size."""
    for name, value in (("width", width), ("gen_width", gen_width)):
        if value is not None and value % 2:
            return (
                f"`{name}`={value} must be even for the Llama benchmarks (rotary embeddings need an even head size)."
            )
    return None


#: what the shape column of the layer benchmark adds for an input without grad (``bench_layer(input_grad=False)``)
FROZEN_INPUT = " frozen x"

#: (E, k, r) of the layer shapes measured besides the headline E=8, k=2, r=8
EXTRA_LAYER_SHAPES = [(4, 1, 16), (16, 2, 8), (64, 2, 8), (128, 2, 8), (8, 2, 64), (16, 2, 64)]


def run_benchmarks(
    quick: bool = False,
    threads: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    width: int | None = None,
    tokens: int | None = None,
    model: bool = True,
    extra_shapes: bool = True,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch: int | None = None,
    seq: int | None = None,
    generation: bool = True,
    gen_width: int | None = None,
    torch_compile: bool = False,
    amp: bool = False,
    router: str = "topk",
) -> BenchTable:
    """Measure the layer, (unless ``model=False``) the training-step and (unless ``generation=False``) the generation
    benchmarks; return the table.

    Args:
        quick (bool): tiny shapes and few repeats (seconds; for smoke tests, the ratios mean little).
        threads (int | None): ``torch.set_num_threads`` for the whole run; None keeps torch's current setting.
        warmup (int | None): untimed calls per candidate before timing. Default 3 (1 with ``quick``).
        repeats (int | None): timed rounds. Default 15 for the layer (3 with ``quick``).
        width (int | None): projection width ``d``. Default 2048 (128 with ``quick``).
        tokens (int | None): tokens per layer call. Default 512 (32 with ``quick``).
        model (bool): also run the training-step benchmark.
        extra_shapes (bool): also run :data:`EXTRA_LAYER_SHAPES` (E, k, r) at the same width.
        progress (callable | None): called with a line of text before each benchmark.
        device (str): where models and inputs live (``"cpu"`` or ``"cuda"``); on CUDA the Triton kernels
            (``molora triton``) are measured too.
        dtype (str): ``"float32"``, ``"bfloat16"`` or ``"float16"``: models (adapters included) and inputs.
        batch (int | None): sequences per training step. Default 2.
        seq (int | None): tokens per sequence in the training step. Default 128 (16 with ``quick``).
        generation (bool): also run the generation benchmark (2 prompts of 16 tokens, 32 new tokens).
        gen_width (int | None): width of the generation benchmark's Llama. Default 256 (64 with ``quick``).
        torch_compile (bool): also time ``torch.compile``-d PEFT LoRA and MoLoRA in the training-step and generation
            benchmarks (compiling takes tens of seconds per model; needs a working inductor backend, i.e. a C++
            compiler on a CPU).
        amp (bool): mixed precision as trainers run it, for a 16-bit ``dtype``: the base model in ``dtype``, LoRA
            and MoLoRA adapters in fp32 (PEFT's ``autocast_adapter_dtype``), the layer and training steps under
            ``torch.autocast(dtype)`` (a trainer's ``bf16=True``); generation without autocast.
        router (str): the MoLoRA candidates' router, a registered name (``MoLoraConfig.router``). Default "topk".
    """
    if dtype not in DTYPES:
        raise ValueError(f"`dtype`={dtype!r} is not supported; allowed values: {list(DTYPES)}.")
    if amp and dtype == "float32":
        raise ValueError("`amp` needs a 16-bit `dtype` (bfloat16 or float16): the base model's, autocast's.")
    problem = router_problem(router)
    if problem:
        raise ValueError(problem)
    problem = device_problem(device) or settings_problem(
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        width=width,
        tokens=tokens,
        batch=batch,
        seq=seq,
        gen_width=gen_width,
    )
    if problem:
        raise ValueError(problem)
    problem = llama_width_problem(width if model else None, gen_width if generation else None)
    if problem:
        raise ValueError(problem)
    width_given = width is not None
    torch_dtype = DTYPES[dtype]
    if threads is not None:
        torch.set_num_threads(threads)
    warmup = warmup if warmup is not None else (1 if quick else 3)
    repeats = repeats if repeats is not None else (3 if quick else 15)
    width = width if width is not None else (128 if quick else 2048)
    tokens = tokens if tokens is not None else (32 if quick else 512)
    say = progress or (lambda line: None)
    table = BenchTable(
        threads=torch.get_num_threads(),
        repeats=repeats,
        warmup=warmup,
        device=device,
        dtype=dtype,
        amp=amp,
        router=router,
    )
    layer_candidates = ["lora r·k", "lora r·E", "molora auto", "molora dense", "molora grouped", "naive"]
    if torch.device(device).type == "cuda":
        layer_candidates.insert(-1, "molora triton")
    # the headline shape twice: with an input that requires grad (most layers of a network) and without (the first
    # adapted layers of a frozen model, where the adapters' share of the work is larger: no input gradient to compute)
    shapes = [(8, 2, 8, True), (8, 2, 8, False)]
    shapes += [(*shape, True) for shape in EXTRA_LAYER_SHAPES] if extra_shapes and not quick else []
    for num_experts, top_k, rank, input_grad in shapes:
        say(f"layer d={width} T={tokens} E={num_experts} k={top_k} r={rank}{'' if input_grad else FROZEN_INPUT}")
        table.rows += bench_layer(
            width,
            tokens,
            rank,
            num_experts,
            top_k,
            layer_candidates,
            warmup,
            repeats,
            device=device,
            dtype=torch_dtype,
            amp=amp,
            router=router,
            input_grad=input_grad,
        )
    # the small-Llama benchmarks: E=8, k=2, r=8 against LoRA r=16 and the naive loop, fewer rounds than the layer
    model_args = (8, 8, 2, ["lora r·k", "molora auto", "naive"], max(1, warmup - 1), max(3, repeats // 3))
    where = {"device": device, "dtype": torch_dtype, "amp": amp, "router": router}
    if model:
        m_width, m_layers, m_batch, m_seq = (64, 2, 2, 16) if quick else (width, 2, 2, 128)
        m_width = width if width_given else m_width
        m_batch = batch if batch is not None else m_batch
        m_seq = seq if seq is not None else m_seq
        compiling = " (compiling)" if torch_compile else ""
        say(f"train step llama d={m_width} L={m_layers} T={m_batch}x{m_seq}{compiling}")
        train_args = model_args
        if torch_compile:
            compiled = ["lora r·k" + COMPILED, "molora auto" + COMPILED]
            train_args = (*model_args[:3], [*model_args[3], *compiled], *model_args[4:])
        table.rows += bench_train_step(m_width, m_layers, m_batch, m_seq, *train_args, **where)
    if generation:
        g_width = gen_width if gen_width is not None else (64 if quick else 256)
        g_prompt, g_new = (8, 8) if quick else (16, 32)
        say(f"generate llama d={g_width} L=2 2x{g_prompt}+{g_new}{' (compiling)' if torch_compile else ''}")
        gen_args = model_args
        if torch_compile:
            compiled = ["lora r·k" + COMPILED, "molora auto" + COMPILED]
            gen_args = (*model_args[:3], [*model_args[3], *compiled], *model_args[4:])
        table.rows += bench_generate(g_width, 2, 2, g_prompt, g_new, *gen_args, **where)
    for row in table.rows:
        base, compiled_row = row.candidate.removesuffix(COMPILED), row.candidate.endswith(COMPILED)
        if base == "lora r·k":
            row.candidate = f"lora r={_rk(row.shape)}" + (COMPILED if compiled_row else "")
        elif base == "lora r·E":
            row.candidate = f"lora r={_rk(row.shape, 'E')} (bank width)"
    return table


def router_problem(router: str) -> str | None:
    """Why ``router`` cannot be benchmarked (not a registered router name), else None."""
    from .routers.base import get_router_class

    try:
        get_router_class(router)
    except ValueError as error:
        return f"--router: {error}"
    return None


def _rk(shape: str, factor: str = "k") -> int:
    parts = dict(p.split("=") for p in shape.split() if "=" in p)
    return int(parts[factor]) * int(parts["r"])


def format_table(table: BenchTable) -> str:
    """The table as GitHub markdown (what docs/kernels.md shows)."""

    def num(value: float | None, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        f"torch {table.torch_version}, device {table.device}, {table.dtype}"
        f"{' (amp: fp32 adapters, autocast)' if table.amp else ''}, {table.threads} threads, "
        f"median of {table.repeats} interleaved rounds after {table.warmup} warm-up calls",
        "",
        "| benchmark | shape | candidate | time (ms) | × LoRA | × naive | peak MiB | mem × LoRA | step MiB "
        "| step mem × LoRA |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.rows:
        candidate = r.candidate + (f" → {r.kernel}" if r.kernel else "")
        lines.append(
            f"| {r.section} | {r.shape} | {candidate} | {r.time_ms:.1f} | {num(r.vs_lora, '.3f')} | "
            f"{num(r.vs_naive, '.3f')} | {num(r.peak_mb, '.1f')} | {num(r.mem_vs_lora, '.3f')} | "
            f"{num(r.step_mb, '.1f')} | {num(r.step_mem_vs_lora, '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``molora bench`` / ``python -m molora.bench``; prints the table, returns the exit code."""
    parser = argparse.ArgumentParser(prog="molora bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (smoke test)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate")
    parser.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds")
    parser.add_argument("--width", type=int, default=None, help="projection width d (default 2048)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per layer call (default 512)")
    parser.add_argument("--no-model", action="store_true", help="skip the small-Llama training-step benchmark")
    parser.add_argument("--no-extra-shapes", action="store_true", help="only the E=8, k=2, r=8 layer shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the Triton kernels)")
    parser.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="models (adapters included) and inputs"
    )
    parser.add_argument("--batch", type=int, default=None, help="sequences per training step (default 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence in the training step (default 128)")
    parser.add_argument("--no-generate", action="store_true", help="skip the small-Llama generation benchmark")
    parser.add_argument(
        "--gen-width", type=int, default=None, help="width of the generation benchmark's Llama (default 256)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile'd LoRA and MoLoRA training steps and generation (slow to compile; needs a C++ "
        "compiler on CPU)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="with a 16-bit --dtype: base in that dtype, adapters fp32 (PEFT's default), layer and training steps "
        "under torch.autocast (a trainer's bf16=True)",
    )
    parser.add_argument(
        "--router", default="topk", help="the MoLoRA candidates' router, a registered name (default topk)"
    )
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    from .cli import output_parent_problem

    args = parser.parse_args(argv)
    problem = device_problem(args.device) or settings_problem(
        **{name: getattr(args, name) for name in SETTING_MINIMUMS}
    )
    problem = problem or llama_width_problem(
        None if args.no_model else args.width, None if args.no_generate else args.gen_width
    )
    problem = problem or output_parent_problem(args.json, "--json") or router_problem(args.router)
    if not problem and args.amp and args.dtype == "float32":
        problem = "--amp needs --dtype bfloat16 or float16 (the base model's and autocast's dtype)"
    if problem:
        parser.error(problem)
    table = run_benchmarks(
        quick=args.quick,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        width=args.width,
        tokens=args.tokens,
        model=not args.no_model,
        extra_shapes=not args.no_extra_shapes,
        progress=lambda line: print(f"# {line}", flush=True),
        device=args.device,
        dtype=args.dtype,
        batch=args.batch,
        seq=args.seq,
        generation=not args.no_generate,
        gen_width=args.gen_width,
        torch_compile=args.compile,
        amp=args.amp,
        router=args.router,
    )
    print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
