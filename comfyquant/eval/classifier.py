"""A digit classifier trained on the real digits (sklearn MLP), used for sample class accuracy and as the
feature extractor of the Frechet distance (its hidden-layer activations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from comfyquant.eval.data import Digits, to_classifier_features


@dataclass
class DigitClassifier:
    """A fitted ``MLPClassifier`` on 8x8 inputs (0..16) that went through the 32x32 round trip."""

    model: object
    hidden: int

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer (ReLU) activations for 32x32 images in [-1, 1], ``[B, hidden]``."""
        return self._hidden(to_classifier_features(images))

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.model.predict(to_classifier_features(images))  # type: ignore[attr-defined]

    def _hidden(self, x: np.ndarray) -> np.ndarray:
        m = self.model
        return np.maximum(x @ m.coefs_[0] + m.intercepts_[0], 0.0)  # type: ignore[attr-defined]


def train_classifier(digits: Digits, seed: int = 0, hidden: int = 64) -> DigitClassifier:
    """Fit on all real digits after the same up/down-sampling the samples go through (about a second)."""
    from sklearn.neural_network import MLPClassifier

    x = to_classifier_features(digits.images)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=600, random_state=seed, alpha=1e-3)
    clf.fit(x, digits.labels.numpy())
    return DigitClassifier(clf, hidden)


def holdout_accuracy(digits: Digits, seed: int = 0) -> float:
    """Accuracy on a held-out quarter of the real digits: how much the classifier's verdict is worth."""
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x = to_classifier_features(digits.images)
    xtr, xte, ytr, yte = train_test_split(x, digits.labels.numpy(), test_size=0.25, random_state=seed)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed, alpha=1e-3).fit(xtr, ytr)
    return float(clf.score(xte, yte))
