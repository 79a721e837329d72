"""Quickstart: MoLoRA experts on a small random Llama, trained for a few steps, saved and reloaded.

Runs offline on a CPU in a few seconds: ``python scripts/quickstart.py``.
"""

import sys
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import molora

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    print(__doc__.strip())  # (the script takes no options)
    sys.exit(0)

llama = LlamaConfig(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def base_model():
    torch.manual_seed(0)  # the same random "pretrained" weights every time
    return LlamaForCausalLM(llama)


config = molora.MoLoraConfig(
    r=8, lora_alpha=16, num_experts=8, top_k=2, router="topk", aux_loss_coef=0.01, task_type="CAUSAL_LM"
)
model = get_peft_model(base_model(), config)
model.print_trainable_parameters()

batch = {"input_ids": torch.randint(0, 512, (4, 32))}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
for step in range(30):
    out = model(**batch, labels=batch["input_ids"])  # out.loss includes the routers' auxiliary losses
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {out.loss.item():.4f}  aux {model.molora_aux_loss().item():.5f}")

stats = model.get_routing_stats()["model.layers.0.mlp.down_proj"]
print("expert load, layer 0 down_proj:", [round(x, 3) for x in stats.load])
print(f"router entropy {stats.normalized_entropy:.3f} (1 = uniform), experts/token {stats.experts_per_token:.1f}")

model.eval()
with tempfile.TemporaryDirectory() as adapter_dir:
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)
print("reloaded adapter reproduces the outputs exactly:", same)
