"""DigitsPipeline refuses class labels that are not integers instead of coercing them.

Issue 10 ("no mismatch runs silently"): ``torch.as_tensor(labels, dtype=torch.long)`` turned ``True`` into
class 1 and ``3.7`` into class 3. Refusals happen before any sampling, so those tests cost nothing; the
valid-input test samples 2 steps of the tiny digits model (conftest ``tiny_digits``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

EXPECTED = "expected Python ints or an integer tensor"


def sample(pipe, labels):
    return pipe(labels, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(7)).samples


def test_integer_labels_of_every_accepted_kind_sample_the_same(tiny_digits):
    pipe = tiny_digits.pipe
    ref = sample(pipe, [3, 0, 9])
    # the same labels, the same batch of 3, the same generator: the same operations on the same shapes
    for labels in ([np.int64(3), np.int32(0), np.uint8(9)], (3, 0, 9), np.array([3, 0, 9]),
                   torch.tensor([3, 0, 9]), torch.tensor([3, 0, 9], dtype=torch.int32), [torch.tensor(3), 0, 9]):
        assert torch.equal(sample(pipe, labels), ref), labels


@pytest.mark.parametrize("labels,message", [
    (True, "class label True is a bool, not a class index: " + EXPECTED),
    ([1, True], "class label True is a bool, not a class index: " + EXPECTED),
    ([np.bool_(False)], f"class label {np.bool_(False)!r} is a bool, not a class index: " + EXPECTED),  # numpy 1 vs 2 repr
    ([3.7], "class label 3.7 is not an integer: " + EXPECTED),
    ([1, 2.0], "class label 2.0 is not an integer: " + EXPECTED),
    ([np.float32(4.0)], f"class label {np.float32(4.0)!r} is not an integer: " + EXPECTED),
    (["3"], "class label '3' is not an integer: " + EXPECTED),
    ([None], "class label None is not an integer: " + EXPECTED),
    (torch.tensor([True, False]), "class labels: a torch.bool tensor is refused (first label True): " + EXPECTED),
    (torch.tensor([1.0, 2.0]), "class labels: a torch.float32 tensor is refused (first label 1.0): " + EXPECTED),
    ([torch.tensor(2.5)], "class labels: a torch.float32 tensor is refused (first label 2.5): " + EXPECTED),
    (np.array([1.5, 2.0]), "class labels: a numpy float64 array is refused (first label 1.5): " + EXPECTED),
    (np.array([True]), "class labels: a numpy bool array is refused (first label True): " + EXPECTED),
])
def test_non_integer_labels_are_refused(tiny_digits, labels, message):
    calls = []
    pipe = tiny_digits.pipe
    with pytest.raises(ValueError) as exc:
        pipe(labels, num_inference_steps=2, callback=lambda i, n: calls.append(i))
    assert str(exc.value) == message
    assert "\n" not in message
    assert calls == []  # refused before sampling


def test_out_of_range_labels_are_still_refused(tiny_digits):
    with pytest.raises(ValueError, match=r"class label 10 is out of range: this model has classes 0\.\.9"):
        tiny_digits.pipe(torch.tensor([1, 10]), num_inference_steps=2)
