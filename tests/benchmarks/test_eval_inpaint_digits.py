"""`benchmarks/eval_inpaint_digits.py`: it judges with eval_digits.py's classifier, and runs on a tiny model."""

import json

import numpy as np

from benchmarks import eval_inpaint_digits
from benchmarks.benchmarking_utils import DigitsEvaluator, digit_splits
from tests.testing_utils import make_tiny_pipeline


def test_test_digits_are_the_held_out_half_of_the_eval_digits_classifier():
    evaluator = DigitsEvaluator()
    images, labels = digit_splits(evaluator)
    assert images.shape == (899, 8, 8) and images.dtype == np.float32 and 0 <= images.min() < images.max() <= 1
    np.testing.assert_array_equal(labels, evaluator.labels[evaluator.half_b])
    # The same classifier: its accuracy on the held-out half is the one eval_digits.py reports.
    accuracy = (eval_inpaint_digits.predict(evaluator, images) == labels).mean()
    assert accuracy == evaluator.heldout_accuracy > 0.9
    # Images at twice the size are block-averaged back to 8x8.
    doubled = images[:50].repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_array_equal(
        eval_inpaint_digits.predict(evaluator, doubled), eval_inpaint_digits.predict(evaluator, images[:50])
    )


def test_command_line_on_a_tiny_random_model(tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(folder)
    argv = [
        "--model", str(folder), "--num-images", "6", "--guidance-scales", "1", "--num-inference-steps", "2",
        "--num-diffusion-steps", "3", "--output-json", str(tmp_path / "results.json"),
    ]  # fmt: skip
    results = eval_inpaint_digits.main(argv)
    assert json.loads((tmp_path / "results.json").read_text())["completions"] == 2 * 6 * 3
    assert results["sampling"]["num_diffusion_steps"] == 3 and sorted(results["halves"]) == ["bottom", "left"]
    assert "| bottom | 1 |" in capsys.readouterr().out
