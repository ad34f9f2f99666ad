"""The CLI prints the tables users ask for, and a user's mistake is one line and exit status 2."""

import re

import pytest

from reslab.cli import main


def test_summary_prints_the_stage_table(capsys):
    assert main(["summary", "resnet18"]) == 0
    out = capsys.readouterr().out
    for expected in ("56 x 56", "512 x 7 x 7", "11,689,512", "1.81G"):
        assert expected in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "resnet5"], "unknown model 'resnet5'; did you mean"),
        (["summary", "resnet18", "--input-size", "3", "0", "224"], "--input-size needs three positive"),
        (["train", "--tta-translate", "9"], "tta_translate is a shift of 0 to 4 pixels, not 9"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(args) == 2  # in this process: tests/train/test_eval_predict.py runs a real `python -m reslab`
    err = capsys.readouterr().err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1 and message in err


def test_models_table_lists_every_model(capsys):
    from reslab import list_models

    assert main(["models", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    names = re.findall(r"^\| (\S+) \|", out, flags=re.M)[1:]
    assert names == list_models()


def test_train_help_documents_every_option(capsys):
    import dataclasses

    from reslab.train import TrainConfig

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert ("--model-arg" if f.name == "model_args" else "--" + f.name.replace("_", "-")) in out
    assert "held out of the training set, stratified" in " ".join(out.split())  # the config's own comments
