"""The MNIST class-pair label noise (--noise-type mnist-pairs): 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1, the
given fraction of each source class, the other classes untouched."""
import pytest
import torch

try:  # where the corruption code lives (mlkd_fast.train is being split into modules)
    from mlkd_fast.train import corruption as D
except ImportError:
    from mlkd_fast.train import data as D
from mlkd_fast.train.cli import parse_args


def test_mnist_pairs_flip_exactly_the_fraction_of_each_source_class_to_its_pair():
    y = torch.arange(10).repeat_interleave(torch.arange(20, 30))  # classes of 20..29 samples
    noisy, flipped = D.add_label_noise(y, 0.4, 10, seed=3, kind="mnist-pairs")
    pairs = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}
    for c in range(10):
        in_class = y == c
        expected = round(0.4 * int(in_class.sum())) if c in pairs else 0
        assert int(flipped[in_class].sum()) == expected
        if c in pairs:
            assert bool((noisy[in_class & flipped] == pairs[c]).all())
    assert torch.equal(noisy[~flipped], y[~flipped])
    assert bool((noisy[flipped] != y[flipped]).all())
    again, _ = D.add_label_noise(y, 0.4, 10, seed=3, kind="mnist-pairs")
    other, _ = D.add_label_noise(y, 0.4, 10, seed=4, kind="mnist-pairs")
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_mnist_pairs_needs_ten_classes_and_reaches_the_cli():
    with pytest.raises(ValueError, match="10 classes"):
        D.add_label_noise(torch.arange(5), 0.2, 5, seed=0, kind="mnist-pairs")
    args = parse_args(["--data", "digits", "--label-noise", "0.4", "--noise-type", "mnist-pairs"])
    assert args.noise_type == "mnist-pairs"


def test_the_help_of_noise_type_says_what_mnist_pairs_does():
    from mlkd_fast.train.cli import build_parser

    action = next(a for a in build_parser()._actions if "--noise-type" in a.option_strings)
    assert "mnist-pairs" in action.choices
    assert "mnist-pairs:" in action.help and "2->7, 3->8, 5<->6, 7->1" in action.help
