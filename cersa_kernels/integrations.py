"""Integrations with training front ends (transformers' Trainer).  Imports transformers lazily.

``CersaTrainerCallback`` makes every Trainer checkpoint reloadable with ``cersa_kernels.load``
(Trainer's own model.safetensors lacks the CERSA layer configs, so loading it needs a re-run of
the SVD through ``convert`` with the same settings).
"""
from __future__ import annotations

import os

from .io import save

__all__ = ["CersaTrainerCallback"]


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("CersaTrainerCallback needs the transformers package: pip install transformers") from exc
    return TrainerCallback


class CersaTrainerCallback(_callback_base()):
    """On every Trainer save, also write ``cersa_kernels.save(model, <checkpoint>/cersa_model.safetensors)``
    (main process only), so ``cersa_kernels.load(<checkpoint>/cersa_model.safetensors, fresh_model)``
    rebuilds the fine-tuned CERSA model without an SVD.

    Usage: ``Trainer(..., callbacks=[CersaTrainerCallback()])``.
    """

    filename = "cersa_model.safetensors"

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save(model, os.path.join(folder, self.filename))
        return control
