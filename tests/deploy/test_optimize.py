"""The accuracy gates of the deployment copies, on a trained model and the real Fashion-MNIST test set."""

import copy

import pytest
import torch

from reslab.deploy import optimize
from reslab.errors import ReslabError
from reslab.inference import calibration_batches, compare_precisions


@pytest.fixture(scope="module")
def precisions(checkpoint_path):
    """Accuracy and top-1 agreement with the eager fp32 model of bf16 and int8 (as eval and predict run them:
    int8 calibrated on 512 training images) on all 10,000 test images."""
    return compare_precisions(checkpoint_path, ("bf16", "int8"), device="cpu")


def test_compiled_fp32_matches_eager_also_for_a_smaller_last_batch(trained):
    ckpt, model = trained
    x = calibration_batches(ckpt, images=32, batch_size=32)[0]
    fast = optimize(model, "fp32", backend="torch", compile=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast(x[:5]), model(x[:5]), atol=1e-4, rtol=1e-4)  # padded to the compiled 32
    assert fast.compiled_batch == 32 and fast(x).dtype == torch.float32


def test_auto_keeps_the_faster_of_torch_and_onnxruntime_and_it_matches_eager(trained):
    ckpt, model = trained
    x = calibration_batches(ckpt, images=24, batch_size=24)[0]
    fast = optimize(model, "fp32", backend="auto", compile=False, input_shape=(1, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert fast.backend in ("onnxruntime", "torch eager")


def test_bf16_agrees_with_fp32_on_the_test_set(precisions):
    assert precisions["eager fp32"]["accuracy"] > 0.88  # a trained model: its logits have real margins
    assert precisions["bf16"]["agreement"] >= 0.995


def test_int8_agrees_with_fp32_on_the_test_set(precisions):
    int8, fp32 = precisions["int8"], precisions["eager fp32"]
    drop = int8["accuracy_drop"]
    print(f"int8: accuracy {int8['accuracy']:.2%} against fp32 {fp32['accuracy']:.2%}, a drop of {drop:.2%}")
    assert int8["agreement"] >= 0.99, f"accuracy drop {drop:.2%}"
    assert drop < 0.01


def test_bad_requests_are_one_sentence(trained):
    _, model = trained
    with pytest.raises(ReslabError, match="precision must be one of fp32, bf16, int8"):
        optimize(model, "fp16")
    with pytest.raises(ReslabError, match="int8 needs calibration images"):
        optimize(model, "int8")
    with pytest.raises(ReslabError, match="int8 runs through ONNX Runtime"):
        optimize(model, "int8", backend="torch")
    with pytest.raises(ReslabError, match="needs the input shape"):
        optimize(model, "fp32", backend="onnxruntime")
    with pytest.raises(ReslabError, match="eval mode"):
        optimize(copy.deepcopy(model).train(), "fp32")
