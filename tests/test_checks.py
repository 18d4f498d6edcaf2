"""The shared value checks: what each accepts, and that each refusal names the field, the
value and what is allowed, in the same words wherever it is raised."""
import numpy as np
import pytest

from ratebp_jax import checks, layers, methods, models, neurons


@pytest.mark.parametrize("check,message", [
    (lambda: checks.check_choice("step_mode", "multy", ("multi", "single")),
     "step_mode='multy': allowed values are multi, single; did you mean 'multi'?"),
    (lambda: checks.check_choice("model", "alexnet", {"vgg11": 0, "resnet18": 0},
                                 also="an import path package.module:Factory"),
     "model='alexnet': allowed values are vgg11, resnet18, or an import path "
     "package.module:Factory"),
    (lambda: checks.check_choices("--methods", ["rate", "sgd"], ("bptt", "rate")),
     "--methods='sgd': allowed values are bptt, rate"),
    (lambda: checks.check_int("T", 0), "T=0: must be an integer >= 1"),
    (lambda: checks.check_int("T", True), "T=True: must be an integer >= 1"),
    (lambda: checks.check_int("T", 2.0), "T=2.0: must be an integer >= 1"),
    (lambda: checks.check_int("id", 2, 0, 1), "id=2: must be an integer >= 0 and <= 1"),
    (lambda: checks.check_number("lam", 1.0, 0.0, 1.0, high_open=True),
     "lam=1.0: must be a finite number in [0.0, 1.0)"),
    (lambda: checks.check_number("thresh", 0.0, 0.0, low_open=True),
     "thresh=0.0: must be a finite number > 0.0"),
    (lambda: checks.check_number("x", 2, high=1), "x=2: must be a finite number <= 1"),
    (lambda: checks.check_number("v", float("nan")), "v=nan: must be a finite number"),
    (lambda: checks.check_number("v", False), "v=False: must be a finite number"),
    (lambda: checks.check_bool("plots", 1), "plots=1: must be true or false"),
])
def test_refusal_names_the_field_the_value_and_what_is_allowed(check, message):
    with pytest.raises(ValueError) as info:
        check()
    assert str(info.value) == message


def test_accepted_values_are_returned_numpy_scalars_included():
    assert checks.check_choice("phase", "rate", layers.PHASES) == "rate"
    assert checks.check_int("step", np.int64(3), 0, 3) == 3
    assert checks.check_number("lam", np.float32(0.5), 0.0, 1.0, high_open=True) == 0.5
    assert checks.check_number("lam", 0.0, 0.0, 1.0) == 0.0
    assert checks.check_bool("plots", False) is False


@pytest.mark.parametrize("make,field,value", [
    (lambda: methods.make_grad_fn("sgd", None), "method", "sgd"),
    (lambda: layers.check_pool_ties("mean"), "pool_ties", "mean"),
    (lambda: layers.Ctx(phase="spike", step_mode="both", T=1), "step_mode", "both"),
    (lambda: neurons.NeuronConfig(surrogate="erf"), "surrogate", "erf"),
    (lambda: models.resolve("resnet50"), "model", "resnet50"),
])
def test_library_arguments_use_the_one_wording(make, field, value):
    with pytest.raises(ValueError, match=rf"^{field}='{value}': allowed values are "):
        make()
