"""Deferred interrupts: a signal inside the section sets a flag, the section completes, then KeyboardInterrupt.

Signals are raised with `signal.raise_signal` (to this thread, its Python handler run before the call returns;
`os.kill` of the own process may reach another thread). The tests install the handler they expect to find first: a
shell starts a background job (`make test &`) with SIGINT ignored, and an ignored signal stays ignored."""

from __future__ import annotations

import signal

import pytest

from kvpolicy.signals import deferred_interrupts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_waits_for_the_end_of_the_section(sig):
    before = signal.signal(sig, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with deferred_interrupts() as requested:
                assert not requested()
                signal.raise_signal(sig)
                assert requested()
                done.append("the rest of the section")
        assert done == ["the rest of the section"]
        assert signal.getsignal(sig) is signal.default_int_handler
    finally:
        signal.signal(sig, before)


def test_no_signal_no_interrupt_and_an_ignored_signal_stays_ignored():
    with deferred_interrupts() as requested:
        pass
    assert not requested()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_interrupts() as requested:
            signal.raise_signal(signal.SIGTERM)
        assert not requested()
    finally:
        signal.signal(signal.SIGTERM, previous)
