"""Model zoo: parameter counts at the real sizes (via eval_shape, no compute) and shapes."""
import jax
import numpy as np
import pytest
from flax import nnx

from ratebp_jax import analysis, layers, models

# Counted from the reference PyTorch architectures' layer shapes (weights, biases, BN affine).
REFERENCE_PARAM_COUNTS = {
    ("resnet18", 10, 3, 32): 11_173_962,
    ("resnet18", 100, 3, 32): 11_220_132,
    ("resnet19", 10, 3, 32): 12_697_994,
    ("vgg11", 10, 3, 32): 11_001_354,
    ("vgg13", 10, 3, 32): 9_416_010,
    ("vggsnn_cifar", 10, 3, 32): 9_272_074,
    ("vggsnn_dvs", 10, 2, 48): 9_271_498,
    ("sew_resnet34", 1000, 3, 224): 21_806_184,
    ("preact_resnet34", 1000, 3, 224): 21_806_184,
}


def abstract_model(name, num_classes, in_channels, image_size):
    return nnx.eval_shape(lambda: models.create_model(
        name, num_classes=num_classes, in_channels=in_channels, image_size=image_size))


@pytest.mark.parametrize("key", sorted(REFERENCE_PARAM_COUNTS))
def test_param_count_matches_reference_architecture(key):
    model = abstract_model(*key)
    assert analysis.param_count(nnx.state(model, nnx.Param)) == REFERENCE_PARAM_COUNTS[key]


@pytest.mark.parametrize("name,num_classes,in_channels,image_size", [
    ("resnet18", 10, 3, 32), ("vggsnn_dvs", 10, 2, 48), ("sew_resnet34", 1000, 3, 224)])
def test_real_size_forward_shapes(name, num_classes, in_channels, image_size):
    """Real shapes through both phases, abstractly: logits are [N, K]."""
    from ratebp_jax import methods
    model = abstract_model(name, num_classes, in_channels, image_size)
    net, params, stats = methods.split_model(model)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, in_channels), np.float32)
    labels = jax.ShapeDtypeStruct((2,), np.int32)
    (loss, aux), grads = jax.eval_shape(methods.make_grad_fn("rate", net, T=2),
                                        params, stats, {"image": images, "label": labels})
    assert aux["logits"].shape == (2, num_classes)
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, params)


def test_batchnorm_follows_the_reference_conventions():
    bn = layers.BatchNorm(3)
    assert bn.eps == 1e-5 and bn.momentum == 0.1  # PyTorch's 0.1 is Flax's 0.9


def test_vgg_weights_are_normal_with_std_half():
    model = models.create_model("vgg11")
    kernel = np.asarray(model.features[2].conv.kernel[...])
    assert abs(kernel.std() - 0.5) < 0.01 and abs(kernel.mean()) < 0.01


def test_unknown_model_lists_allowed_names():
    with pytest.raises(ValueError, match="model='resnet50'.*resnet18"):
        models.create_model("resnet50")
