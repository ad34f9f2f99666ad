import pytest

from tests.data.fixtures import write_mnist_like


@pytest.fixture(scope="session")
def tiny_fashion(tmp_path_factory):
    """A learnable Fashion-MNIST-format dataset: 640 training and 80 test images, 10 classes."""
    return write_mnist_like(tmp_path_factory.mktemp("tiny-fashion"), n_train=640, n_test=80)


@pytest.fixture
def tiny_config(tiny_fashion, tmp_path):
    """A ResNet-8 (one block per stage) that trains an epoch on the tiny dataset in about a second."""
    from reslab.train import TrainConfig

    def make(**overrides):
        values = dict(
            model="resnet20",
            model_args={"layers": [1, 1, 1]},
            dataset="fashion-mnist",
            data_dir=str(tiny_fashion),
            download=False,
            epochs=3,
            batch_size=32,
            lr=0.05,
            schedule="cosine",
            device="cpu",
            quiet=True,
            out_dir=str(tmp_path / "run"),
            crop_padding=2,
            eval_batch_size=64,
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make
