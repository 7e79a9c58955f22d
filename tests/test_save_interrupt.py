"""Interrupted saves: a save that fails mid-write, at any step of the write, leaves
the previous checkpoint intact and loadable (same bytes, same outputs), for ``save`` and
``save_adapter``, whether the failure is an exception or the process dying."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import cersa_kernels

from conftest import make_inputs


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(10, 14)
        self.fc2 = nn.Linear(14, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _trained(seed):
    model = cersa_kernels.convert(Net(), rank=4, delta_rank=3, progress=False)
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


X = make_inputs(5, 10, seed=7).x


def _partial_writer(tensors, filename, metadata=None):
    """Writes the start of a real safetensors file, then fails (a full disk, a kill)."""
    from safetensors.torch import save as to_bytes

    data = to_bytes(tensors, metadata=metadata)
    with open(filename, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def _fail_fsync(fd):
    raise OSError(5, "Input/output error")


def _fail_replace(src, dst):
    raise PermissionError(13, "Permission denied")


FAILURES = {
    "writer_raises_mid_file": ("safetensors.torch", "save_file", _partial_writer, OSError, "No space left"),
    "fsync_fails": ("os", "fsync", _fail_fsync, OSError, "Input/output error"),
    "rename_fails": ("os", "replace", _fail_replace, PermissionError, "Permission denied"),
    "keyboard_interrupt": ("safetensors.torch", "save_file",
                           lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()), KeyboardInterrupt, None),
}


@pytest.mark.parametrize("kind", ["model", "adapter"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, kind, failure):
    save, load = ((cersa_kernels.save, cersa_kernels.load) if kind == "model"
                  else (cersa_kernels.save_adapter, cersa_kernels.load_adapter))
    path = tmp_path / f"{kind}.safetensors"
    old = _trained(seed=1)
    save(old, path)
    before = path.read_bytes()
    expected = old(X)

    module, attr, fake, exc, msg = FAILURES[failure]
    import importlib

    monkeypatch.setattr(importlib.import_module(module), attr, fake)
    new = _trained(seed=2)
    assert not torch.equal(new(X), expected)
    with pytest.raises(exc, match=msg):
        save(new, path)
    monkeypatch.undo()

    assert path.read_bytes() == before, "the previous checkpoint was modified"
    leftovers = sorted(set(os.listdir(tmp_path)) - {path.name})
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    fresh = Net() if kind == "model" else cersa_kernels.convert(Net(), rank=4, delta_rank=3, progress=False)
    load(path, fresh)
    torch.testing.assert_close(fresh(X), expected, rtol=0, atol=0)
    # and a later save that succeeds replaces it
    save(new, path)
    again = Net() if kind == "model" else cersa_kernels.convert(Net(), rank=4, delta_rank=3, progress=False)
    load(path, again)
    torch.testing.assert_close(again(X), new(X), rtol=0, atol=0)


def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    """A process that dies (os._exit, no cleanup) half-way through writing: the target is the old,
    complete file; only a hidden temporary file may remain next to it."""
    path = tmp_path / "model.safetensors"
    old = _trained(seed=1)
    cersa_kernels.save(old, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import safetensors.torch as st
        import cersa_kernels
        from test_save_interrupt import _trained

        def dying(tensors, filename, metadata=None):
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
            os._exit(9)

        st.save_file = dying
        cersa_kernels.save(_trained(seed=2), {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert path.read_bytes() == before
    leftovers = sorted(set(os.listdir(tmp_path)) - {path.name})
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
    fresh = cersa_kernels.load(path, Net())
    torch.testing.assert_close(fresh(X), old(X), rtol=0, atol=0)
