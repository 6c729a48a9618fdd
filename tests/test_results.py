"""The sample-quality number of the results table: a small classifier of the built-in classes."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402
import train  # noqa: E402


def test_class_accuracy_is_high_on_real_images_and_chance_on_noise_or_wrong_labels():
    clf = results.train_classifier(n=2000, steps=150)
    imgs, labels = train.builtin_images(500, 32, seed=7)  # neither the classifier's seed nor the generators'
    rng = np.random.default_rng(0)
    assert results.class_accuracy(clf, imgs, labels) > 0.9
    assert results.class_accuracy(clf, train.builtin_images(200, 16, seed=7)[0], labels[:200]) > 0.85  # resized
    noise = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    assert abs(results.class_accuracy(clf, noise, rng.integers(0, 10, 500)) - 0.1) < 0.05
    assert abs(results.class_accuracy(clf, imgs, rng.permutation(labels)) - 0.1) < 0.05
    assert results.class_accuracy(clf, imgs, (labels + 1) % 10) < 0.1  # the wrong class: at most chance
