"""The `[security]` section of federation.toml and silo.toml, and the codec it builds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedsilo.privacy.validation import UploadLimits, norm_bound
from fedsilo.sdk.aggregation.clipping import ClipSettings
from fedsilo.sdk.transport.codec import Codec, PlainCodec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecuritySettings:
    """Where this party's keys and its pinned peers are (`fedsilo provision` writes both).

    `enabled = false` sends plaintext: only for a broker and network you fully trust (a
    laptop demo); the process says so loudly at start."""

    enabled: bool = True
    keys_dir: Path = Path("keys")
    trust_file: Path = Path("trust.json")
    max_message_mb: float = 4096.0
    """Refuse larger messages before reading them."""
    max_message_age_s: float = 7 * 86400.0
    """Refuse messages signed longer ago than this (replays of old traffic)."""
    max_clock_skew_s: float = 300.0
    """Tolerated clock difference for messages that seem to come from the future."""
    max_update_norm: float = 0.0
    """Aggregator: refuse an upload with a tensor whose L2 norm exceeds this (0: no bound)."""
    max_embedding_norm: float = 1e4
    """Aggregator: refuse an upload with an embedding whose L2 norm exceeds this (0: no
    bound; without one, huge finite embeddings overflow RSEA's scores)."""
    max_samples: int = 100_000_000
    """Aggregator: refuse an upload claiming fewer than 1 or more training examples."""
    update_clip_factor: float = 5.0
    """Aggregator: clip each silo's update (uploaded - sent, all its tensors) to this many
    times the round's median update norm (0: no adaptive bound)."""
    update_clip_norm: float = 0.0
    """Aggregator: a fixed cap on each silo's update norm as well (0: none)."""

    def __post_init__(self) -> None:
        for name in ("max_message_mb", "max_message_age_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"security.{name} must be > 0 (got {getattr(self, name)})")
        for name in ("max_clock_skew_s", "max_update_norm", "max_embedding_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"security.{name} must be >= 0 (got {getattr(self, name)})")
        if not self.max_samples >= 1:
            raise ValueError(f"security.max_samples must be >= 1 (got {self.max_samples})")
        try:
            self.update_clip()
        except ValueError as exc:
            raise ValueError(f"security.update_clip_{exc}") from None

    def upload_limits(self) -> UploadLimits:
        return UploadLimits(max_param_norm=norm_bound(self.max_update_norm),
                            max_embedding_norm=norm_bound(self.max_embedding_norm),
                            max_samples=self.max_samples)

    def update_clip(self) -> ClipSettings:
        return ClipSettings(factor=self.update_clip_factor, norm=self.update_clip_norm)

    def codec(self, party: str, federation: str | None = None) -> Codec:
        """The codec for `party` ("aggregator" or a silo id). A silo learns the federation's
        name from its trust file; the aggregator checks it against federation.toml."""
        if not self.enabled:
            log.warning(
                "security.enabled = false: messages cross the broker UNENCRYPTED and UNSIGNED; "
                "anyone with access to the broker can read and forge them. Use this only on a "
                "broker and network you fully trust."
            )
            return PlainCodec()
        from fedsilo.privacy.codec import EnvelopeCodec, EnvelopeLimits
        from fedsilo.privacy.keys import Keyring, KeysError, TrustFile

        try:
            keyring = Keyring.load(self.keys_dir)
        except KeysError as exc:
            raise KeysError(
                f"security.keys_dir: {exc}. `fedsilo provision --federation federation.toml` "
                "makes every party's keys and trust file (or set security.enabled = false for "
                "a broker you fully trust)"
            ) from None
        if keyring.party != party:
            raise KeysError(
                f"the keys in {self.keys_dir} belong to {keyring.party!r}, not {party!r}: point "
                "security.keys_dir at this party's own keys"
            )
        trust = TrustFile(self.trust_file)
        return EnvelopeCodec(
            federation or trust.current().federation,
            keyring,
            trust,
            EnvelopeLimits(
                max_bytes=int(self.max_message_mb * 2**20),
                max_age_s=self.max_message_age_s,
                max_skew_s=self.max_clock_skew_s,
            ),
        )


__all__ = ["SecuritySettings"]
