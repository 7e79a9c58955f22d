"""Activation-aware truncation (cersa_kernels.calibrate; convert(..., calibration=...)): the weighted
truncation against float64 references, the moment collection (sharing, passes, unfolded conv
patches, attention inputs), every layer type end to end, composition with budget / quantize / rank,
the components beyond the truncation, and bad input leaving the model unchanged."""
import copy
import math

import pytest
import torch
from torch import nn

import cersa_kernels
from cersa_kernels import CersaConfig, calibrate
from cersa_kernels.calibrate import (collect_moments, conv_patches, mha_attention_output, weighted_truncated_svd)
from cersa_kernels.layers import CersaLinear
from cersa_kernels.targets import collect
from cersa_kernels.report import ConversionReport

from helpers import assert_unchanged, snapshot, spectrum_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def _sym_root(C: torch.Tensor) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(C)
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


def _damped(C: torch.Tensor, lam: float) -> torch.Tensor:
    return C + lam * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)


def _aniso(n: int, g: torch.Generator, decay: float = 0.15) -> torch.Tensor:
    """A mixing matrix (n, n) with singular values decaying to ``decay``**... (anisotropic inputs x = A z)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.logspace(0, math.log10(decay) * 3, n, dtype=torch.float64)


# ------------------------------------------------------------------------- the weighted truncation
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (1, 7), (17, 17)])
def test_identity_moment_gives_the_plain_truncation(shape):
    g = torch.Generator().manual_seed(1)
    m, n = shape
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    r = min(m, n) // 2 + 1 if min(m, n) > 1 else 1
    U, S, Vh, info = weighted_truncated_svd(W, torch.eye(n, dtype=torch.float64), rank=r)
    Ur, Sr, Vhr = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close((U * S) @ Vh, (Ur[:, :r] * Sr[:r]) @ Vhr[:r], rtol=0, atol=1e-12)
    torch.testing.assert_close(S, Sr[:r], rtol=1e-12, atol=1e-12)
    # energy with C = I: the plain energy (damping scales the identity: the same fractions)
    assert info.energy == pytest.approx(float(Sr[:r].square().sum() / Sr.square().sum()), rel=1e-12)


@pytest.mark.parametrize("shape,r", [((30, 20), 5), ((20, 30), 7), ((25, 25), 1)])
def test_weighted_error_is_the_minimum(shape, r):
    g = torch.Generator().manual_seed(2)
    m, n = shape
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = _aniso(n, g)
    X = torch.randn(4000, n, generator=g, dtype=torch.float64) @ A.T
    C = X.T @ X / X.shape[0]
    lam = 0.01
    U, S, Vh, info = weighted_truncated_svd(W, C, rank=r, damping=lam)
    L = _sym_root(_damped(C, lam))
    Sw = torch.linalg.svdvals(W @ L)
    Wr = (U * S) @ Vh
    err = float(((W - Wr) @ L).norm())
    assert err == pytest.approx(float(Sw[r:].square().sum().sqrt()), rel=1e-9)
    assert info.weighted_error == pytest.approx(err, rel=1e-9)
    # the plain truncation of the same rank is no better in that norm (strictly worse here)
    Ur, Sr, Vhr = torch.linalg.svd(W, full_matrices=False)
    plain = float(((W - (Ur[:, :r] * Sr[:r]) @ Vhr[:r]) @ L).norm())
    assert err <= plain * (1 + 1e-12)
    assert err < 0.98 * plain
    # nor is a random rank-r perturbation of the optimum
    for _ in range(3):
        P = Wr + 1e-3 * torch.randn(m, r, generator=g, dtype=torch.float64) @ Vh
        assert float(((W - P) @ L).norm()) >= err
    assert info.energy == pytest.approx(float(Sw[:r].square().sum() / Sw.square().sum()), rel=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_stored_factors_are_an_exact_svd_of_the_projection(dtype, tol):
    g = torch.Generator().manual_seed(3)
    m, n, r = 33, 21, 6
    W64 = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(3000, n, generator=g, dtype=torch.float64) @ _aniso(n, g).T
    C = X.T @ X / X.shape[0]
    U, S, Vh, info = weighted_truncated_svd(W64.to(dtype), C, rank=r)
    assert U.dtype == S.dtype == Vh.dtype == dtype and U.shape == (m, r) and Vh.shape == (r, n)
    U, S, Vh = U.double(), S.double(), Vh.double()
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=tol)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=tol)
    assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())
    Up = torch.linalg.svd(W64 @ _sym_root(_damped(C, 0.01)), full_matrices=False)[0][:, :r]
    ref = Up @ Up.T @ W64
    torch.testing.assert_close((U * S) @ Vh, ref, rtol=0, atol=tol * 10 * float(W64.abs().max()))
    assert info.weight_energy == pytest.approx(float(ref.square().sum() / W64.square().sum()), rel=tol * 10)


def test_energy_rank_is_on_the_output_energy():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(20, 16, generator=g, dtype=torch.float64)
    X = torch.randn(2000, 16, generator=g, dtype=torch.float64) @ _aniso(16, g).T
    C = X.T @ X / X.shape[0]
    Sw = torch.linalg.svdvals(W @ _sym_root(_damped(C, 0.05)))
    cum = torch.cumsum(Sw.square(), 0) / Sw.square().sum()
    for tau in (0.5, 0.9, 0.99):
        _, _, _, info = weighted_truncated_svd(W, C, energy=tau, damping=0.05)
        assert info.rank == int((cum < tau).sum()) + 1
        assert info.energy >= tau


def test_extra_block_is_the_next_weighted_components():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(18, 14, generator=g, dtype=torch.float64)
    X = torch.randn(2000, 14, generator=g, dtype=torch.float64) @ _aniso(14, g).T
    C = X.T @ X / X.shape[0]
    U, S, Vh, info = weighted_truncated_svd(W, C, rank=4, extra=3)
    assert info.rank == 4 and U.shape == (18, 7)
    Up = torch.linalg.svd(W @ _sym_root(_damped(C, 0.01)), full_matrices=False)[0]
    torch.testing.assert_close((U[:, :4] * S[:4]) @ Vh[:4], Up[:, :4] @ Up[:, :4].T @ W, rtol=0, atol=1e-11)
    torch.testing.assert_close((U[:, 4:] * S[4:]) @ Vh[4:], Up[:, 4:7] @ Up[:, 4:7].T @ W, rtol=0, atol=1e-11)
    # capped at min(m, n)
    assert weighted_truncated_svd(W, C, rank=12, extra=5)[0].shape == (18, 14)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(damping=0.0), ValueError, "calibration_damping"),
    (dict(damping=-1.0), ValueError, "calibration_damping"),
    (dict(damping=float("nan")), ValueError, "calibration_damping"),
    (dict(damping=float("inf")), ValueError, "calibration_damping"),
    (dict(damping="0.1"), TypeError, "calibration_damping"),
    (dict(extra=-1), ValueError, "extra"),
])
def test_weighted_bad_arguments(kw, exc, pattern):
    W = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(exc, match=pattern):
        weighted_truncated_svd(W, torch.eye(5, dtype=torch.float64), rank=2, **kw)


def test_zero_or_bad_moment_names_the_layer():
    W = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="lay.er.*all zero"):
        weighted_truncated_svd(W, torch.zeros(5, 5, dtype=torch.float64), rank=2, where="lay.er")
    C = torch.eye(5, dtype=torch.float64)
    C[0, 0] = float("nan")
    with pytest.raises(ValueError, match="lay.er.*non-finite"):
        weighted_truncated_svd(W, C, rank=2, where="lay.er")
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        weighted_truncated_svd(W, torch.eye(4, dtype=torch.float64), rank=2, where="lay.er")


# ------------------------------------------------------------------------------- collection
class Shared(nn.Module):
    """q / k / v fed one tensor, a gate / up pair fed another, a layer fed a different tensor."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(12, 8)
        self.up, self.gate = nn.Linear(8, 20), nn.Linear(8, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x):
        h = self.q(x) + self.k(x) * self.v(x)
        return self.down(self.up(h) * torch.sigmoid(self.gate(h)))


def _inputs(model, cal):
    """The float64 input rows of every Linear of ``model`` on the calibration items (reference)."""
    rows = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: rows.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for x in cal:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


def _todo(model, **kw):
    return collect(model, kw.get("target_modules"), None, ConversionReport())[0]


def test_moments_match_float64_and_share_one_tensor():
    torch.manual_seed(0)
    model = Shared()
    cal = [torch.randn(3, 5, 12) for _ in range(3)]
    todo = _todo(model)
    moments, stats = collect_moments(model, todo, cal)
    ref = _inputs(model, cal)
    got = {name: Cs[0] for (name, _, _), Cs in zip(todo, moments)}
    for name, X in ref.items():
        torch.testing.assert_close(got[name], X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)
    assert got["q"] is got["k"] is got["v"] and got["up"] is got["gate"]
    assert got["down"] is not got["up"]
    assert stats.passes == 1 and stats.matrices == 6 and stats.moments == 3
    assert stats.peak_bytes == 8 * (12 * 12 + 8 * 8 + 20 * 20)


def test_multi_pass_equals_single_pass_and_reports_it():
    torch.manual_seed(1)
    model = Shared()
    cal = [torch.randn(2, 4, 12) for _ in range(2)]
    todo = _todo(model)
    one, s1 = collect_moments(model, todo, cal)
    many, s2 = collect_moments(model, todo, cal, memory=20 * 20 * 8)
    assert s1.passes == 1 and s2.passes > 1
    assert s2.peak_bytes <= 20 * 20 * 8 < s1.peak_bytes
    for a, b in zip(one, many):
        for Ca, Cb in zip(a, b):
            torch.testing.assert_close(Ca, Cb, rtol=1e-13, atol=1e-13)
    # the callable form runs the data itself, once per pass
    calls = []

    def run(m):
        calls.append(1)
        for x in cal:
            m(x)

    again, s3 = collect_moments(model, todo, run, memory=20 * 20 * 8)
    assert len(calls) == s3.passes == s2.passes
    for a, b in zip(one, again):
        for Ca, Cb in zip(a, b):
            torch.testing.assert_close(Ca, Cb, rtol=1e-13, atol=1e-13)


class Sometimes(nn.Module):
    """b is fed a's input on the first call of each forward, a different tensor on the second."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        return self.b(torch.tanh(y))


def test_inconsistent_sharing_gets_its_own_moment():
    torch.manual_seed(2)
    model = Sometimes()
    cal = [torch.randn(7, 6) for _ in range(2)]
    todo = _todo(model)
    moments, stats = collect_moments(model, todo, cal)
    ref = _inputs(model, cal)
    for (name, _, _), Cs in zip(todo, moments):
        torch.testing.assert_close(Cs[0], ref[name].T @ ref[name] / ref[name].shape[0], rtol=1e-12, atol=1e-12)
    assert stats.passes == 2 and stats.moments == 2
    with pytest.raises(ValueError, match="calibration: b.*one-shot"):
        collect_moments(model, todo, iter(cal))


def test_eval_mode_no_grad_and_hooks_removed():
    torch.manual_seed(3)
    model = Shared()
    model.train()
    model.up.eval()
    seen = []

    def run(m):
        seen.append((m.training, m.q.training, torch.is_grad_enabled()))
        m(torch.randn(2, 12))

    collect_moments(model, _todo(model), run)
    assert seen == [(False, False, False)]
    assert model.training and model.q.training and not model.up.training
    assert all(not m._forward_hooks for m in model.modules())

    def boom(m):
        m(torch.randn(2, 12))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_moments(model, _todo(model), boom)
    assert model.training and all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------- conv patches
@pytest.mark.parametrize("dims,kw", [
    (1, dict(kernel_size=3, stride=2, padding=1)),
    (1, dict(kernel_size=4, padding="same", dilation=2)),
    (2, dict(kernel_size=3, stride=2, padding=1)),
    (2, dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1))),
    (2, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    (2, dict(kernel_size=(2, 3), padding="same", padding_mode="circular")),
    (2, dict(kernel_size=3, padding="valid")),
    (3, dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2))),
])
def test_conv_patches_reproduce_the_convolution(dims, kw):
    torch.manual_seed(4)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](3, 5, **kw).double()
    x = torch.randn(2, 3, *[9, 8, 7][:dims], dtype=torch.float64)
    y = conv(x)
    X = torch.cat(list(conv_patches(conv, x, chunk_numbers=50)))  # many small chunks
    Wm = conv.weight.reshape(5, -1)
    out = (X @ Wm.T + conv.bias).reshape(2, *y.shape[2:], 5).movedim(-1, 1)
    torch.testing.assert_close(out, y, rtol=1e-12, atol=1e-12)
    # unbatched input
    X1 = torch.cat(list(conv_patches(conv, x[0])))
    torch.testing.assert_close(X1, X[: X.shape[0] // 2], rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_out_proj_input_is_recomputed(batch_first):
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)  # (N = 3, L = 5) or (L = 3, N = 5)
    L, N = (5, 3) if batch_first else (3, 5)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[:, 1] = True
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, 2] = True
    with torch.no_grad():
        y, _ = mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)
        z = mha_attention_output(mha, x, x, x, key_padding_mask=kpm, attn_mask=mask)
    torch.testing.assert_close(z @ mha.out_proj.weight.T + mha.out_proj.bias, y, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ end to end
class AllTypes(nn.Module):
    """A Conv2d (stride, padding), a transformers Conv1D, an nn.MultiheadAttention, a Linear."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c1d = Conv1D(24, 16)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2).contiguous()  # (N, L, 16)
        h = self.c1d(h)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h))


def _alltypes_data(n, g, A):
    z = torch.randn(n, 3 * 8 * 8, generator=g)
    return (z @ A.T).reshape(n, 3, 8, 8)


@pytest.mark.parametrize("rank", [3, 5])
def test_every_layer_type_end_to_end(rank):
    pytest.importorskip("transformers")
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    model = AllTypes().eval()
    A = _aniso(3 * 8 * 8, g, decay=0.3).float()
    cal = [_alltypes_data(8, g, A) for _ in range(4)]
    test = _alltypes_data(16, g, A)
    with torch.no_grad():
        ref = model(test)
    plain = cersa_kernels.convert(copy.deepcopy(model), None, rank=rank, progress=False)
    cal_m = cersa_kernels.convert(copy.deepcopy(model), None, rank=rank, progress=False, calibration=cal)
    rep = cal_m.cersa_report
    assert [l.kind for l in rep.converted] == ["Conv2d", "Conv1D", "MultiheadAttention", "Linear"]
    assert rep.policy["calibration"]["passes"] == 1 and rep.policy["calibration"]["matrices"] == 5
    with torch.no_grad():
        e_plain = float((plain(test) - ref).norm() / ref.norm())
        e_cal = float((cal_m(test) - ref).norm() / ref.norm())
    assert e_cal < e_plain
    # the stored factors keep the layer ranks; energy is the output energy (in (0, 1])
    for l in rep.converted:
        assert 0 < l.energy <= 1


def test_single_linear_layer_output_error_is_minimal():
    """One Linear: the calibrated conversion's output error on the calibration data equals the
    float64 optimum sqrt(sum of dropped S'^2) (tiny damping) and beats the plain one."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(20, 30, bias=False).double()
    X = torch.randn(6000, 20, generator=g, dtype=torch.float64) @ _aniso(20, g).T
    cal = [X[i:i + 1000] for i in range(0, 6000, 1000)]
    out = {}
    for name, kw in (("plain", {}), ("cal", dict(calibration=cal, calibration_damping=1e-9))):
        m = cersa_kernels.convert(nn.Sequential(copy.deepcopy(lin)), None, rank=6, progress=False,
                                  init="lora", **kw)
        with torch.no_grad():
            out[name] = float((m(X) - lin(X)).square().sum() / X.shape[0])
    C = X.T @ X / X.shape[0]
    Sw = torch.linalg.svdvals(lin.weight.detach() @ _sym_root(C))
    assert out["cal"] == pytest.approx(float(Sw[6:].square().sum()), rel=1e-6)
    assert out["cal"] < out["plain"]


def test_budget_and_quantize_compose():
    torch.manual_seed(8)
    model = Shared()
    g = torch.Generator().manual_seed(8)
    A = _aniso(12, g).float()
    cal = [torch.randn(16, 12, generator=g) @ A.T for _ in range(3)]
    todo = _todo(model)
    moments, _ = collect_moments(model, todo, cal)
    m = cersa_kernels.convert(copy.deepcopy(model), budget=0.5, progress=False, calibration=cal,
                              calibration_rank="output")
    pol = m.cersa_report.policy
    assert pol["stored"] <= pol["allowed"]
    # the allocator ran on the weighted spectra: its ranks are those allocate_budget gives them
    from cersa_kernels.decompose import allocate_budget
    from cersa_kernels.planning import _budget_cap

    spectra = [torch.linalg.svdvals(mod.weight.detach().double() @ _sym_root(_damped(Cs[0], 0.01)))
               for (_, mod, _), Cs in zip(todo, moments)]
    shapes = [tuple(mod.weight.shape) for _, mod, _ in todo]
    caps = [_budget_cap(a, b, 1.0, None, None) for a, b in shapes]
    alloc = allocate_budget(spectra, shapes, 0.5, caps=caps)
    assert [l.rank for l in m.cersa_report.layers] == alloc.ranks
    # quantize: the stored factors are the calibrated ones, quantized
    mq = cersa_kernels.convert(copy.deepcopy(model), None, rank=4, progress=False, calibration=cal,
                               quantize="int8", init="lora")
    mf = cersa_kernels.convert(copy.deepcopy(model), None, rank=4, progress=False, calibration=cal, init="lora")
    for name in ("q", "down"):
        a, b = getattr(mq, name), getattr(mf, name)
        assert a.quantize == "int8"
        torch.testing.assert_close(a.merged_matrix(), b.merged_matrix(), rtol=0, atol=0.03)
    # rank_multiple / max_rank act on the weighted spectrum too
    mr = cersa_kernels.convert(copy.deepcopy(model), 0.9, progress=False, calibration=cal, rank_multiple=3,
                               max_rank=6)
    for l in mr.cersa_report.converted:
        assert l.rank <= 6 and (l.rank % 3 == 0 or l.rank == min(l.out_features, l.in_features))


# --------------------------------------------------------------------- extra components (plumbing)
@pytest.mark.parametrize("calibrated", [False, True])
def test_extra_components_reach_from_factors(monkeypatch, calibrated):
    g = torch.Generator().manual_seed(9)
    lin = nn.Linear(14, 18).double()
    with torch.no_grad():
        lin.weight.copy_(spectrum_matrix(18, 14, 0.8 ** torch.arange(14.0), generator=g))
    X = torch.randn(500, 14, generator=g, dtype=torch.float64) @ _aniso(14, g).T
    monkeypatch.setattr(CersaConfig, "extra_components", property(lambda self: 3))
    seen = {}
    orig = CersaLinear.from_factors.__func__

    def spy(cls, U, S, Vh, *a, **kw):
        seen.update(U=U, S=S, Vh=Vh, r=kw.get("truncation_rank"))
        return orig(cls, U, S, Vh, *a, **kw)

    monkeypatch.setattr(CersaLinear, "from_factors", classmethod(spy))
    kw = dict(calibration=[X], calibration_damping=0.01) if calibrated else {}
    m = cersa_kernels.convert(nn.Sequential(copy.deepcopy(lin)), None, rank=5, progress=False, init="lora", **kw)
    assert seen["r"] == 5 and seen["U"].shape == (18, 8) and seen["Vh"].shape == (8, 14)
    W = lin.weight.detach()
    if calibrated:
        C = X.T @ X / X.shape[0]
        Up = torch.linalg.svd(W @ _sym_root(_damped(C, 0.01)), full_matrices=False)[0]
        head, tail = Up[:, :5] @ Up[:, :5].T @ W, Up[:, 5:8] @ Up[:, 5:8].T @ W
    else:
        Ur, Sr, Vhr = torch.linalg.svd(W, full_matrices=False)
        head, tail = (Ur[:, :5] * Sr[:5]) @ Vhr[:5], (Ur[:, 5:8] * Sr[5:8]) @ Vhr[5:8]
    U, S, Vh = seen["U"], seen["S"], seen["Vh"]
    torch.testing.assert_close((U[:, 5:] * S[5:]) @ Vh[5:], tail, rtol=0, atol=1e-10)
    # the layer is the r-truncation (the extras are not stored by the current inits)
    torch.testing.assert_close(m[0].merged_matrix(), head, rtol=0, atol=1e-10)
    assert m[0].rank == 5


# ------------------------------------------------------------------------------------ bad input
def _reaches_q_only(model):
    model.q(torch.randn(2, 12))


class _Once:
    """A one-shot iterator over model inputs."""

    def __init__(self, items):
        self.it = iter(items)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(calibration=42), TypeError, "calibration: expected a callable"),
    (dict(calibration="text"), TypeError, "calibration: expected a callable"),
    (dict(calibration=torch.randn(3, 12)), TypeError, "calibration: expected a callable"),
    (dict(calibration=[]), ValueError, "calibration: the iterable yielded no inputs"),
    (dict(calibration=[3.0]), TypeError, "calibration: expected items"),
    (dict(calibration=_reaches_q_only), ValueError, "calibration: k received no inputs"),
    (dict(calibration=_Once([torch.randn(2, 12)]), calibration_memory=20 * 20 * 8), ValueError, "one-shot iterator"),
    (dict(calibration=[torch.randn(2, 12)], calibration_damping=0.0), ValueError, "calibration_damping"),
    (dict(calibration=[torch.randn(2, 12)], calibration_damping=float("nan")), ValueError, "calibration_damping"),
    (dict(calibration=[torch.randn(2, 12)], calibration_memory=0), ValueError, "calibration_memory"),
    (dict(calibration=[torch.randn(2, 12)], calibration_memory=100), ValueError, "calibration_memory.*alone"),
    (dict(calibration=[torch.zeros(2, 12)]), ValueError, "q.*all zero"),
    (dict(calibration=[torch.randn(2, 12)], calibration_rank="input"), ValueError, "calibration_rank"),
])
def test_bad_calibration_changes_nothing(kw, exc, pattern):
    torch.manual_seed(10)
    model = Shared()
    model.train()
    before = snapshot(model)
    with pytest.raises(exc, match=pattern):
        cersa_kernels.convert(model, 0.9, progress=False, **kw)
    assert_unchanged(model, before)
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_cross_attention_is_refused_naming_the_layer():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x, mem):
            return self.attn(x, mem, mem)[0]

    model = Cross()
    before = snapshot(model)
    with pytest.raises(ValueError, match="attn.*cross-attention"):
        cersa_kernels.convert(model, 0.9, progress=False, calibration=[(torch.randn(3, 1, 8), torch.randn(4, 1, 8))])
    assert_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_stream_refuses_calibration(tmp_path):
    with pytest.raises(TypeError, match=r"calibration: convert_file cannot run the model.*convert\(model, calibration"):
        cersa_kernels.convert_file(tmp_path / "missing.safetensors", tmp_path / "out.safetensors",
                                   calibration=[torch.randn(2, 2)])


@pytest.mark.parametrize("policy", [dict(energy=0.9), dict(energy=None, budget=0.5)])
def test_convert_in_several_passes_equals_one_pass(policy):
    """A small calibration_memory splits the targets into groups (one pass each; a budget takes a
    second round for the factors); the converted layers are those of one pass."""
    torch.manual_seed(11)
    model = Shared()
    g = torch.Generator().manual_seed(11)
    A = _aniso(12, g).float()
    cal = [torch.randn(16, 12, generator=g) @ A.T for _ in range(3)]
    one = cersa_kernels.convert(copy.deepcopy(model), progress=False, calibration=cal, init="lora",
                                calibration_rank="output", **policy)
    many = cersa_kernels.convert(copy.deepcopy(model), progress=False, calibration=cal, init="lora",
                                 calibration_rank="output", calibration_memory=20 * 20 * 8, **policy)
    s1, s2 = one.cersa_report.policy["calibration"], many.cersa_report.policy["calibration"]
    groups = calibrate.calibration_groups(_todo(model), 20 * 20 * 8)
    assert [[_todo(model)[i][0] for i in grp] for grp in groups] == [["q", "k"], ["v", "up", "gate"], ["down"]]
    assert s1["passes"] == 1 and s2["passes"] == 3 * (2 if "budget" in policy else 1)
    assert s2["peak_bytes"] <= 20 * 20 * 8 < s1["peak_bytes"]
    assert [l.rank for l in one.cersa_report.layers] == [l.rank for l in many.cersa_report.layers]
    for name in ("q", "k", "v", "up", "gate", "down"):
        torch.testing.assert_close(getattr(many, name).merged_matrix(), getattr(one, name).merged_matrix(),
                                   rtol=0, atol=1e-5)


def test_a_layer_type_without_an_input_rule_is_refused():
    from cersa_kernels.layers import CersaModule

    class Other(CersaModule):
        kind = "Other"

    model = Shared()
    todo = [(n, m, Other if n == "down" else c) for n, m, c in _todo(model)]
    with pytest.raises(ValueError, match="calibration: down: layer type Other has no rule"):
        collect_moments(model, todo, [torch.randn(2, 12)])
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("policy", [dict(energy=0.8), dict(energy=None, budget=0.6), dict(energy=0.8, rank_multiple=2, max_rank=6)])
def test_weight_ranks_keep_the_plain_sizes(policy):
    """calibration_rank="weight": the ranks of the plain conversion, the subspace chosen on the
    inputs: the same stored numbers, a lower output error on held-out inputs."""
    pytest.importorskip("transformers")
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    model = AllTypes().eval()
    A = _aniso(3 * 8 * 8, g, decay=0.3).float()
    cal = [_alltypes_data(8, g, A) for _ in range(4)]
    test = _alltypes_data(16, g, A)
    with torch.no_grad():
        ref = model(test)
    plain = cersa_kernels.convert(copy.deepcopy(model), progress=False, **policy)
    wr = cersa_kernels.convert(copy.deepcopy(model), progress=False, calibration=cal, calibration_rank="weight",
                               **policy)
    rp, rw = plain.cersa_report, wr.cersa_report
    assert [(l.name, l.rank) for l in rp.layers] == [(l.name, l.rank) for l in rw.layers]
    parts = lambda m: [(type(getattr(m, l)), [p.rank for p in getattr(m, l).parts()]  # noqa: E731
                        if hasattr(getattr(m, l), "parts") else None) for l in ("conv", "c1d", "attn", "head")]
    assert parts(wr) == parts(plain) and sum(p is not None for _, p in parts(wr)) >= 3
    with torch.no_grad():
        assert float((wr(test) - ref).norm()) < float((plain(test) - ref).norm())


def test_transformer_encoder_in_eval_reaches_every_layer():
    """nn.TransformerEncoder(Layer) in eval mode (its fused fast path) still calls the hooked
    modules: every attention and feed-forward matrix gets its moment."""
    torch.manual_seed(13)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    cal = [torch.randn(2, 5, 16) for _ in range(2)]
    m = cersa_kernels.convert(copy.deepcopy(enc), None, rank=4, progress=False, calibration=cal)
    stats = m.cersa_report.policy["calibration"]
    assert stats["matrices"] == 8 and stats["moments"] == 8
    with torch.no_grad():
        x = torch.randn(3, 5, 16)
        assert torch.isfinite(m(x)).all()
