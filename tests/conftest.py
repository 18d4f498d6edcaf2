"""Shared fixtures: tiny models and batches, and a gradient comparison helper."""
import jax
import jax.numpy as jnp
import pytest

from ratebp_jax import methods, models, neurons

IMAGE_SIZE = 8

# Test data is drawn with the non-partitionable threefry, which XLA:CPU compiles several
# times faster (models.create_model does the same for weights).
jax.config.update("jax_threefry_partitionable", False)


def tiny_setup(name, *, reset="soft", batch=4, num_classes=5, seed=0, image_size=IMAGE_SIZE,
               **model_options):
    """A tiny model, split, and a random batch with inputs large enough to make spikes.
    ``model_options`` (e.g. ``pool_ties``) go to ``models.create_model``."""
    in_channels = 2 if name == "vggsnn_dvs" else 3
    model = models.create_model(name, num_classes=num_classes, in_channels=in_channels,
                                image_size=image_size, neuron=neurons.NeuronConfig(reset=reset),
                                seed=seed, **model_options)
    net, params, batch_stats = methods.split_model(model)
    key_x, key_y = jax.random.split(jax.random.key(seed + 1))
    batch_data = {
        "image": 2.0 * jax.random.normal(key_x, (batch, image_size, image_size, in_channels)),
        "label": jax.random.randint(key_y, (batch,), 0, num_classes),
    }
    return net, params, batch_stats, batch_data


def grads_of(method, net, params, batch_stats, batch, **kwargs):
    return jax.jit(methods.make_grad_fn(method, net, **kwargs))(params, batch_stats, batch)


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def rel_err(a, b):
    return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


@pytest.fixture(params=sorted(set(models.TINY.values())))
def tiny_name(request):
    return request.param
