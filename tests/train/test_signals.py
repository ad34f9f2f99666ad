"""StopSignals: the first SIGTERM / SIGINT asks for a stop after the step; a later one stops at once."""

import signal

import pytest

from reslab.train.signals import StopSignals


def test_first_signal_requests_a_stop_a_repeat_is_the_same_stop_a_later_one_stops_now(monkeypatch):
    said = []
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(announce=said.append) as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested == signal.SIGTERM and signals.name == "SIGTERM" and len(said) == 1
        signal.raise_signal(signal.SIGINT)  # torchrun forwards a terminal's Ctrl-C: the same stop, twice
        assert signals.requested == signal.SIGTERM
        monkeypatch.setattr(StopSignals, "REPEAT_SECONDS", 0.0)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the user insists
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handlers are back
