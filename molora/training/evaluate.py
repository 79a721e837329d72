"""Generation and evaluation: teacher-forced loss / perplexity and greedy exact match, per task.

For a row with a prompt and a reference answer (chat rows whose last message is the assistant's, or prompt /
completion rows), the *loss* is the mean negative log-likelihood of the answer tokens given the prompt (prompt
tokens are masked, as in training), *perplexity* is ``exp(loss)`` over all answer tokens of a task, and *exact
match* compares the greedy continuation of the prompt, stripped of surrounding whitespace, with the stripped
answer. Text rows contribute the loss of all their tokens and no exact match.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

ALL = "all"


def split_row(row: dict[str, Any]) -> tuple[Any, str | None]:
    """``(prompt, answer)`` of a prepared row; the prompt is a message list or a string, the answer may be None."""
    if "messages" in row:
        messages = list(row["messages"])
        if messages and messages[-1].get("role") == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    if "prompt" in row:
        completion = row["completion"]
        if isinstance(completion, list):
            completion = "".join(m["content"] for m in completion)
        return row["prompt"], completion
    return row["text"], None


def render_prompt(tokenizer, prompt: Any) -> str:
    """The text fed to the model for a prompt: the chat template with a generation prompt for message lists."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    """``special``: add the tokenizer's special tokens (BOS for Llama-style tokenizers), as TRL does when it
    tokenizes a plain-string prompt or text for training; a rendered chat template already holds its own."""
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def prompt_ids(tokenizer, prompt: Any) -> list[int]:
    """The token ids of a prompt as training saw them: a message list through the chat template (with the
    generation prompt), a string with the tokenizer's special tokens (TRL's ``processing_class(text=...)``)."""
    if isinstance(prompt, list):
        return _encode(tokenizer, render_prompt(tokenizer, prompt))
    return _encode(tokenizer, prompt, special=True)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[Any], max_new_tokens: int = 32, batch_size: int = 16, **gen_kwargs
) -> list[str]:
    """Greedy (unless ``gen_kwargs`` say otherwise) continuations of ``prompts`` (strings or message lists)."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outputs: list[str] = []
    for start in range(0, len(encoded), batch_size):
        # left padding: every prompt ends where generation starts
        input_ids, mask = _padded_batch(encoded[start : start + batch_size], pad, left=True)
        width = input_ids.shape[1]
        kwargs = {"do_sample": False, **gen_kwargs}
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        outputs.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return outputs


@torch.no_grad()
def answer_nll(model, tokenizer, rows: list[dict[str, Any]], batch_size: int = 16) -> list[tuple[float, int]]:
    """``(sum of answer-token NLL, answer tokens)`` per row (all tokens for rows without an answer)."""
    device = next(model.parameters()).device
    items = []
    for row in rows:
        prompt, answer = split_row(row)
        if answer is None:
            items.append((prompt_ids(tokenizer, prompt), 1))
            continue
        if isinstance(prompt, list):
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
            full_ids = _encode(tokenizer, full)
        else:
            full_ids = _encode(tokenizer, prompt + answer, special=True)
        prefix = prompt_ids(tokenizer, prompt)
        prefix_len = len(prefix)
        if full_ids[:prefix_len] != prefix:
            prefix_len = _common_prefix(full_ids, prefix)
        items.append((full_ids, max(prefix_len, 1)))
    results = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        input_ids, mask = _padded_batch([ids for ids, _ in chunk], pad, left=False)
        labels = torch.full_like(input_ids, -100)
        for i, (ids, first) in enumerate(chunk):
            labels[i, first : len(ids)] = torch.tensor(ids[first:])
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none"
        ).view(shift_labels.shape)
        valid = shift_labels != -100
        for i in range(len(chunk)):
            results.append((float(nll[i][valid[i]].sum()), int(valid[i].sum())))
    return results


def _padded_batch(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token lists padded with ``pad`` on the left or the right."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        if ids:
            cols = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, cols] = torch.tensor(ids)
            mask[i, cols] = 1
    return input_ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def evaluate(
    model,
    tokenizer,
    dataset,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_per_task: int | None = None,
    exact_match: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Per-task loss, perplexity and exact match of ``model`` on a prepared dataset.

    Returns:
        ``{"tasks": {task: {"n", "loss", "perplexity", "exact_match"}}, "predictions": [...]}``; the pseudo-task
        ``"all"`` pools every row (exact match is the mean over rows, loss the mean over answer tokens).
    """
    was_training = model.training
    model.eval()
    rows = [dict(r) for r in dataset]
    if max_per_task is not None:
        counts: dict[str, int] = defaultdict(int)
        kept = []
        for row in rows:
            task = row.get("task") or ALL
            if counts[task] < max_per_task:
                counts[task] += 1
                kept.append(row)
        rows = kept
    nll = answer_nll(model, tokenizer, rows, batch_size=batch_size)
    answered = [i for i, r in enumerate(rows) if split_row(r)[1] is not None]
    predictions: dict[int, str] = {}
    if exact_match and answered:
        outs = generate(
            model, tokenizer, [split_row(rows[i])[0] for i in answered], max_new_tokens, batch_size=batch_size
        )
        predictions = dict(zip(answered, outs))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get("task") or ALL].append(i)
        if row.get("task"):
            groups[ALL].append(i)
    tasks = {}
    for task, idx in sorted(groups.items(), key=lambda kv: (kv[0] == ALL, kv[0])):
        total, count = sum(nll[i][0] for i in idx), sum(nll[i][1] for i in idx)
        loss = total / max(count, 1)
        entry: dict[str, Any] = {"n": len(idx), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        scored = [i for i in idx if i in predictions]
        if scored:
            hits = sum(predictions[i].strip() == split_row(rows[i])[1].strip() for i in scored)
            entry["exact_match"] = hits / len(scored)
        tasks[task] = entry
    if was_training:
        model.train()
    result: dict[str, Any] = {"tasks": tasks}
    if return_predictions:
        result["predictions"] = [
            {"task": rows[i].get("task"), "answer": split_row(rows[i])[1], "prediction": predictions[i]}
            for i in sorted(predictions)
        ]
    return result


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """A plain-text table of :func:`evaluate`'s per-task results."""
    lines = [title] if title else []
    lines.append(f"{'task':<16}{'n':>5}{'loss':>9}{'ppl':>10}{'exact':>8}")
    for task, m in result["tasks"].items():
        em = f"{m['exact_match']:.2f}" if "exact_match" in m else "-"
        lines.append(f"{task:<16}{m['n']:>5}{m['loss']:>9.3f}{m['perplexity']:>10.2f}{em:>8}")
    return "\n".join(lines)
