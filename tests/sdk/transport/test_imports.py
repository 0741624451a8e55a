"""Configs load `fedsilo.sdk.transport.settings`; they must not pay for pika or torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["fedsilo.sdk.transport.settings", "fedsilo.sdk.transport"])
def test_settings_import_without_pika_or_torch(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in ('pika', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_resolve() -> None:
    from fedsilo.sdk import transport
    from fedsilo.sdk.transport.memory import MemoryTransport

    assert transport.MemoryTransport is MemoryTransport
    with pytest.raises(AttributeError):
        transport.NoSuchTransport  # noqa: B018
