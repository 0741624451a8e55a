"""Byte-level tokenizer for the built-in model.

Why: the built-in model must be usable with no files, no download and no training, in every
process, with identical ids everywhere. Raw UTF-8 bytes give exactly that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

_NUM_BYTES = 256


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are bytes; 256 = pad, 257 = bos, 258 = eos.

    Implements the small subset of Hugging Face's tokenizer API that training, scoring and
    ``model.generate`` need (``__call__``, ``encode``, ``decode``, ``batch_decode``, the special
    ids and ``padding_side``).
    """

    pad_token_id: int = _NUM_BYTES
    bos_token_id: int = _NUM_BYTES + 1
    eos_token_id: int = _NUM_BYTES + 2
    vocab_size: int = _NUM_BYTES + 3

    def __init__(self, padding_side: str = "right") -> None:
        self.padding_side = padding_side

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self._padding_side = side

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, padding_side={self.padding_side!r})"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``; ``add_special_tokens=True`` prepends bos."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD rather than an error).

        Special ids are dropped when ``skip_special_tokens``; otherwise they render as
        ``<pad>``, ``<s>`` and ``</s>`` so a log shows where they were.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        names = {self.pad_token_id: "<pad>", self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        out: list[str] = []
        buf = bytearray()
        for raw in ids:
            i = int(raw)
            if 0 <= i < _NUM_BYTES:
                buf.append(i)
                continue
            if i not in names:
                raise ValueError(
                    f"token id {i} is outside the byte vocabulary 0..{self.vocab_size - 1}"
                )
            if not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(names[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(
        self, sequences: Sequence[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = True,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = False,
    ) -> dict[str, Any]:
        """Encode a text or a batch into ``input_ids`` and ``attention_mask``.

        Padding goes on ``padding_side`` (left for generation, right for training). Without
        padding, or without ``return_tensors``, the result holds plain lists.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        encoded = [self.encode(t, add_special_tokens=add_special_tokens) for t in batch]
        if padding and padding != "do_not_pad":
            width = max((len(e) for e in encoded), default=0)
            ids, mask = [], []
            for e in encoded:
                pad = [self.pad_token_id] * (width - len(e))
                ones, zeros = [1] * len(e), [0] * len(pad)
                if self.padding_side == "left":
                    ids.append(pad + e)
                    mask.append(zeros + ones)
                else:
                    ids.append(e + pad)
                    mask.append(ones + zeros)
        else:
            ids = encoded
            mask = [[1] * len(e) for e in encoded]
        if return_tensors is None:
            if single:
                return {"input_ids": ids[0], "attention_mask": mask[0]}
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ValueError(
                f"return_tensors={return_tensors!r} is not supported; use 'pt' or None"
            )
        if len({len(e) for e in ids}) > 1:
            raise ValueError("texts have different lengths; pass padding=True to get tensors")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
            "attention_mask": torch.tensor(mask, dtype=torch.long).reshape(len(ids), -1),
        }
