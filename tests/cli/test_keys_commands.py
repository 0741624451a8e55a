"""`fedsilo keys`, `fedsilo trust` and `fedsilo provision` through the CLI: what they print
(ids and fingerprints, never private material or passwords) and their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.cli.main import app
from fedsilo.privacy.keys import Keyring, PartyKeys, TrustStore

runner = CliRunner()


def _invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _assert_one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for fragment in fragments:
        assert fragment in output, (fragment, output)


def _private_texts(folder: Path) -> list[str]:
    """The base64 lines of every PEM private key under `folder`."""
    texts = []
    for path in folder.rglob("*.pem"):
        lines = path.read_text().splitlines()
        if "PRIVATE KEY" in lines[0]:
            texts += [line for line in lines if not line.startswith("-----")]
    return texts


def test_help_lists_the_commands() -> None:
    code, output = _invoke("--help")
    assert code == 0
    for name in ("keys", "trust", "provision"):
        assert name in output
    code, output = _invoke("keys", "--help")
    assert code == 0 and all(c in output for c in ("init", "rotate", "activate", "retire",
                                                    "show"))
    code, output = _invoke("trust", "--help")
    assert code == 0 and all(c in output for c in ("add", "retire", "remove", "show"))


def test_keys_lifecycle(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    code, output = _invoke("keys", "init", "--dir", keys, "--party", "silo-0")
    assert code == 0, output
    first = Keyring.load(keys).active
    assert first.key_id in output and first.fingerprint in output
    assert "public.json" in output
    assert (keys / "public.json").exists()

    _assert_one_line_error(
        *_invoke("keys", "init", "--dir", keys, "--party", "silo-0"), "already holds a keyring"
    )

    code, output = _invoke("keys", "show", "--dir", keys)
    assert code == 0 and "silo-0" in output and first.fingerprint in output
    assert not any(secret in output for secret in _private_texts(keys))

    code, output = _invoke("keys", "rotate", "--dir", keys)
    assert code == 0, output
    second = Keyring.load(keys).pending  # pending: published, decrypts, does not sign yet
    assert second is not None and Keyring.load(keys).active == first
    assert f"pending  {second.key_id}  {second.fingerprint}" in output
    assert f"active   {first.key_id}" in output
    assert f"silo-0 still signs with {first.key_id}" in output
    assert "fedsilo trust add trust.json public.json" in output
    assert f"fedsilo keys activate --dir {keys}" in output
    assert f"fedsilo keys retire --dir {keys} {first.key_id}" in output
    assert f"fedsilo trust retire trust.json silo-0 {first.key_id}" in output
    _assert_one_line_error(*_invoke("keys", "rotate", "--dir", keys), "already has a pending key")
    _assert_one_line_error(*_invoke("keys", "retire", "--dir", keys, first.key_id),
                           "active key", "fedsilo keys activate")
    _assert_one_line_error(*_invoke("keys", "activate", "--dir", keys, first.key_id),
                           "is not the pending key")

    code, output = _invoke("keys", "activate", "--dir", keys)
    assert code == 0, output
    assert Keyring.load(keys).active == second and Keyring.load(keys).pending is None
    assert f"silo-0 now signs with {second.key_id}" in output
    assert f"fedsilo keys retire --dir {keys} {first.key_id}" in output
    _assert_one_line_error(*_invoke("keys", "activate", "--dir", keys), "no pending key")

    _assert_one_line_error(
        *_invoke("keys", "retire", "--dir", keys, second.key_id), "active key"
    )
    _assert_one_line_error(*_invoke("keys", "retire", "--dir", keys, "0123456789abcdef"),
                           "0123456789abcdef")
    code, output = _invoke("keys", "retire", "--dir", keys, first.key_id)
    assert code == 0, output
    assert [k.key_id for k in Keyring.load(keys).public().keys] == [second.key_id]
    assert f"fedsilo trust retire trust.json silo-0 {first.key_id}" in output
    assert first.fingerprint in output
    _assert_one_line_error(*_invoke("keys", "retire", "--dir", keys, first.key_id),
                           "already retired on")

    code, output = _invoke("keys", "show", "--dir", keys)
    assert code == 0 and f"active   {second.key_id}" in output
    assert f"retired  {first.key_id}  {first.fingerprint}  on " in output
    assert not any(secret in output for secret in _private_texts(keys))


def test_keys_errors(tmp_path: Path) -> None:
    _assert_one_line_error(*_invoke("keys", "show", "--dir", tmp_path / "none"), "no keyring")
    _assert_one_line_error(*_invoke("keys", "rotate", "--dir", tmp_path / "none"), "no keyring")
    keys = tmp_path / "keys"
    assert _invoke("keys", "init", "--dir", keys, "--party", "a")[0] == 0
    keys.chmod(0o755)
    _assert_one_line_error(*_invoke("keys", "show", "--dir", keys), "chmod 700")
    _assert_one_line_error(*_invoke("keys", "init", "--dir", tmp_path / "k2", "--party", " x"),
                           "party name")


def test_trust_add_and_remove(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "silo-keys", "silo-0")
    trust = tmp_path / "trust.json"
    TrustStore("fed", {"silo-0": keyring.public()}).save(trust)
    old = keyring.active
    new = keyring.rotate()

    code, output = _invoke("trust", "add", trust, tmp_path / "silo-keys" / "public.json")
    assert code == 0, output
    assert "updated silo-0" in output and new.fingerprint in output
    assert [k.key_id for k in TrustStore.load(trust).party("silo-0").keys] == [
        new.key_id, old.key_id
    ]
    code, output = _invoke("trust", "show", trust)
    assert code == 0 and "federation fed" in output and old.fingerprint in output

    code, output = _invoke("trust", "remove", trust, "silo-0", old.fingerprint)  # or its id
    assert code == 0, output
    assert [k.key_id for k in TrustStore.load(trust).party("silo-0").keys] == [new.key_id]

    _assert_one_line_error(*_invoke("trust", "remove", trust, "silo-0", old.key_id),
                           "not pinned")
    _assert_one_line_error(*_invoke("trust", "remove", trust, "silo-0", new.key_id),
                           "only key")
    _assert_one_line_error(*_invoke("trust", "remove", trust, "silo-9", new.key_id),
                           "unknown party")
    assert [k.key_id for k in TrustStore.load(trust).party("silo-0").keys] == [new.key_id]

    other = Keyring.create(tmp_path / "other", "silo-1")
    code, output = _invoke("trust", "add", trust, tmp_path / "other" / "public.json")
    assert code == 0 and "added silo-1" in output
    assert TrustStore.load(trust).party("silo-1") == other.public()

    _assert_one_line_error(*_invoke("trust", "add", trust, tmp_path / "missing.json"),
                           "does not exist")
    tampered = json.loads((tmp_path / "other" / "public.json").read_text())
    tampered["keys"][0]["fingerprint"] = "sha256:" + "0" * 64
    (tmp_path / "bad.json").write_text(json.dumps(tampered))
    _assert_one_line_error(*_invoke("trust", "add", trust, tmp_path / "bad.json"), "altered")
    assert TrustStore.load(trust).party("silo-1") == other.public()  # unchanged


def _federation(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(
        'name = "acme"\nsilos = ["silo-0", "silo-1"]\n'
        '[broker]\nurls = ["amqp://guest:guest@127.0.0.1:5672/"]\n'
    )
    return path


def test_provision(tmp_path: Path) -> None:
    fed, out = _federation(tmp_path), tmp_path / "kit"
    code, output = _invoke("provision", "--federation", fed, "--out", out)
    assert code == 0, output
    for text in ("acme.aggregator", "acme.silo-1", "in the kit",
                 f"rabbitmqctl import_definitions < {out}/broker/definitions.json"):
        assert text in output, text
    for party in ("aggregator", "silo-0", "silo-1"):
        password = (out / party / "broker.password").read_text().strip()
        assert password not in output
    assert not any(secret in output for secret in _private_texts(out))

    _assert_one_line_error(*_invoke("provision", "--federation", fed, "--out", out),
                           "not empty", "--force")
    code, output = _invoke("provision", "-f", fed, "-o", out, "--force", "--vhost", "v1",
                           "--tls-host", "localhost", "--tls-host", "127.0.0.1")
    assert code == 0, output
    assert "TLS" in output and "rabbitmq.conf" in output and "offline" in output
    assert (out / "broker" / "tls" / "server.pem").exists()


def test_provision_with_public_keys(tmp_path: Path) -> None:
    given = tmp_path / "public"
    given.mkdir()
    Keyring.create(tmp_path / "site", "silo-1").public().save(given / "silo-1.json")
    out = tmp_path / "kit"
    code, output = _invoke("provision", "-f", _federation(tmp_path), "-o", out,
                           "--public-keys", given)
    assert code == 0, output
    assert "kept by the party" in output
    assert not (out / "silo-1" / "keys").exists()
    assert TrustStore.load(out / "aggregator" / "trust.json").party("silo-1") == PartyKeys.load(
        given / "silo-1.json"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('name = "acme"\nsilos = ["aggregator"]\n', "may not be called"),
        ('silos = ["a"]\n[broker]\nurls = ["http://x"]\n', "amqp"),
        ('silos = ["a"]\nrounds = \n', "federation.toml"),
    ],
)
def test_provision_errors(tmp_path: Path, text: str, fragment: str) -> None:
    fed = tmp_path / "federation.toml"
    fed.write_text(text)
    _assert_one_line_error(*_invoke("provision", "-f", fed, "-o", tmp_path / "kit"), fragment)
    assert not (tmp_path / "kit").exists()


def test_provision_missing_file(tmp_path: Path) -> None:
    _assert_one_line_error(
        *_invoke("provision", "-f", tmp_path / "nope.toml", "-o", tmp_path / "kit"),
        "no such file",
    )


def test_trust_retire(tmp_path: Path) -> None:
    keyring = Keyring.create(tmp_path / "silo-keys", "silo-0")
    public = tmp_path / "silo-keys" / "public.json"
    trust = tmp_path / "trust.json"
    TrustStore("fed", {"silo-0": keyring.public()}).save(trust)
    old = keyring.active
    new = keyring.rotate()
    assert _invoke("trust", "add", trust, public)[0] == 0
    _assert_one_line_error(*_invoke("trust", "retire", trust, "silo-9", old.key_id),
                           "unknown party")
    _assert_one_line_error(*_invoke("trust", "retire", trust, "silo-0", "nope"),
                           "neither a key id", "copy it from `fedsilo keys show`")

    code, output = _invoke("trust", "retire", trust, "silo-0", old.key_id)
    assert code == 0, output
    assert f"retired {old.key_id} of silo-0" in output and "refused from now on" in output
    store = TrustStore.load(trust)
    assert [k.key_id for k in store.party("silo-0").keys] == [new.key_id]
    assert store.retired_key("silo-0", old.key_id).fingerprint == old.fingerprint
    code, output = _invoke("trust", "retire", trust, "silo-0", old.fingerprint)
    assert code == 0 and "already retired on" in output and "nothing changed" in output

    code, output = _invoke("trust", "add", trust, public)  # its public.json still lists it
    assert code == 0, output
    assert f"not pinned again: {old.key_id} (retired here on " in output
    assert [k.key_id for k in TrustStore.load(trust).party("silo-0").keys] == [new.key_id]
    code, output = _invoke("trust", "show", trust)
    assert code == 0 and f"retired  {old.key_id}  {old.fingerprint}  on " in output
    _assert_one_line_error(*_invoke("trust", "retire", trust, "silo-0", new.key_id),
                           "only key pinned", "fedsilo trust add")


def test_the_documented_rotation_refuses_no_message(tmp_path: Path) -> None:
    """Every step through the commands, as the operators run them (`fedsilo keys rotate`,
    `trust add`, `keys activate`, `keys retire`, `trust retire`), while a running
    aggregator and silo exchange plans and uploads, each also in flight across the step."""
    import torch

    from fedsilo.privacy.codec import EnvelopeCodec
    from fedsilo.privacy.keys import TrustFile
    from fedsilo.sdk.messages import RoundPlan, Upload
    from fedsilo.sdk.transport.codec import Rejected

    agg_keys, silo_keys = tmp_path / "agg-keys", tmp_path / "silo-keys"
    assert _invoke("keys", "init", "--dir", agg_keys, "--party", "aggregator")[0] == 0
    assert _invoke("keys", "init", "--dir", silo_keys, "--party", "silo-0")[0] == 0
    agg_trust, silo_trust = tmp_path / "agg-trust.json", tmp_path / "silo-trust.json"
    TrustStore("fed", {"silo-0": PartyKeys.load(silo_keys / "public.json")}).save(agg_trust)
    TrustStore("fed", {"aggregator": PartyKeys.load(agg_keys / "public.json")}).save(silo_trust)
    aggregator = EnvelopeCodec("fed", Keyring.load(agg_keys), TrustFile(agg_trust))
    silo = EnvelopeCodec("fed", Keyring.load(silo_keys), TrustFile(silo_trust))
    rounds = iter(range(1, 100))

    def seal() -> list[tuple[EnvelopeCodec, bytes]]:
        r = next(rounds)
        plan = RoundPlan(r, "silo-0", 1, 0.1, 1, {"m": [0]}, {"m.shared.A": torch.ones(2)})
        upload = Upload(r, "silo-0", {"m.shared.A": torch.ones(2)}, {}, 3)
        return [(silo, aggregator.seal(plan)), (aggregator, silo.seal(upload))]

    def deliver(batch: list[tuple[EnvelopeCodec, bytes]]) -> None:
        for codec, data in batch:
            try:
                codec.open(data)
            except Rejected as exc:
                pytest.fail(f"{codec.party} refused a message: {exc}")

    old = Keyring.load(agg_keys).active.key_id
    in_flight = seal()
    steps = [
        ("keys", "rotate", "--dir", agg_keys),
        ("trust", "add", silo_trust, agg_keys / "public.json"),
        ("keys", "activate", "--dir", agg_keys),
        ("keys", "retire", "--dir", agg_keys, old),
        ("trust", "retire", silo_trust, "aggregator", old),
    ]
    for step in steps:
        code, output = _invoke(*step)
        assert code == 0, (step, output)
        deliver(in_flight)
        deliver(seal())
        in_flight = seal()
    deliver(in_flight)
    new = Keyring.load(agg_keys).active.key_id
    assert new != old and aggregator.keyring.active.key_id == new
    assert [k.key_id for k in silo.trust.party("aggregator").keys] == [new]
    assert silo.trust.retired_key("aggregator", old) is not None
