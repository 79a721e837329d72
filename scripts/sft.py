"""Supervised fine-tuning of a MoLoRA adapter with TRL, in the style of TRL's example scripts.

The same recipes and options as ``molora sft``, spelled out with molora's public API so that each step can be
changed: load the recipe, the base model and the data, hand TRL's ``SFTTrainer`` a ``molora.MoLoraConfig``, log
routing statistics, train, save.

    python scripts/sft.py --config configs/default.yaml
    python scripts/sft.py --config configs/default.yaml --set adapter.num_experts=4 --set training.max_steps=20
    accelerate launch --num_processes 2 scripts/sft.py --config configs/default.yaml   # DDP
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import set_seed
from trl import SFTTrainer

import molora
from molora.training import (
    DynamicRankCallback,
    MoLoraCallback,
    RoutingStatsCallback,
    build_adapter_config,
    evaluate,
    format_table,
    install_routing_stats_callback,
    load_base_model,
    load_recipe,
    load_split,
    load_tokenizer,
    resolve_model,
    sft_config,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", help="YAML recipe (sections model, data, adapter, training, eval)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    recipe = load_recipe(args.config, args.overrides)
    model_cfg = resolve_model(recipe["model"])  # null name_or_path -> SmolLM2-135M-Instruct (molora[demo])
    tokenizer = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg)
    train_dataset = load_split(recipe["data"], "train")
    eval_rows = load_split(recipe["data"], "eval", keep_task=True)  # bundled data -> its held-out split

    peft_config: molora.MoLoraConfig = build_adapter_config(recipe["adapter"])
    stem = Path(args.config).stem if args.config else "molora-sft"
    training_args = sft_config(recipe["training"], default_output_dir=f"runs/{stem}")
    set_seed(training_args.seed)  # TRL creates the adapter before Trainer seeds: fix the expert/router init
    # evaluation during training (training.eval_strategy) on the held-out rows, without the task column
    eval_dataset = None
    if training_args.eval_strategy != "no" and eval_rows is not None:
        eval_dataset = eval_rows.remove_columns([c for c in ("task",) if c in eval_rows.column_names])
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MoLoraCallback()],  # per-step router state: loss-free balancing biases, ReMoE's L1 coefficient
    )
    DynamicRankCallback.install(trainer)  # DR-LoRA rank growth (a no-op for fixed-rank adapters)
    # first in the callback list, so that TensorBoard & co. receive the routing statistics it adds to the logs
    install_routing_stats_callback(trainer, RoutingStatsCallback())
    trainer.model.print_trainable_parameters()

    trainer.train(resume_from_checkpoint=recipe["training"].get("resume_from_checkpoint"))
    trainer.save_model(training_args.output_dir)

    if eval_rows is not None and recipe["eval"]["after"] and trainer.is_world_process_zero():
        ev = recipe["eval"]
        result = evaluate(
            trainer.model, tokenizer, eval_rows, ev["max_new_tokens"], ev["batch_size"], ev["max_per_task"]
        )
        print(format_table(result, "held-out tasks after training:"))
    # under `accelerate launch`: leave the process group once every process is done, rather than at interpreter exit
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
