"""``molora sft`` under ``accelerate launch`` with 2 CPU processes (DDP over gloo): it trains, and the routing
statistics it logs and saves are those of the global batch (reduced over both processes), not of one shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="needs accelerate")
def test_two_process_cpu_ddp_reduces_routing_stats(tmp_path):
    make_llama(vocab_size=CHAR_VOCAB, max_position_embeddings=256).save_pretrained(tmp_path / "model")
    make_char_tokenizer().save_pretrained(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": f"the {['red', 'blue'][i % 2]} fox {i % 5} jumps."}) + "\n")
    recipe = {
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "adapter": {"r": 4, "num_experts": 4, "top_k": 2},
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "logging_steps": 2,
            "save_strategy": "no",
            "max_length": 48,
            "seed": 0,
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    launcher = [str(ACCELERATE)] if ACCELERATE.exists() else ["accelerate"]
    # --multi_gpu selects torch.distributed's launcher; with no GPU, accelerate runs each process on the CPU (gloo)
    cmd = launcher + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision"]
    cmd += ["no", "--dynamo_backend", "no", "-m", "molora.cli", "sft", "--config", str(tmp_path / "recipe.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "molora_results.json").read_text())
    assert results["global_step"] == 4 and results["losses"][-1] < results["losses"][0]
    history = [json.loads(line) for line in (out / "routing_stats_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]  # written once (by the main process) per logging step
    # the trainer's token count is gathered over both processes; the reduced routing statistics must match it,
    # where rank 0's own statistics would hold about half
    stats = json.loads((out / "routing_stats.json").read_text())
    tokens = {layer["tokens"] for layer in stats.values()}
    num_tokens = [h for h in results["log_history"] if "num_tokens" in h][-1]["num_tokens"]
    assert tokens == {int(num_tokens)}


#: the end of every two-process script, once its results are saved and it left the process group: the interpreter's
#: own teardown is skipped. A process aborted in it ("terminate called without an active exception", SIGABRT) in CI
#: runs under load, after both ranks had written their results and destroyed the group: torch's teardown at exit,
#: not what these tests check (seen in three of ~40 CI runs, in two of the tests, on rank 0 and rank 1)
_EXIT = """
import os as _os, sys as _sys
_sys.stdout.flush()
_sys.stderr.flush()
_os._exit(0)
"""


def _launch_two_processes(script: Path, template: str, out: str) -> None:
    """Run ``template`` (formatted with the tests folder and ``out``) as a script on two CPU processes (gloo)."""
    script.write_text(template.format(tests=str(Path(__file__).parent), out=out) + _EXIT)
    launcher = [str(ACCELERATE)] if ACCELERATE.exists() else ["accelerate"]
    cmd = launcher + ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision"]
    cmd += ["no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


BIAS_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from peft import get_peft_model
sys.path.insert(0, {tests!r})
from conftest import make_llama
import molora

accelerator = Accelerator(cpu=True)
model = get_peft_model(make_llama(), molora.MoLoraConfig(
    r=4, num_experts=4, top_k=1, router="topk_bias", aux_loss_coef=0.0, router_kwargs={{"bias_update_rate": 0.01}}))
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model, optimizer = accelerator.prepare(model, optimizer)
rank = accelerator.process_index
for step in range(3):
    # each process sees different tokens, so its own loads (and a non-reduced bias update) differ
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(3, 90, (2, 12), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.unwrap_model(model).molora_on_optimizer_step()
biases = {{n: b.clone() for n, b in accelerator.unwrap_model(model).named_buffers() if n.endswith("selection_bias")}}
torch.save(biases, {out!r}.format(rank))
accelerator.end_training()  # leaves the process group before exit (gloo torn down at exit can abort)
"""


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="needs accelerate")
def test_two_process_cpu_ddp_keeps_balancing_biases_identical(tmp_path):
    import torch

    _launch_two_processes(tmp_path / "bias.py", BIAS_SCRIPT, str(tmp_path / "bias{}.pt"))
    rank0, rank1 = torch.load(tmp_path / "bias0.pt"), torch.load(tmp_path / "bias1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) == 14
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # loads were summed over both processes
    assert any(b.abs().sum() > 0 for b in rank0.values())  # and the biases did move


AUX_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {tests!r})
from conftest import make_llama
import molora

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(100 + rank))  # different data per process

def model():
    config = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    return get_peft_model(make_llama(), config).train()  # B = 0: the routers' gradient is the aux gradient alone

def backward(net, source):
    out = net(input_ids=ids, labels=ids)  # outputs.loss exists (with the aux term) in both cases
    if source == "logits":  # a trainer that computes its own loss (TRL's SFTTrainer)
        logits = out.logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    else:
        out.loss.backward()

def router_grads(net):
    return torch.cat([p.grad.flatten() for n, p in net.named_parameters() if "molora_router" in n])

results = {{}}
for source in ("logits", "loss"):
    reference = model()
    backward(reference, source)
    expected = router_grads(reference)
    dist.all_reduce(expected)
    for unused in (False, True):
        net = model()
        backward(DistributedDataParallel(net, find_unused_parameters=unused), source)
        results[source, unused] = (router_grads(net), expected / world)
torch.save(results, {out!r}.format(rank))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="needs accelerate")
def test_two_process_ddp_delivers_the_aux_gradient_with_unused_outputs(tmp_path):
    """DDP with ``find_unused_parameters`` (what transformers picks for a PeftModel) hands an unused
    ``outputs.loss`` no gradient; the aux gradient must then come from the layers (it was dropped: zero router
    gradients under TRL's SFTTrainer). Every case equals the process-averaged gradient of an unwrapped model."""
    import torch

    _launch_two_processes(tmp_path / "aux.py", AUX_SCRIPT, str(tmp_path / "aux{}.pt"))
    for rank in (0, 1):
        results = torch.load(tmp_path / f"aux{rank}.pt")
        assert len(results) == 4
        for case, (got, expected) in results.items():
            assert expected.abs().max() > 1e-5
            torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5, msg=str(case))


MODULE_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from peft import get_peft_model
sys.path.insert(0, {tests!r})
from conftest import make_llama
import molora

accelerator = Accelerator(cpu=True)
config = molora.MoLoraConfig(r=4, num_experts=1, top_k=3, router="prompt", router_kwargs={{"milora_mode": "module"}})
model = get_peft_model(make_llama(), config)
start = {{n: p.detach().clone() for n, p in model.named_parameters() if "molora_milora" in n}}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
for step in range(3):
    gen = torch.Generator().manual_seed(100 * step + accelerator.process_index)  # different data per process
    ids = torch.randint(3, 90, (2, 12), generator=gen)
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    optimizer.zero_grad()
routers = {{n: p.detach() for n, p in accelerator.unwrap_model(model).named_parameters() if "molora_milora" in n}}
torch.save((start, routers), {out!r}.format(accelerator.process_index))
accelerator.end_training()
"""


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="needs accelerate")
def test_two_process_cpu_ddp_trains_milora_module_mode_routers_in_sync(tmp_path):
    # the decoder-layer routers of MiLoRA's module mode live in the model: DDP averages their gradients (and every
    # module's LoRA takes part in the graph, gate 0 or not, so DDP finds no unused parameter)
    import torch

    _launch_two_processes(tmp_path / "module.py", MODULE_SCRIPT, str(tmp_path / "routers{}.pt"))
    (start, rank0), (_, rank1) = torch.load(tmp_path / "routers0.pt"), torch.load(tmp_path / "routers1.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) == 2
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert not torch.equal(rank0[name], start[name]), name  # they trained
