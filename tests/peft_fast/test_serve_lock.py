"""batching's lock between mixed batches in flight (readers) and adapter changes (one writer at a time): a change
interrupted while it waits does not hold later batches back, and two threads changing adapters from inside their
own batches are told so instead of waiting for each other forever. Model-level behaviour (a change waits for the
batch in flight, for every kind of change) is in test_mixed_batch.py."""
import threading
import time

import pytest

from peft_fast.batching import _ServeLock


def _serve_in_thread(lock, entered, release):
    def run():
        with lock.serving():
            entered.set()
            release.wait(timeout=30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert entered.wait(timeout=30)
    return thread


def _starts_serving_within(lock, seconds: float) -> bool:
    done = threading.Event()

    def run():
        with lock.serving():
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout=seconds)


def test_an_interrupted_change_does_not_hold_later_batches(monkeypatch):
    lock = _ServeLock()
    entered, release = threading.Event(), threading.Event()
    server = _serve_in_thread(lock, entered, release)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while set_adapter waits for the batch in flight

    monkeypatch.setattr(lock._cond, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with lock.changing():
            pass
    monkeypatch.undo()
    release.set()
    server.join(timeout=30)
    assert lock._waiting == 0 and lock._writer is None
    assert _starts_serving_within(lock, 10)
    with lock.changing():  # and a later change gets through
        pass


def test_two_batches_changing_adapters_at_once_are_refused_not_deadlocked():
    lock = _ServeLock()
    both_in, outcomes = threading.Barrier(2), {}

    def serve_then_change(name, delay):
        with lock.serving():
            both_in.wait(timeout=30)
            time.sleep(delay)  # the first waits to change; the second then finds it waiting
            try:
                with lock.changing():
                    outcomes[name] = "changed"
            except RuntimeError as e:
                outcomes[name] = str(e)

    threads = [threading.Thread(target=serve_then_change, args=(n, d), daemon=True)
               for n, d in (("first", 0.0), ("second", 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert outcomes["first"] == "changed"
    assert "wait for each other" in outcomes["second"]
    assert lock._waiting == 0 and lock._writer is None and not lock._readers


def test_a_batch_changing_adapters_beside_a_waiting_outside_change_goes_first():
    """A change from outside any batch waits for the batches; one from inside a batch then does not wait for it
    (no deadlock: the outside change is no batch of its own), and both get through."""
    lock = _ServeLock()
    entered, go_change, order = threading.Event(), threading.Event(), []

    def server():
        with lock.serving():
            entered.set()
            go_change.wait(timeout=30)
            with lock.changing():
                order.append("inside")

    def outside():
        with lock.changing():
            order.append("outside")

    s = threading.Thread(target=server, daemon=True)
    s.start()
    assert entered.wait(timeout=30)
    o = threading.Thread(target=outside, daemon=True)
    o.start()
    deadline = time.time() + 10
    while not lock._waiting and time.time() < deadline:
        time.sleep(0.01)
    go_change.set()
    s.join(timeout=30)
    o.join(timeout=30)
    assert order == ["inside", "outside"]
