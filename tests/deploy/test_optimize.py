"""The accuracy gates of the deployment copies, on a trained model and the real Fashion-MNIST test set."""

import copy

import pytest
import torch

from reslab.deploy import optimize
from reslab.errors import ReslabError
from reslab.inference import inference_model


def _agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()


def test_compiled_fp32_matches_eager_also_for_a_smaller_last_batch(trained, fashion_test):
    _, model = trained
    x = fashion_test[0][0][:32]
    fast = optimize(model, "fp32", compile=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast(x[:5]), model(x[:5]), atol=1e-4, rtol=1e-4)  # padded to the compiled 32
    assert fast.compiled_batch == 32 and fast(x).dtype == torch.float32


def test_bf16_agrees_with_fp32_on_the_test_set(trained, fashion_test, reference_logits):
    _, model = trained
    fast = optimize(model, "bf16", compile=False)
    logits = torch.cat([fast(x) for x in fashion_test[0]])
    assert _agreement(logits, reference_logits) >= 0.995


def test_int8_agrees_with_fp32_on_the_test_set(trained, fashion_test, reference_logits):
    ckpt, _ = trained
    int8, _ = inference_model(ckpt, torch.device("cpu"), precision="int8")  # the eval/predict path: calibrated
    logits = torch.cat([int8(x) for x in fashion_test[0]])
    labels = fashion_test[1]
    accuracy = {
        name: (z.argmax(1) == labels).float().mean().item()
        for name, z in (("fp32", reference_logits), ("int8", logits))
    }
    drop = accuracy["fp32"] - accuracy["int8"]
    print(f"int8: accuracy {accuracy['int8']:.2%} against fp32 {accuracy['fp32']:.2%}, a drop of {drop:.2%}")
    assert _agreement(logits, reference_logits) >= 0.99, f"accuracy drop {drop:.2%}"
    assert drop < 0.01


def test_bad_requests_are_one_sentence(trained):
    _, model = trained
    with pytest.raises(ReslabError, match="precision must be one of fp32, bf16, int8"):
        optimize(model, "fp16")
    with pytest.raises(ReslabError, match="int8 needs calibration images"):
        optimize(model, "int8")
    with pytest.raises(ReslabError, match="eval mode"):
        optimize(copy.deepcopy(model).train(), "fp32")
