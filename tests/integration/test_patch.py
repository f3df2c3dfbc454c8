"""fastclip.torch.patch() / unpatch(): torch.nn.utils routed to fastclip.torch, and back.

This file owns patch()'s contract (which attributes, exact restore, nesting,
idempotence) and its effect inside real trainers: Lightning's
``gradient_clip_val``, Hugging Face's ``Trainer(max_grad_norm=...)`` and
accelerate's ``Accelerator.clip_grad_norm_``.  Each trainer test runs the same
seeded training twice, with torch's functions and patched, and compares the
per-step losses; counting spies on fastclip's internal ``_api`` calls prove
that the patched run went through fastclip's kernels.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import pytest
import torch

import fastclip._api
import fastclip.torch as fct
from fastclip.torch import _patch

NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)
# torch's own functions, read at import, before any test patches anything
ORIGINAL = {
    (m.__name__, n): getattr(m, n)
    for m in MODULES
    for n in (*NAMES, "clip_grad_norm")
    if hasattr(m, n)
}
TORCH_CLIP = torch.nn.utils.clip_grad_norm_
TORCH_TOTAL = torch.nn.utils.get_total_norm


@pytest.fixture(autouse=True)
def _restored():
    """Every test starts and ends with torch's own functions (unpatch() whatever a
    failing test left), so one failure cannot leak into other tests."""
    assert not fct.is_patched()
    yield
    fct.unpatch()
    _assert_restored()


def _assert_restored():
    for (module, name), original in ORIGINAL.items():
        assert getattr(MODULES[module == "torch.nn.utils.clip_grad"], name) is original, name


def _assert_patched():
    expected = {n: getattr(fct, n) for n in NAMES}
    expected["clip_grad_norm"] = _patch.clip_grad_norm
    for module, name in ORIGINAL:
        got = getattr(MODULES[module == "torch.nn.utils.clip_grad"], name)
        assert got is expected[name], (module, name)


class Spy:
    """Counts calls of one of fastclip's internal ``_api`` functions (installed with
    monkeypatch, so the fastclip.torch functions, which look ``_api.<name>`` up at
    each call, go through it) and keeps what it returned."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        self.results = []
        real = getattr(fastclip._api, name)

        def spy(*args, **kwargs):
            self.calls += 1
            result = real(*args, **kwargs)
            self.results.append(result)
            return result

        monkeypatch.setattr(fastclip._api, name, spy)


def _model_with_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    (model(torch.randn(10, 6)).square().sum() * 3).backward()
    return model


def _grads(model):
    return [p.grad for p in model.parameters()]


# -- the contract ------------------------------------------------------------------------


def test_patch_replaces_every_name_and_unpatch_restores_the_same_objects():
    # the installed torch (2.13) has the four names in torch.nn.utils and, in
    # clip_grad, clip_grad_norm_, clip_grad_value_ and the deprecated clip_grad_norm
    assert set(ORIGINAL) >= {("torch.nn.utils", n) for n in (*NAMES, "clip_grad_norm")}
    assert ("torch.nn.utils.clip_grad", "clip_grad_norm_") in ORIGINAL
    handle = fct.patch()
    assert isinstance(handle, _patch.PatchHandle)
    assert fct.is_patched()
    _assert_patched()
    fct.unpatch()
    assert not fct.is_patched()
    _assert_restored()
    fct.unpatch()  # unpatched: nothing to do
    _assert_restored()


def test_patch_is_idempotent():
    fct.patch()
    fct.patch()  # must not save fastclip's functions as the "originals"
    _assert_patched()
    assert len(_patch._originals) == len(ORIGINAL)
    fct.unpatch()  # one unpatch undoes any number of plain patch() calls
    assert not fct.is_patched()
    _assert_restored()


def test_context_manager_restores_on_exit_and_on_exception():
    with fct.patch() as handle:
        assert isinstance(handle, _patch.PatchHandle)
        _assert_patched()
    _assert_restored()
    with pytest.raises(KeyError, match="boom"), fct.patch():
        _assert_patched()
        raise KeyError("boom")
    assert not fct.is_patched()
    _assert_restored()


def test_nested_blocks_are_counted():
    with fct.patch():
        with fct.patch():
            _assert_patched()
        _assert_patched()  # the outer block still holds the patch
        assert len(_patch._originals) == len(ORIGINAL)
    _assert_restored()


def test_blocks_closing_out_of_order():
    a, b = fct.patch(), fct.patch()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first block ends while the second is open
    _assert_patched()
    b.__exit__(None, None, None)
    _assert_restored()


def test_plain_patch_outlives_a_block_and_unpatch_inside_a_block():
    fct.patch()
    with fct.patch():
        _assert_patched()
    _assert_patched()  # the plain call is still in force
    fct.unpatch()
    _assert_restored()
    with fct.patch():
        fct.unpatch()  # at once, inside the block
        _assert_restored()
        fct.patch()  # a new plain patch inside the block ...
    _assert_patched()  # ... outlives the first patching's block exit
    fct.unpatch()


def test_a_handle_is_entered_once():
    handle = fct.patch()
    with handle, pytest.raises(RuntimeError, match="entered once"):
        handle.__enter__()
    _assert_restored()


def test_threads_patching_and_unpatching():
    errors = []

    def work():
        try:
            for _ in range(200):
                with fct.patch():
                    assert torch.nn.utils.clip_grad_norm_ is fct.clip_grad_norm_
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_restored()


# -- patched calls are fastclip's -----------------------------------------------------


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_patched_clip_grad_norm_matches_torch_and_runs_fastclip(monkeypatch, module):
    ours, theirs = _model_with_grads(), _model_with_grads()
    spy = Spy(monkeypatch, "clip_by_global_norm_")
    expected = TORCH_CLIP(theirs.parameters(), max_norm=0.5)
    assert float(expected) > 0.5  # the clip is active
    with fct.patch():
        total = module.clip_grad_norm_(ours.parameters(), max_norm=0.5)
    assert spy.calls == 1  # fastclip's fused norm-and-clip ran
    assert total.dtype == expected.dtype == torch.float32
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(spy.results[0]), float(expected), rtol=1e-6)
    for a, b in zip(_grads(ours), _grads(theirs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    # and no longer after unpatching
    TORCH_CLIP(ours.parameters(), max_norm=0.5)
    assert spy.calls == 1


def test_patched_value_total_and_with_norm_run_fastclip(monkeypatch):
    spies = {n: Spy(monkeypatch, n) for n in ("clip_values_", "global_norm", "scale_")}
    ours, theirs = _model_with_grads(), _model_with_grads()
    with fct.patch():
        torch.nn.utils.clip_grad_value_(ours.parameters(), 0.05)
        total = torch.nn.utils.get_total_norm(_grads(ours))
        torch.nn.utils.clip_grads_with_norm_(ours.parameters(), 0.1, total)
    assert {n: s.calls for n, s in spies.items()} == {
        "clip_values_": 1,
        "global_norm": 1,
        "scale_": 1,
    }
    ORIGINAL["torch.nn.utils", "clip_grad_value_"](theirs.parameters(), 0.05)
    expected = TORCH_TOTAL(_grads(theirs))
    ORIGINAL["torch.nn.utils", "clip_grads_with_norm_"](theirs.parameters(), 0.1, expected)
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    assert float(expected) > 0.1
    for a, b in zip(_grads(ours), _grads(theirs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_patched_errors_are_fastclip_s():
    model = _model_with_grads()
    before = [g.clone() for g in _grads(model)]
    with fct.patch():
        with pytest.raises(ValueError, match="max_norm"):  # torch would flip the signs
            torch.nn.utils.clip_grad_norm_(model.parameters(), -1.0)
        with pytest.raises(ValueError, match="clip_value"):
            torch.nn.utils.clip_grad_value_(model.parameters(), -1.0)
        model[0].weight.grad[0, 0] = float("nan")
        with pytest.raises(fastclip.NonFiniteNormError) as info:
            torch.nn.utils.clip_grad_norm_(model, 1.0, error_if_nonfinite=True)
    assert list(info.value.names) == ["0.weight"]  # fastclip's extra: the culprit's name
    for g, b in zip(_grads(model)[1:], before[1:]):
        assert torch.equal(g, b)  # raised before any write


def test_patched_deprecated_clip_grad_norm_warns_as_torch_and_runs_fastclip(monkeypatch):
    ours, theirs = _model_with_grads(), _model_with_grads()
    spy = Spy(monkeypatch, "clip_by_global_norm_")
    with pytest.warns(FutureWarning, match="deprecated") as torch_warning:
        expected = ORIGINAL["torch.nn.utils", "clip_grad_norm"](theirs.parameters(), 0.5)
    with fct.patch(), pytest.warns(FutureWarning, match="deprecated") as ours_warning:
        total = torch.nn.utils.clip_grad_norm(ours.parameters(), 0.5)
    assert str(ours_warning[0].message) == str(torch_warning[0].message)
    assert ours_warning[0].filename == __file__  # points at the caller, as torch's
    assert spy.calls == 1
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


# -- real trainers ---------------------------------------------------------------------

CLIP = 0.5


@contextlib.contextmanager
def _lightning_warnings():
    """Lightning 2.6's warnings on torch 2.13 that are not about clipping."""
    with warnings.catch_warnings():
        # its advice about DataLoader workers (PossibleUserWarning, a UserWarning)
        warnings.filterwarnings(
            "ignore", message=".*does not have many workers", category=UserWarning
        )
        # lightning.pytorch.utilities._pytree builds torch's deprecated LeafSpec
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        yield


def _fit(make_model, **clipping):
    """5 Lightning steps of ``make_model()`` (built after the data, from the same
    seed) on the CPU, on fixed data with large targets (large gradients),
    quietly; ``clipping``: the Trainer's clip arguments.  Returns the model."""
    pl = pytest.importorskip("lightning.pytorch")
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = (x.sum(1, keepdim=True) * 3) ** 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = make_model()
    trainer = pl.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **clipping,
    )
    with _lightning_warnings():
        trainer.fit(model, loader)
    return model


def _lightning_run(algorithm, patched=False, clip=CLIP):
    """Five Lightning steps; the losses, each step's gradient norm before the clip and
    its largest gradient element (absolute)."""
    pl = pytest.importorskip("lightning.pytorch", reason="Lightning is in the test extra")

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            )
            self.losses, self.norms, self.maxabs = [], [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def on_before_optimizer_step(self, optimizer):  # Lightning clips after this hook
            grads = [p.grad for p in self.parameters()]
            self.norms.append(float(TORCH_TOTAL(grads)))
            self.maxabs.append(max(float(g.abs().max()) for g in grads))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = dict(gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    if patched:
        with fct.patch():
            model = _fit(Net, **kw)
    else:
        model = _fit(Net, **kw)
    return model.losses, model.norms, model.maxabs


def test_lightning_gradient_clip_val_norm_runs_fastclip(monkeypatch):
    losses_torch, norms, _ = _lightning_run("norm")
    spy = Spy(monkeypatch, "clip_by_global_norm_")
    losses_fast, norms_fast, _ = _lightning_run("norm", patched=True)
    assert len(losses_torch) == 5
    assert min(norms) > CLIP and min(norms_fast) > CLIP  # the clip is active at every step
    assert spy.calls == 5  # fastclip's clip_grad_norm_ clipped each step
    np.testing.assert_allclose(losses_fast, losses_torch, rtol=1e-6)
    np.testing.assert_allclose([float(t) for t in spy.results], norms_fast, rtol=1e-6)
    _assert_restored()


def test_lightning_gradient_clip_val_value_runs_fastclip(monkeypatch):
    losses_torch, _, maxabs = _lightning_run("value", clip=0.05)
    spy = Spy(monkeypatch, "clip_values_")
    losses_fast, _, maxabs_fast = _lightning_run("value", patched=True, clip=0.05)
    assert spy.calls == 5
    assert min(maxabs) > 0.05 and min(maxabs_fast) > 0.05  # the clamp is active every step
    np.testing.assert_allclose(losses_fast, losses_torch, rtol=1e-6)


def test_lightning_recipe_configure_gradient_clipping_and_grad_norm(monkeypatch):
    """The recipe: clip with fastclip.torch.clip_grad_norm_ in configure_gradient_clipping,
    log fastclip.torch.grad_norm in on_before_optimizer_step; same training as torch's
    gradient_clip_val, and grad_norm's dicts equal Lightning's."""
    pl = pytest.importorskip("lightning.pytorch", reason="Lightning is in the test extra")
    from lightning.pytorch.utilities import grad_norm as lightning_grad_norm

    losses_torch, _, _ = _lightning_run("norm")
    spy = Spy(monkeypatch, "clip_by_global_norm_")
    dicts = []

    class Recipe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            )
            self.losses = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def on_before_optimizer_step(self, optimizer):
            dicts.append((fct.grad_norm(self, norm_type=2), lightning_grad_norm(self, norm_type=2)))

        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            fct.clip_grad_norm_(self.parameters(), max_norm=CLIP)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = _fit(Recipe)
    assert spy.calls == 5
    np.testing.assert_allclose(model.losses, losses_torch, rtol=1e-6)
    assert len(dicts) == 5
    for ours, theirs in dicts:
        assert list(ours) == list(theirs)
        assert "grad_2.0_norm_total" in ours and "grad_2.0_norm/net.0.weight" in ours
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype
            np.testing.assert_allclose(float(ours[key]), float(theirs[key]), rtol=1e-6)
        assert float(ours["grad_2.0_norm_total"]) > CLIP


class TinyRegressor(torch.nn.Module):
    """A model for transformers.Trainer: returns {"loss": ...} as its models do."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def forward(self, x, labels=None):
        out = self.body(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 6, generator=g)
        self.y = (self.x.sum(1, keepdim=True) * 3) ** 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_run(tmp_path, patched):
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        max_grad_norm=0.1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    torch.manual_seed(0)
    trainer = transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=Rows())
    if patched:
        with fct.patch():
            trainer.train()
    else:
        trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return [e["loss"] for e in logs], [e["grad_norm"] for e in logs]


def test_transformers_trainer_max_grad_norm_runs_fastclip(monkeypatch, tmp_path):
    losses_torch, norms_torch = _hf_run(tmp_path / "torch", patched=False)
    # accelerate's clip_grad_norm_ calls torch.nn.utils.get_total_norm and
    # clip_grads_with_norm_ (imported inside the function): fastclip's, patched
    totals = Spy(monkeypatch, "global_norm")
    scales = Spy(monkeypatch, "scale_")
    losses_fast, norms_fast = _hf_run(tmp_path / "fast", patched=True)
    assert len(losses_torch) == 4
    assert min(norms_torch) > 0.1  # max_grad_norm=0.1 clips every step
    assert totals.calls >= 4 and scales.calls >= 4
    np.testing.assert_allclose(losses_fast, losses_torch, rtol=1e-6)
    np.testing.assert_allclose(norms_fast, norms_torch, rtol=1e-6)
    _assert_restored()


def test_accelerate_clip_grad_norm_runs_fastclip(monkeypatch):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is in the test extra")
    accelerator = accelerate.Accelerator(cpu=True)
    ours, theirs = _model_with_grads(), _model_with_grads()
    totals = Spy(monkeypatch, "global_norm")
    scales = Spy(monkeypatch, "scale_")
    expected = TORCH_CLIP(theirs.parameters(), 1.0)
    assert float(expected) > 1.0
    with fct.patch():
        total = accelerator.clip_grad_norm_(ours.parameters(), 1.0)
    assert (totals.calls, scales.calls) == (1, 1)
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)
    for a, b in zip(_grads(ours), _grads(theirs)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
