"""Build the tiny demo base model: a word-level tokenizer and a 4-layer Mistral pretrained for minutes on CPU.

Why pretrain at all: QLoRA freezes the base and trains only low-rank adapters. Both demo tasks are
mostly copying — table names, columns and values into SQL, words of a sentence into JSON — and a
randomly initialised base has no copying circuit for a LoRA adapter to steer: on frozen random
weights the adapter learns the output template but gets ~0% exact match. So the base gets a short
pretraining on task-free skills (see `tools.world`): first copy drills over every word of
the demo and the common words of questions, then SQL and JSON over *made-up* tables, keys and
values, in another phrasing and another layout than the demo tasks, and made-up conversations in
the chat frame; last a short run that adds synonyms ("highest" next to "maximum") and freely
phrased requests, the word knowledge any pretrained model brings. The base then fails the demo tasks on
its own (0% exact match), and an adapter trained for four CPU minutes masters them (over 90%):
the adapter, not the base, is what learns the task.

A few CPU minutes are far too few for copying to emerge from a plain random start; three choices
make it fit: tied input/output embeddings during pretraining, attention heads initialised as
copiers (`copier_init`) plus one wired to look at the previous token (`previous_token_init`),
and the copy-first curriculum.

Word-level tokens keep the model tiny and make copying a one-token-per-word job; see
`qlora_cli.testing.build_tokenizer` for how spaces are handled so that decoding still round-trips exactly.

    python -m tools.pretrain --out recipes/tiny/base [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from qlora_cli.prompts import render_prompt
from qlora_cli.testing import build_tokenizer
from tools import world

MAX_LEN = 256
SEED = 0


def model_config(tokenizer: PreTrainedTokenizerFast) -> MistralConfig:
    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=640,  # a multiple of 32: bitsandbytes packs 4-bit CPU weights in blocks of 32 rows
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def copier_init(model: MistralForCausalLM) -> None:
    """Start every attention head as a copier: its output map is its value map transposed.

    With tied embeddings, a head then adds the (projected) embeddings of the tokens it attends to
    onto the logits of those same tokens, so "predict a word of the context" works from step one
    and gradients only need to teach attention *where* to look. From a random start, the value/
    output maps and the attention patterns must appear together, which takes far more steps than
    a few CPU minutes allow.
    """
    config = model.config
    head_dim = config.head_dim
    per_kv = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            value = attn.v_proj.weight  # (kv_heads * head_dim, hidden)
            # v @ v.T is about (hidden * std^2) * I: rescale so output(value(x)) projects x.
            scale = 1.0 / (config.hidden_size * config.initializer_range**2)
            for head in range(config.num_attention_heads):
                kv = head // per_kv
                block = value[kv * head_dim : (kv + 1) * head_dim]
                attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = scale * block.T


def previous_token_init(model: MistralForCausalLM, sharpness: float = 9.0) -> None:
    """Wire head 0 of layer 0 to attend to the previous token and write it in a separate code.

    Copying a sequence (induction) needs to know, at each position, which token came before it;
    learning that positional head from scratch is the slow first half of the induction "phase
    change". Built in here, the head gives the later layers that signal from step one.

    Queries and keys read a feature that is the same for every token (dimension 0 of the
    embeddings) and are set so that, after the rotary embedding, their dot product peaks at a
    distance of exactly one position. The head's output is rotated by a random orthogonal matrix
    so "previous token" does not look like "this token" to the layers above.
    """
    config = model.config
    head_dim, half = config.head_dim, config.head_dim // 2
    attn = model.model.layers[0].self_attn
    inv_freq = model.model.rotary_emb.inv_freq[:8].float()  # the fastest-turning rotary pairs
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 0] = 0.3
        # After RMSNorm that constant reads about 0.3 / rms(embedding row).
        constant = 0.3 / embeddings.pow(2).mean(dim=1).sqrt().mean().item()
        attn.q_proj.weight[:head_dim] = 0
        attn.k_proj.weight[:head_dim] = 0
        pairs = torch.arange(len(inv_freq))
        # score(d) = sum_i A*B*cos((d - 1) * theta_i): largest for the previous token (d = 1).
        attn.q_proj.weight[pairs, 0] = sharpness * torch.cos(inv_freq) / constant
        attn.q_proj.weight[pairs + half, 0] = -sharpness * torch.sin(inv_freq) / constant
        attn.k_proj.weight[pairs, 0] = sharpness / constant
        rotation, _ = torch.linalg.qr(torch.randn(config.hidden_size, config.hidden_size, generator=generator))
        attn.o_proj.weight[:, :head_dim] = rotation @ attn.o_proj.weight[:, :head_dim]


def _packed_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    # Texts are concatenated as <s> text </s> and cut into full-length blocks: no padding,
    # every position of every step is a training signal.
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stream = [token for seq in ids for token in (*seq, tokenizer.eos_token_id)]
    n_blocks = len(stream) // MAX_LEN
    return torch.tensor(stream[: n_blocks * MAX_LEN]).view(n_blocks, MAX_LEN)


def pretrain(
    model: MistralForCausalLM,
    stages: list[torch.Tensor],
    minutes: float,
    max_steps: int,
    batch_size: int = 4,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    log_every: int = 25,
) -> dict:
    """Causal-LM training until `max_steps` or the wall-clock budget, whichever comes first.

    `stages` are block tensors used in turn, each for an equal share of that progress (a
    curriculum: copy drills first, then the full mix).

    The LR follows a cosine over that same progress, so a slower or busier machine still ends
    with a fully decayed LR; on an idle 2-core machine the step limit binds and the run is exactly
    reproducible.
    """
    budget = minutes * 60
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(SEED)
    orders = [torch.randperm(len(blocks), generator=generator) for blocks in stages]
    model.train()
    start, step, loss_value = time.perf_counter(), 0, float("nan")
    while (progress := max(step / max_steps, (time.perf_counter() - start) / budget)) < 1:
        scale = min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        stage = min(int(progress * len(stages)), len(stages) - 1)
        blocks, order = stages[stage], orders[stage]
        batch = blocks[order[(torch.arange(batch_size) + step * batch_size) % len(blocks)]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss.item()
        if step % log_every == 0:
            print(
                f"step {step:4d}  loss {loss_value:.3f}  lr {lr * scale:.2e}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    wall = time.perf_counter() - start
    print(f"pretraining done: {step} steps, final loss {loss_value:.3f}, wall time {wall:.1f}s", flush=True)
    return {"steps": step, "loss": loss_value, "wall_s": wall, "tokens": step * batch_size * MAX_LEN}


def _readme(config: MistralConfig, params: int, stages: list[dict]) -> str:
    done = "\n".join(
        f"- {stage['name']}: {stage['steps']} steps, {stage['tokens'] / 1e6:.2f}M tokens, {stage['wall_s']:.0f} s on "
        f"{stage['threads']} CPU thread(s), final loss {stage['loss']:.2f}"
        for stage in stages
    )
    return f"""# Tiny demo base model

A {params / 1e6:.1f}M-parameter Mistral (4 layers, hidden {config.hidden_size}, {config.num_attention_heads} heads,
{config.num_key_value_heads} KV heads, vocabulary {config.vocab_size} words) with a word-level tokenizer, built
offline for the `qlora` demo by `python -m tools.pretrain`. It was pretrained on CPU:

{done}

So it can copy words, knows the alpaca frame and the chat frame (ChatML: `<|im_start|>`/`<|im_end|>`
are special tokens, `chat_template.jinja` is the template), SQL and JSON syntax and what words like
"highest", "below" or "per" ask of a query, but cannot do the demo's `sql`, `json` and `orders` tasks:
a QLoRA adapter is what teaches them. Weights are stored in bfloat16; `pretraining.json` holds the figures above.

Rebuild from the repository root (data, then model; the step limits end each run before its time budget does, so the weights
are reproducible; on a busy machine pass `--threads 1`, and a larger `--minutes` if a run hits it):

    python -m tools.world --out recipes/tiny
    python -m tools.pretrain --out recipes/tiny/base
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build and pretrain the tiny demo base model.")
    parser.add_argument("--out", default="recipes/tiny/base", help="folder for the model and tokenizer")
    parser.add_argument("--minutes", type=float, default=20, help="wall-clock budget of each of the two runs")
    parser.add_argument("--steps", type=int, default=1500, help="step limit (batches of 4 x 256 tokens)")
    parser.add_argument("--texts", type=int, default=20000, help="texts to generate per pretraining stage")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads; use 1 on a busy machine")
    parser.add_argument("--synonym-steps", type=int, default=450, help="step limit of the last stage (synonyms)")
    parser.add_argument(
        "--start-from", metavar="DIR", help="a base this script saved: run only the synonym stage on it"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    # More threads than idle cores makes torch's workers spin against each other: ~10x slower.
    torch.set_num_threads(args.threads)
    if args.start_from:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.start_from)
        model = MistralForCausalLM.from_pretrained(args.start_from, dtype=torch.float32)
        model.lm_head.weight = model.get_input_embeddings().weight  # saved as two copies of one matrix
        config = model.config
        done = json.loads((Path(args.start_from) / "pretraining.json").read_text())["stages"]
    else:
        stage_texts = [world.copy_texts(args.texts, seed=SEED), world.pretraining_texts(args.texts, seed=SEED + 1)]
        dataset_texts = [
            world.render_chat(row["messages"])
            if "messages" in row
            else render_prompt(row["instruction"], row["input"]) + row["output"]
            for rows in world.dataset_rows().values()
            for row in rows
        ]
        vocabulary = [text for texts in stage_texts for text in texts] + dataset_texts + [" ".join(world.all_words())]
        tokenizer = build_tokenizer(vocabulary, chat=True)
        stages = [_packed_blocks(tokenizer, texts) for texts in stage_texts]
        config = model_config(tokenizer)
        model = MistralForCausalLM(config)
        # Pretrain with the output matrix tied to the embeddings: copying a word is then an identity
        # map for attention to learn once, rather than an embedding->logit mapping to learn for each of
        # hundreds of words, most of which show up only a handful of times in a few hundred steps.
        model.lm_head.weight = model.get_input_embeddings().weight
        copier_init(model)
        previous_token_init(model)
        print(f"vocab {len(tokenizer)}, {[len(b) for b in stages]} blocks of {MAX_LEN} tokens")
        stats = pretrain(model, stages, args.minutes, args.steps)
        done = [{"name": "copy drills, then SQL and JSON over made-up tables", "threads": args.threads, **stats}]

    # Last, synonyms: a short second run at a lower LR, so the copying learnt above stays intact. Its
    # texts use only words the tokenizer already has (a few random numbers are not among them).
    texts = world.pretraining_texts(args.texts, seed=SEED + 2, synonyms=True)
    known = [text for text, ids in zip(texts, tokenizer(texts)["input_ids"]) if tokenizer.unk_token_id not in ids]
    print(f"synonym stage: {len(known)} of {len(texts)} texts have no unknown words")
    stats = pretrain(
        model, [_packed_blocks(tokenizer, known)], args.minutes, args.synonym_steps, lr=1e-3, warmup_steps=20
    )
    done.append({"name": "the same with synonyms", "threads": args.threads, **stats})

    # Saved untied, like Mistral: each matrix gets its own copy of the shared weights.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    params = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    ).save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps({"stages": done}, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(config, params, done), encoding="utf-8")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
