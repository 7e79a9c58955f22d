"""What a model carries besides its weights survives convert / merge / save / load: hooks, the
converted module's class and attributes, fast paths, shared modules, requires_grad flags the user
set, the global RNG, wrapper prefixes (torch.compile, DDP, FSDP2), state_dict round trips, tied
weights, and subclasses that override forward (cersa_kernels/convert.py, io.py, targets.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cersa_kernels as ck
from cersa_kernels import CersaLinear, convert, get_report, load, merge, save
from cersa_kernels.layers import LAYER_TYPES

from conftest import rel_error, single_thread
from roundtrip_helpers import IDS, Net, perturb_deltas, set_decaying, x_like


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _conv(model, **kw):
    kw.setdefault("energy", 0.9)
    kw.setdefault("delta_rank", 2)
    return convert(model, progress=False, **kw)


# --------------------------------------------------------------------------------------- hooks
def test_forward_hooks_move_to_the_cersa_layer_and_back():
    model = Net()
    calls = []
    h1 = model.up.register_forward_pre_hook(lambda mod, args: calls.append(("pre", type(mod).__name__)))
    model.up.register_forward_hook(lambda mod, args, out: calls.append(("post", type(mod).__name__)))
    model.down.register_forward_hook(lambda mod, args, kwargs, out: out * 2, with_kwargs=True)
    model.down.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(("kw", kwargs)) or None,
                                         with_kwargs=True)
    y_dense = model(IDS)
    _conv(model, energy=1.0, max_frozen_ratio=None)
    assert isinstance(model.up, CersaLinear) and isinstance(model.down, CersaLinear)
    calls.clear()
    y = model(IDS)
    assert calls == [("pre", "CersaLinear"), ("post", "CersaLinear"), ("kw", {})]
    assert rel_error(y, y_dense) <= 1e-5  # the hook doubling down's output still applies
    h1.remove()  # the user's handle still removes the hook from the CERSA layer
    calls.clear()
    model(IDS)
    assert calls == [("post", "CersaLinear"), ("kw", {})]
    merge(model)
    assert type(model.up) is nn.Linear
    calls.clear()
    assert rel_error(model(IDS), y_dense) <= 1e-5
    assert calls == [("post", "Linear"), ("kw", {})]


def test_hooks_registered_on_the_cersa_layer_survive_merge_and_backward_hooks_fire():
    model = _conv(Net())
    seen = []
    model.up.register_forward_hook(lambda mod, args, out: seen.append("fwd"))
    model.up.register_full_backward_hook(lambda mod, gin, gout: seen.append("bwd"))
    merge(model)
    model(IDS).sum().backward()
    assert seen == ["fwd", "bwd"]


def test_state_dict_hook_is_refused_naming_layer_and_hook():
    model = Net()

    def rename_weight(module, state_dict, prefix, *args):
        return state_dict

    model.up._register_state_dict_hook(rename_weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"up: .*state dict hook .*rename_weight"):
        _conv(model)
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_training_mode_is_kept():
    model = Net().eval()
    _conv(model)
    assert not any(m.training for m in model.modules())
    merge(model)
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------ merge: the class
class TaggedLinear(nn.Linear):
    inits = 0

    def __init__(self, n_in, n_out, tag):
        TaggedLinear.inits += 1
        super().__init__(n_in, n_out, bias=False)
        self.tag = tag


class TaggedConv(nn.Conv2d):
    pass


def test_merge_gives_back_the_subclass_its_attributes_and_bias_false():
    model = nn.Sequential(TaggedLinear(24, 24, "q"), nn.ReLU(), TaggedConv(3, 8, 3, padding=1, bias=False))
    set_decaying(model)
    x = x_like(24)
    y = model[0](x)
    _conv(model, energy=1.0, max_frozen_ratio=None)
    assert isinstance(model[0], CersaLinear) and model[0].bias is None
    inits = TaggedLinear.inits
    merge(model)
    assert TaggedLinear.inits == inits, "merge called the subclass's __init__"
    assert type(model[0]) is TaggedLinear and model[0].tag == "q" and model[0].bias is None
    assert type(model[2]) is TaggedConv and model[2].bias is None and model[2].padding == (1, 1)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "2.weight"]
    assert rel_error(model[0](x), y) <= 1e-5
    # a second round trip works the same
    _conv(model, energy=1.0, max_frozen_ratio=None)
    merge(model)
    assert type(model[0]) is TaggedLinear and model[0].tag == "q"


def test_merge_after_load_gives_the_models_class(tmp_path):
    model = nn.Sequential(TaggedLinear(24, 24, "k"))
    set_decaying(model)
    _conv(model)
    save(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(TaggedLinear(24, 24, "k"))
    load(tmp_path / "m.safetensors", fresh)
    merge(fresh)
    assert type(fresh[0]) is TaggedLinear and fresh[0].tag == "k"


def test_transformer_fast_path_comes_back_after_merge():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True), 2,
                                enable_nested_tensor=True).eval()
    set_decaying(enc)
    before = {n: (getattr(m, "activation_relu_or_gelu", None), getattr(m, "use_nested_tensor", None))
              for n, m in enc.named_modules()}
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = enc(x)
    _conv(enc, energy=1.0, max_frozen_ratio=None)
    assert enc.layers[0].activation_relu_or_gelu is False and enc.use_nested_tensor is False
    with torch.no_grad():
        assert rel_error(enc(x), y) <= 1e-4
    merge(enc)
    after = {n: (getattr(m, "activation_relu_or_gelu", None), getattr(m, "use_nested_tensor", None))
             for n, m in enc.named_modules()}
    assert after == before
    assert type(enc.layers[0].self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert rel_error(enc(x), y) <= 1e-4
    # fast path stays off while a CERSA layer is left inside
    _conv(enc, energy=1.0, max_frozen_ratio=None, target_modules=["layers.0.linear1"])
    assert enc.layers[0].activation_relu_or_gelu is False
    assert enc.layers[1].activation_relu_or_gelu == before["layers.1"][0]


# ------------------------------------------------------------------------------ shared modules
def test_shared_module_converts_saves_loads_and_merges_as_one(tmp_path):
    def build():
        torch.manual_seed(0)
        lin = nn.Linear(24, 24)
        set_decaying(nn.Sequential(lin))
        return nn.Sequential(lin, nn.Tanh(), lin)

    model = build()
    _conv(model)
    assert model[0] is model[2] and isinstance(model[0], CersaLinear)
    perturb_deltas(model)
    x = x_like(24)
    y = model(x)
    save(model, tmp_path / "s.safetensors")
    fresh = build()
    load(tmp_path / "s.safetensors", fresh)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], CersaLinear)
    assert torch.equal(fresh(x), y)
    # the file knows both names: a model that does not share the module gets one shared layer too
    unshared = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 24))
    load(tmp_path / "s.safetensors", unshared)
    assert unshared[0] is unshared[2] and torch.equal(unshared(x), y)
    merge(fresh)
    assert fresh[0] is fresh[2] and type(fresh[0]) is nn.Linear
    assert rel_error(fresh(x), y) <= 1e-5


# ---------------------------------------------------------------------------- converting twice
def test_converting_twice_keeps_the_users_flags():
    model = _conv(Net())
    assert not model.norm.weight.requires_grad
    model.norm.weight.requires_grad_(True)  # the user unfreezes a dense parameter
    model.up.S.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    _conv(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {l.name for l in get_report(model).layers if l.status == "already converted"} == {"up", "down", "head"}


# ------------------------------------------------------------------------------------------ RNG
@pytest.mark.parametrize("kw", [dict(init="lora", svd="randomized", rank=6, energy=None),
                                dict(init="principal", delta_rank=12, energy=0.5)])
def test_convert_neither_uses_nor_depends_on_the_global_rng(kw):
    def factors(seed):
        model = Net(seed=0)
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        _conv(model, max_frozen_ratio=None, **{"delta_rank": 4, **kw})
        assert torch.equal(torch.get_rng_state(), state), "convert advanced the global RNG"
        return {k: v for k, v in model.state_dict().items() if k.startswith(("up.", "down.", "head."))}

    a, b = factors(1), factors(2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------- wrappers
def test_torch_compile_wrapper_saves_and_loads_plain_names(tmp_path):
    model = perturb_deltas(_conv(Net()))
    compiled = torch.compile(model)  # compiles lazily: never called here
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save(compiled, tmp_path / "c.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as fh:
        assert not any(k.startswith("_orig_mod.") for k in fh.keys())
    plain = load(tmp_path / "c.safetensors", Net())
    assert torch.equal(plain(IDS), model(IDS))
    # and the other way round: a plain file into a compiled (wrapped) fresh model
    save(model, tmp_path / "p.safetensors")
    wrapped = torch.compile(Net())
    assert load(tmp_path / "p.safetensors", wrapped) is wrapped
    assert isinstance(wrapped._orig_mod.up, CersaLinear)
    assert torch.equal(wrapped._orig_mod(IDS), model(IDS))
    assert get_report(wrapped).converted
    # convert through the wrapper uses the names inside it
    other = torch.compile(Net())
    _conv(other)
    assert {l.name for l in get_report(other).converted} == {"up", "down", "head"}


def test_prefixed_file_names_are_stripped(tmp_path):
    """A file whose names carry a wrapper prefix (written from a wrapped model by other tools)."""
    import json
    from safetensors.torch import save_file

    model = perturb_deltas(_conv(Net()))
    save(model, tmp_path / "m.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as fh:
        meta = fh.metadata()
        tensors = {"module." + k: fh.get_tensor(k) for k in fh.keys()}
    meta["layers"] = json.dumps({"module." + k: v for k, v in json.loads(meta["layers"]).items()})
    meta["trainable"] = json.dumps(["module." + k for k in json.loads(meta["trainable"])])
    save_file(tensors, str(tmp_path / "prefixed.safetensors"), metadata=meta)
    fresh = load(tmp_path / "prefixed.safetensors", Net())
    assert torch.equal(fresh(IDS), model(IDS))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture()
def one_process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_models_save_files_that_load_into_the_plain_model(tmp_path, one_process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = perturb_deltas(_conv(Net()))
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    assert any(k.startswith("module.") for k in ddp.state_dict())
    save(ddp, tmp_path / "ddp.safetensors")
    assert torch.equal(load(tmp_path / "ddp.safetensors", Net())(IDS), ref(IDS))
    # a plain file into a DDP-wrapped fresh model: DDP of a dense model, loaded inside the wrapper
    save(ref, tmp_path / "plain.safetensors")
    dense_ddp = DDP(Net())
    load(tmp_path / "plain.safetensors", dense_ddp)
    assert isinstance(dense_ddp.module.up, CersaLinear)
    assert torch.equal(dense_ddp.module(IDS), ref(IDS))

    from torch.distributed.fsdp import fully_shard
    sharded = copy.deepcopy(ref)
    fully_shard(sharded)
    assert type(next(sharded.parameters())).__name__ == "DTensor"
    save(sharded, tmp_path / "fsdp2.safetensors")
    back = load(tmp_path / "fsdp2.safetensors", Net())
    assert torch.equal(back(IDS), ref(IDS))


# ------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip(assign):
    model = perturb_deltas(_conv(Net()))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    other = _conv(Net(seed=5))  # same architecture, other weights: ranks may differ
    with pytest.raises(RuntimeError):
        other.load_state_dict(sd, strict=True) if other.up.frozen_rank != model.up.frozen_rank else \
            other.load_state_dict({**sd, "extra": torch.zeros(1)}, strict=True)
    target = copy.deepcopy(model)
    perturb_deltas(target, seed=9)
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    res = target.load_state_dict(sd, strict=True, assign=assign)
    assert not res.missing_keys and not res.unexpected_keys
    assert torch.equal(target(IDS), model(IDS))
    assert {n: p.requires_grad for n, p in target.named_parameters()} == flags
    assert all(isinstance(p, nn.Parameter) for p in target.parameters())
    # built on the meta device from the layer configs and filled by assign
    if assign:
        with torch.device("meta"):
            shell = Net()
        for name in ("up", "down", "head"):
            cfg = model.get_submodule(name).cersa_config()
            setattr(shell, name, CersaLinear.from_config(cfg, device="meta"))
        shell.load_state_dict(sd, strict=True, assign=True)
        assert torch.equal(shell(IDS), model(IDS))


# ------------------------------------------------------------------------------- tied weights
def test_tied_head_stays_dense_with_the_reason():
    model = Net(tie=True)
    ids = IDS
    _conv(model, max_frozen_ratio=None)
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    row = next(l for l in get_report(model).layers if l.name == "head")
    assert row.status == "dense" and "tied to emb.weight" in row.reason
    assert {l.name for l in get_report(model).converted} == {"up", "down"}
    pc = ck.count_parameters(model)
    stored = {id(p): p.numel() for p in model.parameters()}
    assert pc.trainable + pc.frozen == sum(stored.values())  # the tied tensor once
    with pytest.raises(ValueError, match=r"head.*tied"):
        _conv(Net(tie=True), target_modules=["head"])
    model(ids)


def test_tied_lm_head_of_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        y = model(ids).logits
    _conv(model, energy=1.0, max_frozen_ratio=None)
    assert model.lm_head.weight is model.transformer.wte.weight
    rows = {l.name: l for l in get_report(model).layers}
    assert rows["lm_head"].status == "dense" and "tied" in rows["lm_head"].reason
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "CersaConv1D"
    with torch.no_grad():
        assert rel_error(model(ids).logits, y) <= 1e-4


# ----------------------------------------------------------- subclasses that override forward
def _samples():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    return {
        "CersaLinear": (nn.Linear, lambda c: c(12, 12), (5, 12)),
        "CersaConv1D": (Conv1D, lambda c: c(12, 12), (5, 12)),
        "CersaConv1d": (nn.Conv1d, lambda c: c(4, 6, 3), (2, 4, 9)),
        "CersaConv2d": (nn.Conv2d, lambda c: c(4, 6, 3), (2, 4, 9, 9)),
        "CersaConv3d": (nn.Conv3d, lambda c: c(4, 6, 3), (2, 4, 5, 5, 5)),
        "CersaMultiheadAttention": (nn.MultiheadAttention, lambda c: c(12, 2), None),
    }


def test_every_layer_type_leaves_a_forward_override_dense_and_reported():
    samples = _samples()
    assert set(samples) == set(LAYER_TYPES), "add the new layer type to this test"
    for name, (base, make, shape) in samples.items():
        def forward(self, *args, **kwargs):  # e.g. TF-style 'SAME' padding before the convolution
            return base.forward(self, *args, **kwargs)

        Sub = type(f"Same{base.__name__}", (base,), {"forward": forward})
        torch.manual_seed(0)
        model = nn.Sequential(make(Sub))
        assert LAYER_TYPES[name].claims(model[0]), name
        _conv(model, energy=1.0, max_frozen_ratio=None)
        assert type(model[0]) is Sub, name
        row = next(l for l in get_report(model).layers if l.name == "0")
        assert row.status == "dense" and "overrides" in row.reason, (name, row)
        # the same class without an override converts
        Plain = type(f"Plain{base.__name__}", (base,), {})
        model = nn.Sequential(make(Plain))
        _conv(model, energy=1.0, max_frozen_ratio=None)
        assert isinstance(model[0], LAYER_TYPES[name]), name
        merge(model)
        assert type(model[0]) is Plain, name


def test_a_forward_set_on_the_instance_is_kept_dense():
    model = Net()
    model.up.forward = lambda x: nn.functional.linear(x, model.up.weight) * 0  # e.g. accelerate's hooks
    _conv(model)
    assert type(model.up) is nn.Linear
    row = next(l for l in get_report(model).layers if l.name == "up")
    assert row.status == "dense" and "forward set on the instance" in row.reason
