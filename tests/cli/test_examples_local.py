"""examples/local: the README demo's configs."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from fedsilo.aggregator.config import FederationConfig
from fedsilo.sdk.config import load_config
from fedsilo.sdk.strategies import STRATEGIES
from fedsilo.silo_agent.config import SiloConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "local"


def test_the_demo_has_its_own_vhost_shared_by_all_four_processes() -> None:
    """On the default vhost "/" its queues (fedsilo.plans, aggregator.uploads...) would
    meet any other federation's on the same broker."""
    fed = load_config(FederationConfig, EXAMPLES / "federation.toml", env={})
    silos = [load_config(SiloConfig, EXAMPLES / f"silo-{i}.toml", env={}) for i in range(3)]
    vhosts = {urlsplit(url).path for cfg in (fed, *silos) for url in cfg.broker.urls}
    assert vhosts == {"/fedsilo-local-demo"}
    readme = (EXAMPLES.parents[1] / "README.md").read_text()
    assert "rabbitmqctl add_vhost fedsilo-local-demo" in readme


def test_the_strategy_comment_lists_every_strategy() -> None:
    text = (EXAMPLES / "federation.toml").read_text()
    line = next(x for x in text.splitlines() if re.match(r'name = "\w+" +#', x))
    listed = [s.strip() for s in line.split("#", 1)[1].split("|")]
    assert listed == list(STRATEGIES)
