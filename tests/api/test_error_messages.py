"""Every TypeError / ValueError of a public entry point names it, names the argument,
and says the fix where there is one; a refused in-place call writes nothing.

Each test calls one public function with one bad input and checks the whole
message against the words it must hold: the public name first, then the
argument (``x``, ``arrays[1]``, ``parameters[0]``, ...), then the fix
(``np.asarray(x)``, ``.to_numpy()``, the array API instead of
``fastclip.torch``, ...).  Messages that repeat a peer's words (torch's
optimizer checks, Lightning's ``grad_norm``) are checked against the peer's
own exception.  The exception's class is checked exactly (``AxisError`` stays
``AxisError``).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from numpy.exceptions import AxisError

import fastclip
from fastclip.optim import adamw_step_, sgd_step_
from tests._backends import clipper_state, unchanged

torch = pytest.importorskip("torch")
fct = pytest.importorskip("fastclip.torch")

ARRAY_KINDS = "(NumPy, torch, CuPy or any Array API array)"


def message(exc_type: type[BaseException], call: Any, *inputs: Any) -> str:
    """The message ``call()`` raises, which must be exactly an ``exc_type``;
    ``inputs`` (arrays or tensors) must hold their old bytes afterwards."""
    with unchanged(*inputs), pytest.raises(exc_type) as info:
        call()
    assert type(info.value) is exc_type
    return str(info.value)


def f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def _param(*grad: float) -> Any:
    p = torch.zeros(len(grad), requires_grad=True)
    p.grad = torch.tensor(grad)
    return p


# ---------------------------------------------------------------- not an array


def test_numbers_for_an_array_say_np_asarray() -> None:
    text = message(TypeError, lambda: fastclip.norm([3.0, 4.0]))
    assert text.startswith(f"fastclip.norm: x must be an array {ARRAY_KINDS}, got builtins.list")
    assert text.endswith(
        "wrap numbers in an array first: np.asarray(x) (a list of arrays goes "
        "to fastclip.global_norm / clip_by_global_norm)"
    )


def test_pandas_series_says_to_numpy() -> None:
    """pandas is not a test dependency: a class from a ``pandas.*`` module stands in
    for ``pd.Series`` (the hint is chosen by the type's module)."""
    series = type("Series", (), {"__module__": "pandas.core.series"})()
    text = message(TypeError, lambda: fastclip.clip_by_norm(series, 1.0))
    assert text == (
        f"fastclip.clip_by_norm: x must be an array {ARRAY_KINDS}, got "
        "pandas.core.series.Series; pass its values: x.to_numpy()"
    )


def test_list_item_that_is_not_an_array_is_named_by_position() -> None:
    a = f32(1.0)
    text = message(TypeError, lambda: fastclip.clip_by_global_norm_([a, "g"], 1.0), a)
    assert (
        text
        == f"fastclip.clip_by_global_norm_: arrays[1] must be an array {ARRAY_KINDS}, got builtins.str"
    )
    text = message(TypeError, lambda: fastclip.global_norm(["g", a]))
    assert text.startswith("fastclip.global_norm: arrays[0] must be an array")


def test_lazily_negated_tensor_names_the_argument_and_the_fix() -> None:
    t = torch.tensor([3.0, 4.0])._neg_view()
    for call, subject in [
        (lambda: fastclip.clip_by_norm_(t, 1.0), "fastclip.clip_by_norm_: x is"),
        (
            lambda: fastclip.clip_by_global_norm_([t], 1.0),
            "fastclip.clip_by_global_norm_: arrays[0] is",
        ),
    ]:
        text = message(TypeError, call)  # (unchanged() cannot read a negated view's bytes)
        assert text.startswith(f"{subject} a lazily negated torch view")
        assert "pass t.resolve_neg().resolve_conj()" in text
        assert torch.equal(t.resolve_neg(), torch.tensor([-3.0, -4.0]))


def test_a_number_for_a_list_names_the_argument() -> None:
    text = message(TypeError, lambda: fastclip.global_norm(3))
    assert text.startswith(
        "fastclip.global_norm: arrays must be an array or an iterable of arrays, got builtins.int"
    )
    assert "np.asarray(x)" in text


def test_numpy_scalar_in_a_list_says_np_asarray() -> None:
    a = f32(1.0, 2.0)
    text = message(TypeError, lambda: fastclip.clip_by_global_norm_([a, np.float32(3.0)], 1.0), a)
    assert text.startswith(
        "fastclip.clip_by_global_norm_: arrays[1] is a NumPy scalar (float32), not an array; "
        "pass np.asarray(x) (a 0-d array) instead"
    )


def test_mixing_numpy_and_jax_names_the_real_libraries() -> None:
    jnp = pytest.importorskip("jax.numpy")
    text = message(TypeError, lambda: fastclip.global_norm([f32(1.0), jnp.ones(2)]))
    assert text == (
        "fastclip.global_norm: arrays[1] is a jax array and arrays[0] a numpy array (convert "
        "them to one library first); all arrays in one call must come from the same library, "
        "got numpy and jax"
    )


def test_mixing_torch_and_numpy_in_place_writes_nothing() -> None:
    t, a = torch.tensor([3.0, 4.0]), f32(3.0, 4.0)
    text = message(TypeError, lambda: fastclip.clip_by_global_norm_([t, a], 1.0), t, a)
    assert text.startswith(
        "fastclip.clip_by_global_norm_: arrays[1] is a numpy array and arrays[0] a torch array"
    )
    assert text.endswith("got torch and numpy")


# ------------------------------------------------------------ scalar arguments


def test_negative_max_norm() -> None:
    x = f32(3.0, 4.0)
    for name, call in [
        ("fastclip.clip_by_norm", lambda: fastclip.clip_by_norm(x, -1.0)),
        ("fastclip.clip_by_norm_", lambda: fastclip.clip_by_norm_(x, -1.0)),
        ("fastclip.clip_by_global_norm", lambda: fastclip.clip_by_global_norm([x], -1.0)),
        ("fastclip.clip_by_global_norm_", lambda: fastclip.clip_by_global_norm_([x], -1.0)),
        ("fastclip.clip_per_sample", lambda: fastclip.clip_per_sample([x.reshape(2, 1)], -1.0)),
    ]:
        assert message(ValueError, call, x) == (
            f"{name}: max_norm must be >= 0 and not NaN, got -1.0 (max_norm=math.inf means "
            "no clipping)"
        )


def test_bad_ord_says_what_ord_can_be() -> None:
    text = message(ValueError, lambda: fastclip.norm(f32(1.0), ord=-1))
    assert text == (
        "fastclip.norm: ord must be a real number p > 0 or inf (math.inf or 'inf' is the "
        "max-norm), got -1"
    )


def test_axis_out_of_range_stays_an_axis_error() -> None:
    x = f32(3.0, 4.0)
    text = message(AxisError, lambda: fastclip.normalize_(x, axis=3), x)
    assert text == "fastclip.normalize_: axis 3 is out of bounds for array of dimension 1"


def test_repeated_axis() -> None:
    x = np.ones((2, 2))
    text = message(ValueError, lambda: fastclip.clip_by_norm_(x, 1.0, axis=(0, 0)), x)
    assert text == "fastclip.clip_by_norm_: axis must not repeat an axis, got (0, 0)"


def test_no_bounds_for_clip_by_value() -> None:
    x = f32(1.0)
    text = message(ValueError, lambda: fastclip.clip_by_value_(x), x)
    assert text == "fastclip.clip_by_value_: min and max are both None: pass at least one bound"


def test_complex_item_of_clip_by_value_says_clip_by_norm() -> None:
    xs = [f32(1.0), np.ones(2, np.complex64)]
    text = message(TypeError, lambda: fastclip.clip_by_value_(xs, -1, 1), *xs)
    assert text.startswith(
        "fastclip.clip_by_value_: clip_by_value is not defined for complex arrays (they have "
        "no order); x[1] is complex64."
    )
    assert "use fastclip.clip_by_norm to bound the magnitude" in text


def test_bad_factor_of_scale_() -> None:
    x = f32(1.0)
    text = message(TypeError, lambda: fastclip.scale_([x], "2"), x)
    assert text == "fastclip.scale_: factor must be a real number or a 0-d array, got str"


def test_bad_total_norm_of_clip_coefficient() -> None:
    text = message(TypeError, lambda: fastclip.clip_coefficient("4", 1.0))
    assert (
        text == "fastclip.clip_coefficient: total_norm must be a real number or an array, got str"
    )


def test_integer_array_names_the_function_not_the_route_operation() -> None:
    """The route says which operation it runs (clip_by_global_norm for the torch
    drop-ins too); the message names the function called instead."""
    x = np.array([3, 4])
    text = message(TypeError, lambda: fastclip.norm(x), x)
    assert text == (
        "fastclip.norm: needs floating-point arrays (float16, bfloat16, float32, float64, "
        "complex); got int64"
    )
    text = message(TypeError, lambda: fastclip.clip_by_global_norm_([x], 1.0), x)
    assert text == (
        "fastclip.clip_by_global_norm_: needs floating-point arrays (float16, bfloat16, "
        "float32, float64); got int64"
    )


def test_read_only_array_says_the_out_of_place_twin() -> None:
    x = f32(3.0, 4.0)
    x.flags.writeable = False
    text = message(ValueError, lambda: fastclip.clip_by_norm_(x, 1.0), x)
    assert text == (
        "fastclip.clip_by_norm_: got a read-only array; use the out-of-place "
        "fastclip.clip_by_norm() instead"
    )


# ---------------------------------------------------------------- fastclip.optim


def test_fused_step_missing_list_is_named() -> None:
    p, m, v = [f32(1.0)], [f32(0.0)], [f32(0.0)]
    text = message(TypeError, lambda: adamw_step_(p, None, m, v, step=1), *p, *m, *v)
    assert text == "fastclip.optim.adamw_step_: grads is required"


def test_fused_step_length_mismatch() -> None:
    p, g = [f32(1.0)], [f32(1.0), f32(2.0)]
    text = message(ValueError, lambda: sgd_step_(p, g), *p, *g)
    assert text == "fastclip.optim.sgd_step_: grads has 2 arrays for 1 params"


def test_sgd_momentum_without_buffers_says_what_to_pass() -> None:
    p, g = [f32(1.0)], [f32(1.0)]
    text = message(ValueError, lambda: sgd_step_(p, g, momentum=0.9), *p, *g)
    assert text.startswith("fastclip.optim.sgd_step_: momentum != 0 needs momentum_buffers")


def test_fused_step_on_another_library_says_adaptive() -> None:
    meta = [torch.ones(2, device="meta")]
    text = message(TypeError, lambda: adamw_step_(meta, meta, meta, meta, step=1))
    assert text.startswith("fastclip.optim.adamw_step_: the parameters must be NumPy arrays")
    assert text.endswith("use the clippers of fastclip.adaptive with your own optimizer.")


def test_optimizer_arguments_are_torchs_words_after_the_name() -> None:
    with pytest.raises(ValueError) as theirs:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=-1.0)
    p = [f32(1.0)]
    text = message(ValueError, lambda: adamw_step_(p, p, [f32(0)], [f32(0)], step=1, lr=-1.0))
    assert text == f"fastclip.optim.adamw_step_: {theirs.value}"
    text = message(ValueError, lambda: fct.FusedAdamW([_param(1.0)], lr=-1.0))
    assert text == f"fastclip.torch.FusedAdamW: {theirs.value}"


# ------------------------------------------------------------- fastclip.adaptive


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: fastclip.ZClip(alpha=2),
            "fastclip.adaptive.ZClip: alpha must be a finite real number > 0 and < 1, got 2",
        ),
        (
            lambda: fastclip.AutoClip(percentile=200),
            "fastclip.adaptive.AutoClip: percentile must be a finite real number >= 0 and <= 100, got 200",
        ),
        (
            lambda: fastclip.AGC(clipping=-1),
            "fastclip.adaptive.AGC: clipping must be a finite real number > 0, got -1",
        ),
        (
            lambda: fastclip.GlobalNormClipper(max_norm=-1),
            "fastclip.adaptive.GlobalNormClipper: max_norm must be >= 0 and not NaN, got -1 (max_norm=math.inf means no clipping)",
        ),
    ],
    ids=["ZClip", "AutoClip", "AGC", "GlobalNormClipper"],
)
def test_clipper_constructor_names_its_class(make: Any, expected: str) -> None:
    assert message(ValueError, make) == expected


def test_clipper_call_names_the_method_and_grads_item() -> None:
    clipper = fastclip.ZClip()
    clipper([f32(3.0, 4.0)])  # a counted step: state to keep
    g, before = f32(1.0), clipper_state(clipper)
    for method, call in [("__call__", clipper), ("clip", clipper.clip)]:
        text = message(TypeError, lambda call=call: call([g, 2.0]), g)
        assert text.startswith(
            f"fastclip.adaptive.ZClip.{method}: grads[1] must be an array {ARRAY_KINDS}, got "
            "builtins.float; wrap numbers in an array first: np.asarray(x)"
        )
    assert clipper_state(clipper) == before


def test_load_state_dict_names_itself_once() -> None:
    clipper = fastclip.AutoClip()
    before = clipper_state(clipper)
    text = message(TypeError, lambda: clipper.load_state_dict([]))
    assert text == (
        "fastclip.adaptive.AutoClip.load_state_dict: state_dict needs a dict (what "
        ".state_dict() returns), got list"
    )
    state = fastclip.ZClip().state_dict()
    state["alpha"] = 2.0  # refused by the constructor load_state_dict calls: one name
    text = message(ValueError, lambda: fastclip.ZClip().load_state_dict(state))
    assert text == (
        "fastclip.adaptive.ZClip.load_state_dict: alpha must be a finite real number > 0 and "
        "< 1, got 2.0"
    )
    assert clipper_state(clipper) == before


# --------------------------------------------------------------- the mechanism


def test_named_error_pickles_with_its_message() -> None:
    with pytest.raises(ValueError) as info:
        fastclip.clip_by_norm(f32(1.0), -1.0)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is ValueError and str(again) == str(info.value)


def test_public_functions_keep_their_signatures_and_paths() -> None:
    import inspect

    assert list(inspect.signature(fastclip.global_norm).parameters) == [
        "arrays",
        "ord",
        "per_array",
    ]
    assert fastclip.global_norm.__module__ == "fastclip"
    assert fct.clip_grad_norm_.__module__ == "fastclip.torch"
    assert list(inspect.signature(fastclip.ZClip).parameters)[:2] == ["alpha", "z_thresh"]
