"""mdp_train under amp: the loss kernels get bf16 features (README, Triton fp32 policy), not
the fp32 that ``F.normalize`` returns under autocast. CPU bf16 autocast stands in for CUDA's."""
import pytest
import torch

import mdp_kernels as mk
from mdp_kernels import modules
import train_fixtures as fx
from mdp_train.trainer import Trainer


@pytest.mark.parametrize("kind,extra", [("mdp", ()), ("pixel", ("mix.mixup=0",))])
def test_amp_feeds_bf16_to_the_losses(tmp_path, monkeypatch, kind, extra):
    tr = Trainer(fx.tiny_config(tmp_path, tmp_path / "run", f"loss.kind={kind}", *extra))
    tr.amp = True  # on a GPU only (config train.amp); forced here on CPU
    forward = tr.model.forward
    # CUDA autocast runs F.normalize's norm in fp32, so the embeddings come out fp32 there
    # (CPU autocast keeps bf16): the query outputs as on a GPU
    tr.model.forward = lambda *a, **k: {n: t.float() for n, t in forward(*a, **k).items()}
    seen = {}

    def spy(name, fn):
        def call(*a, **k):
            seen[name] = [t.dtype for t in a
                          if isinstance(t, torch.Tensor) and t.is_floating_point()]
            return fn(*a, **k)
        return call

    for name in ("prototype_consistency_loss", "pixel_contrast_loss"):  # what trainer calls
        monkeypatch.setattr(mk, name, spy(name, getattr(mk, name)))
    monkeypatch.setattr(modules, "prototype_contrast_loss",  # what the criterion calls
                        spy("prototype_contrast_loss", modules.prototype_contrast_loss))
    m = tr.train_step(next(iter(tr.loader())))
    want = ({"prototype_contrast_loss", "prototype_consistency_loss"} if kind == "mdp"
            else {"pixel_contrast_loss"})
    assert set(seen) == want
    for name, dtypes in seen.items():
        assert dtypes and all(dt == torch.bfloat16 for dt in dtypes), (name, dtypes)
    assert torch.isfinite(torch.tensor(m["loss"]))
