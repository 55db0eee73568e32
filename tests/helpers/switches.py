"""peft_fast reads its switches (PEFT_FAST_BACKEND, PEFT_FAST_LORA_DOT) once, at import, into one settings object:
tests change that object, not the environment."""
import dataclasses


def use_settings(monkeypatch, **changes):
    """Replace peft_fast's settings for one test, e.g. use_settings(monkeypatch, backend="torch"); the monkeypatch
    puts them back."""
    from peft_fast.kernels import settings

    monkeypatch.setattr(settings, "_current", dataclasses.replace(settings.current(), **changes))
