"""Silence third-party progress bars around fedsilo's own calls into those libraries.

Why: transformers ("Loading weights", "Writing model shards"), its GGUF reader ("Converting
and de-quantizing GGUF tensors...") and datasets draw tqdm bars on stderr, which break
`--log-json` output and garble fedsilo's own bars. fedsilo reports its own progress, so
inside `quiet_progress_bars()` theirs are off; each library's own setting is restored on
exit, so a program that imports fedsilo keeps whatever it chose. The switches are
process-wide (the libraries offer nothing narrower): a thread loading a model at the same
moment in the same process also runs without bars.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

# Modules that call tqdm directly (bypassing their library's switch): their `tqdm` name is
# swapped for one that starts disabled, and put back afterwards.
_DIRECT_TQDM = ("transformers.modeling_gguf_pytorch_utils",)


@contextlib.contextmanager
def quiet_progress_bars(gguf: bool = False) -> Iterator[None]:
    """No transformers, datasets or GGUF-conversion progress bars inside the block.
    `gguf`: about to convert a GGUF file, so import transformers' GGUF reader now to silence
    it (a second's import the conversion would pay anyway; skipped otherwise)."""
    with contextlib.ExitStack() as stack:
        for module, is_on, off, on in (
            ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
             "enable_progress_bar"),
            ("datasets.utils.logging", "is_progress_bar_enabled", "disable_progress_bar",
             "enable_progress_bar"),
        ):
            _switch_off(stack, module, is_on, off, on)
        for module in _DIRECT_TQDM:
            _swap_tqdm(stack, module, import_it=gguf)
        yield


def _loaded(name: str, import_it: bool) -> Any:
    """The module if already imported (or importable when `import_it`), else None: a library
    nobody imported draws no bars, and importing datasets only to silence it is slow."""
    if name in sys.modules or import_it:
        try:
            return importlib.import_module(name)
        except ImportError:  # optional dependency (gguf) not installed
            return None
    return None


def _switch_off(stack: contextlib.ExitStack, name: str, is_on: str, off: str, on: str) -> None:
    module = _loaded(name, import_it=False)
    if module is None or not all(hasattr(module, a) for a in (is_on, off, on)):
        return
    if getattr(module, is_on)():
        getattr(module, off)()
        stack.callback(getattr(module, on))


def _swap_tqdm(stack: contextlib.ExitStack, name: str, import_it: bool) -> None:
    module = _loaded(name, import_it)
    original: Callable[..., Any] | None = getattr(module, "tqdm", None)
    if module is None or original is None:
        return
    module.tqdm = functools.partial(original, disable=True)
    stack.callback(setattr, module, "tqdm", original)
