"""A learnable synthetic image set: oriented gratings per class, random phase, pixel noise.

Class c is a sinusoidal grating with its own orientation (classes evenly spread over 180 degrees),
spatial frequency and colour. Every image draws a random phase, so neither the mean image nor any
single pixel tells the classes apart (a linear model on raw pixels stays near chance); a small
convolutional network picks up orientation and frequency within a few epochs. Per-image jitter of
orientation, frequency and contrast plus Gaussian pixel noise (`noise`, relative to the grating's
amplitude) keep the task from being trivial. Everything is drawn from generators seeded by `seed`.
"""

from __future__ import annotations

import numpy as np

# Pixel = MID + SCALE * (grating + noise), clipped to 0..255: the nominal mean and spread of the set.
MID = 127.5
SCALE = 48.0
# Per-image orientation jitter as a fraction of the angular gap between neighbouring classes.
ORIENTATION_JITTER = 0.25


def _class_patterns(rng: np.random.Generator, num_classes: int, channels: int) -> dict[str, np.ndarray]:
    orientation = np.pi * np.arange(num_classes) / num_classes + rng.uniform(0, np.pi / num_classes)
    frequency = rng.uniform(1.5, 4.5, size=num_classes)  # cycles per image width
    colour = rng.uniform(0.5, 1.0, size=(num_classes, channels)) * rng.choice([-1.0, 1.0], size=(num_classes, channels))
    return {"orientation": orientation, "frequency": frequency, "colour": colour}


def generate(count: int, num_classes: int, image_size: int, channels: int, noise: float, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images (uint8, N x H x W x C) and labels (int64), balanced over classes.

    Class patterns depend on `seed` only; `stream` separates the draws of different splits
    (train and test share the classes but not the images).
    """
    patterns = _class_patterns(np.random.default_rng([seed, 0]), num_classes, channels)
    rng = np.random.default_rng([seed, 1 + stream])
    labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)

    gap = np.pi / num_classes
    theta = patterns["orientation"][labels] + rng.uniform(-ORIENTATION_JITTER, ORIENTATION_JITTER, count) * gap
    freq = patterns["frequency"][labels] * rng.uniform(0.9, 1.1, count)
    phase = rng.uniform(0, 2 * np.pi, count)
    contrast = rng.uniform(0.7, 1.3, count)

    coords = np.arange(image_size) / image_size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    along = np.cos(theta)[:, None, None] * x + np.sin(theta)[:, None, None] * y  # N x H x W
    wave = contrast[:, None, None] * np.cos(2 * np.pi * freq[:, None, None] * along + phase[:, None, None])
    signal = wave[..., None] * patterns["colour"][labels][:, None, None, :]  # N x H x W x C
    pixels = MID + SCALE * (signal + noise * rng.standard_normal(signal.shape))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels
