"""Time MiLoRA's module mode against PEFT LoRA on the same projections (and the prompt router's bank mode).

A training step (forward with labels, backward, fused AdamW) and a greedy ``generate`` of 32 new tokens for one
16-token prompt, on a small random Llama with all seven attention and MLP projections adapted, every candidate
timed in the same run, interleaved. Ratios are against PEFT LoRA of rank ``--rank`` (module mode has the same
LoRAs plus one ``7 x hidden`` router per decoder layer).

    python scripts/bench_milora.py                 # 256 wide, 2 layers, one thread
    python scripts/bench_milora.py --width 512 --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

import molora
from molora.bench import _adamw, _llama_targets, _small_llama


def candidates(rank: int) -> dict:
    targets = _llama_targets()
    prompt = {"r": rank, "lora_alpha": 2 * rank, "router": "prompt", "target_modules": targets}
    return {
        f"peft lora r={rank}": LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets),
        "milora module K=3 of 7": molora.MoLoraConfig(
            num_experts=1, top_k=3, router_kwargs={"milora_mode": "module"}, **prompt
        ),
        "prompt bank E=4 K=2": molora.MoLoraConfig(num_experts=4, top_k=2, **prompt),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(3, 512, (2, 64), generator=gen)
    prompt = torch.randint(3, 512, (1, 16), generator=gen)
    models = {}
    for name, config in candidates(args.rank).items():
        model = get_peft_model(_small_llama(args.width, args.layers, 512), config)
        with torch.no_grad():  # trained adapters: B away from zero
            for pname, param in model.named_parameters():
                if "lora_B" in pname or "molora_B" in pname:
                    param.normal_(0.0, 0.02)
        models[name] = (model, _adamw([p for p in model.parameters() if p.requires_grad]))

    def train(model, optimizer) -> None:
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def generate(model, optimizer) -> None:
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)

    print(f"{args.layers}-layer {args.width}-wide Llama, {args.threads} thread(s), median of {args.repeats} rounds")
    print("| benchmark | candidate | time (ms) | x PEFT LoRA |\n|---|---|---:|---:|")
    for label, fn in (("train step, 2x64 tokens", train), ("generate 32 tokens", generate)):
        for pair in models.values():
            fn(*pair)
            fn(*pair)
        times = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, pair in models.items():
                start = time.perf_counter()
                fn(*pair)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        base = next(iter(medians.values()))
        for name, value in medians.items():
            print(f"| {label} | {name} | {value * 1e3:.1f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
