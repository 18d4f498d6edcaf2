"""limits: the inputs of notebook 06 carry their label where they say (rate or order), and
the summary reads a measurement right. measure() itself runs in the notebook."""
import numpy as np
import pytest

from ratebp_jax import limits


def test_temporal_order_hides_its_label_from_every_rate():
    task = limits.temporal_order(5, n_train=400, n_test=8, seed=3)
    x, y = task.x_train, task.y_train
    assert x.shape == (400, 5, 8, 8, 2) and set(np.unique(x)) == {0.0, 1.0}
    counts = x.sum(1)  # [N, 8, 8, 2] spikes per pixel and channel
    # The classes differ in no channel's rate beyond sampling noise...
    rate_by_class = [counts[y == c].mean((0, 1, 2)) / 5 for c in (0, 1)]
    np.testing.assert_allclose(rate_by_class[0], rate_by_class[1], atol=0.01)
    # ...but in order: each channel's pulse is the step where most of its pixels spike; A's
    # comes one step before B's when the label is 0, one step after when it is 1.
    for i in range(50):
        t_a, t_b = (int(np.argmax(x[i, ..., c].sum((1, 2)))) for c in (0, 1))
        assert t_b - t_a == (1 if y[i] == 0 else -1)
        pulsed = (x[i, t_a, ..., 0] == 1) & (x[i, t_b, ..., 1] == 1)
        assert pulsed.sum() > 16  # about half of the 64 pixels, each spiking only then
        assert (counts[i][pulsed] == 1).mean() > 0.9  # the rest: noise that spiked then too


def test_rate_code_carries_the_intensity_and_static_repeats_the_image():
    static, coded = limits.static_digits(3), limits.rate_coded_digits(64, seed=1)
    assert static.x_train.shape[1:] == (3, 8, 8, 1) and static.num_classes == 10
    np.testing.assert_array_equal(static.x_train[:, 0], static.x_train[:, 2])
    intensity = limits.static_digits(1).x_train[:, 0]
    assert np.abs(coded.x_train.mean(1) - intensity).mean() < 0.03
    assert set(np.unique(coded.x_train)) == {0.0, 1.0}


def test_shuffle_time_permutes_each_sample_on_its_own():
    x = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2)
    shuffled = limits.shuffle_time(x, seed=0)
    np.testing.assert_array_equal(np.sort(shuffled, axis=1), x)
    orders = [tuple(shuffled[i, :, 0].astype(int)) for i in range(3)]
    assert len(set(orders)) > 1  # a permutation of its own for each sample


def test_summary_and_table_of_a_measurement():
    def records(*cosines):
        return [{"cosine": c, "norm_ratio": 1.0, "layers": {"a": {"cosine": c - 0.1},
                                                            "b": {"cosine": 1.0}}}
                for c in cosines]

    result = {"task": "order", "T": 4, "seeds": [0, 1],
              "bptt": {"accuracy": [1.0, 0.9], "shuffled_accuracy": [0.5, 0.5]},
              "rate": {"accuracy": [0.6, 0.7], "shuffled_accuracy": [0.6, 0.6]},
              "agreement": [records(0.9, 0.3), records(0.8, 0.1)]}
    s = limits.summarize(result)
    assert s["bptt"]["accuracy"] == pytest.approx(0.95) and s["bptt"]["range"] == (0.9, 1.0)
    assert s["bptt"]["shuffle_change"] == pytest.approx(-0.45)
    assert s["rate"]["shuffle_change"] == pytest.approx(-0.05)
    assert (s["cosine_start"], s["cosine_end"]) == pytest.approx((0.85, 0.2))
    assert s["worst_layer_cosine_end"] == pytest.approx(0.1)
    row = limits.table([s]).splitlines()[-1]
    assert row.startswith("| order | 4 | 0.950 (0.900-1.000) | 0.650 (0.600-0.700) | +0.300 |")
