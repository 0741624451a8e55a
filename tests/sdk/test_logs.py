import io
import json
import logging

from fedsilo.sdk.logs import log_event, setup_logging


def test_json_lines_carry_the_event_and_its_fields() -> None:
    stream = io.StringIO()
    setup_logging(logging.INFO, json_lines=True, stream=stream)
    log = logging.getLogger("fedsilo.test")
    log_event(log, "round_closed", round=3, missing=["b"], mta=0.5)
    log.warning("plain %s", "message")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "round_closed" and first["round"] == 3
    assert first["missing"] == ["b"] and first["level"] == "info"
    assert second["event"] == "log" and second["msg"] == "plain message"


def test_plain_lines_are_event_then_key_values() -> None:
    stream = io.StringIO()
    setup_logging(logging.INFO, json_lines=False, stream=stream)
    log_event(logging.getLogger("fedsilo.test"), "silo_joined", silo="a", joined=2)
    assert "silo_joined silo=a joined=2" in stream.getvalue()


def test_pika_noise_is_silenced_unless_debugging() -> None:
    setup_logging(logging.INFO, stream=io.StringIO())
    assert not logging.getLogger("pika").isEnabledFor(logging.ERROR)
    setup_logging(logging.DEBUG, stream=io.StringIO())
    assert logging.getLogger("pika").isEnabledFor(logging.DEBUG)
