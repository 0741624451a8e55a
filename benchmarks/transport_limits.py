"""What limits the transport's throughput: each stage of an upload's way, measured alone.

    python benchmarks/transport_limits.py                   # writes transport_limits.{json,md}
    python benchmarks/transport_limits.py --total-mb 100 --out /tmp/limits
    python benchmarks/transport_limits.py --profile smoke --total-mb 8 --chunk-mib 1 \
        --publishers 2 --repeat 1 --out /tmp/limits                   # CI, seconds

`benchmarks/transport.py` measures whole rounds (C silos' uploads through the real broker
into a folding aggregator). This script takes the path apart, on the same upload (FedAMoLE
on LLaMA-3.2-1B shapes, 12.4 MB), so that a figure there can be read as "bounded by X":

1. **Codec**, in this process: `protocol.encode` / `decode` (what `PlainCodec` does, the
   transport benchmark's codec), and the envelope (`EnvelopeCodec.seal` / `open`: X25519 +
   AES-256-GCM + Ed25519, what a provisioned federation does), MB/s of one CPU core.
2. **Broker ingest**, raw pika on a fresh vhost, one publisher: persistent messages of
   `--chunk-mib` sizes to a quorum queue with publisher confirms one at a time (what
   `AmqpTransport` does: pika's BlockingChannel waits for each confirm), without confirms,
   and the same to a classic queue; then `--publishers` processes at once (quorum,
   confirms, 4 MiB if measured: the transport benchmark's setting).
3. **Broker drain** of what was published: `basic_get` per message (what
   `AmqpTransport._receive` does) against `basic_consume` with a prefetch window.

MB = 10^6 bytes. Every figure is the median of `--repeat` runs. The broker shares the
machine's CPUs with the publishers and the consumer, as in the transport benchmark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pika

from fedsilo.privacy.codec import EnvelopeCodec
from fedsilo.privacy.keys import Keyring, TrustStore
from fedsilo.sdk.protocol import decode, encode

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from stamp import RESULTS, git_info, machine, now, stamp_lines  # noqa: E402
from transport import (  # noqa: E402
    DEFAULT_URL,
    PROFILES,
    Vhost,
    broker_machine,
    build_upload,
    make_templates,
    masked_command_line,
)

NAME = "transport_limits"
MB = 1e6
MIB = 2**20
BENCHED_CODE = ("sdk/protocol.py", "privacy/envelope.py", "privacy/codec.py",
                "sdk/transport/amqp.py", "sdk/transport/amqp_connection.py",
                "sdk/transport/amqp_topology.py", "benchmarks/transport_limits.py")


def median_rate(nbytes: int, work: Callable[[], Any], repeat: int) -> dict[str, float]:
    """MB/s of `work` over `nbytes`, median of `repeat` timed calls (after one untimed)."""
    work()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    s = statistics.median(seconds)
    return {"seconds": s, "mb_s": nbytes / MB / s}


def bench_codec(profile_name: str, repeat: int) -> dict[str, Any]:
    profile = PROFILES[profile_name]
    upload = build_upload(profile, make_templates(profile), 0)
    wire = encode(upload)
    with tempfile.TemporaryDirectory() as tmp:
        silo_keys = Keyring.create(Path(tmp) / "silo", "silo-000")
        agg_keys = Keyring.create(Path(tmp) / "agg", "aggregator")
        silo = EnvelopeCodec("bench", silo_keys,
                             TrustStore("bench", {"aggregator": agg_keys.public()}))
        sealed = silo.seal(upload)

        def open_fresh() -> None:  # a fresh replay memory: the same bytes opened again
            EnvelopeCodec("bench", agg_keys,
                          TrustStore("bench", {"silo-000": silo_keys.public()})).open(sealed)

        out = {
            "upload_mb": len(wire) / MB,
            "sealed_mb": len(sealed) / MB,
            "encode": median_rate(len(wire), lambda: encode(upload), repeat),
            "decode": median_rate(len(wire), lambda: decode(wire), repeat),
            "seal": median_rate(len(sealed), lambda: silo.seal(upload), repeat),
            "open": median_rate(len(sealed), open_fresh, repeat),
        }
    return out


def _declare(channel: Any, queue: str, kind: str) -> None:
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": kind})


def publish(url: str, queue: str, kind: str, chunk: int, total: int, confirms: bool) -> float:
    """Seconds to publish `total` bytes as persistent `chunk`-byte messages (queue exists)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if confirms:
            channel.confirm_delivery()
        body = bytes(chunk)
        props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        count = max(1, total // chunk)
        start = time.perf_counter()
        for _ in range(count):
            channel.basic_publish("", queue, body, props)
        if not confirms:  # wait until the broker holds them all, as confirms would
            while channel.queue_declare(queue, passive=True).method.message_count < count:
                connection.sleep(0.005)
        return time.perf_counter() - start
    finally:
        connection.close()


def drain(url: str, queue: str, count: int, prefetch: int | None) -> float:
    """Seconds to take and ack `count` messages: basic_get each (prefetch None) or
    basic_consume with `prefetch` unacked in flight."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        start = time.perf_counter()
        if prefetch is None:
            taken = 0
            while taken < count:
                method, _, _ = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    connection.sleep(0.001)
                    continue
                channel.basic_ack(method.delivery_tag)
                taken += 1
        else:
            channel.basic_qos(prefetch_count=prefetch)
            for taken, (method, _, _) in enumerate(
                    channel.consume(queue, inactivity_timeout=60), start=1):
                if method is None:
                    raise RuntimeError(f"drain stalled after {taken - 1}/{count} messages")
                channel.basic_ack(method.delivery_tag)
                if taken == count:
                    break
            channel.cancel()
        return time.perf_counter() - start
    finally:
        connection.close()


def _publisher(url: str, queue: str, chunk: int, total: int, ready: Any, go: Any,
               out: Any) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    body = bytes(chunk)
    props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    ready.put(1)
    go.wait()
    for _ in range(max(1, total // chunk)):
        channel.basic_publish("", queue, body, props)
    out.put(time.perf_counter())
    connection.close()


def parallel_publish(url: str, queue: str, publishers: int, chunk: int, total: int) -> float:
    """Seconds from the start signal to the last confirm of `publishers` processes that
    publish `total` bytes between them."""
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    share = total // publishers
    procs = [ctx.Process(target=_publisher, args=(url, queue, chunk, share, ready, go, out))
             for _ in range(publishers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start = time.perf_counter()
    go.set()
    ends = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(ends) - start


def bench_broker(url: str, fresh_vhost: bool, total_mb: float, chunks_mib: Sequence[float],
                 publishers: int, repeat: int) -> list[dict[str, Any]]:
    total = int(total_mb * MB)
    cases = [(kind, confirms, chunk) for chunk in chunks_mib
             for kind, confirms in (("quorum", True), ("quorum", False), ("classic", True))]
    rows = []
    with Vhost(url, fresh=fresh_vhost) as vhost_url:
        connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
        channel = connection.channel()
        for kind, confirms, chunk_mib in cases:
            chunk = int(chunk_mib * MIB)
            count = max(1, total // chunk)
            results: dict[str, list[float]] = {"publish": [], "get": [], "consume": []}
            if count < 2:
                raise ValueError(f"--total-mb {total_mb:g} holds fewer than 2 messages of "
                                 f"{chunk_mib:g} MiB: raise it")
            for r in range(repeat):
                queue = f"limits-{uuid.uuid4().hex[:8]}"
                _declare(channel, queue, kind)
                results["publish"].append(
                    publish(vhost_url, queue, kind, chunk, total, confirms))
                # drain half with basic_get, then the other half by consume (same queue)
                half = count // 2
                if r % 2 == 0:
                    results["get"].append(drain(vhost_url, queue, half, None) / half)
                    results["consume"].append(
                        drain(vhost_url, queue, count - half, 16) / (count - half))
                else:
                    results["consume"].append(drain(vhost_url, queue, half, 16) / half)
                    results["get"].append(
                        drain(vhost_url, queue, count - half, None) / (count - half))
                channel.queue_delete(queue)
            nbytes = count * chunk
            row = {
                "queue": kind, "confirms": confirms, "chunk_mib": chunk_mib,
                "publish_mb_s": nbytes / MB / statistics.median(results["publish"]),
                "get_mb_s": chunk / MB / statistics.median(results["get"]),
                "consume_mb_s": chunk / MB / statistics.median(results["consume"]),
            }
            rows.append(row)
            print(f"[broker] {kind} confirms={confirms} chunk={chunk_mib} MiB: publish "
                  f"{row['publish_mb_s']:.0f} MB/s, drain basic_get {row['get_mb_s']:.0f} "
                  f"MB/s, basic_consume {row['consume_mb_s']:.0f} MB/s", flush=True)
        chunk_mib = 4.0 if 4.0 in chunks_mib else chunks_mib[0]  # the transport's default
        chunk = int(chunk_mib * MIB)
        seconds = []
        for _ in range(repeat):
            queue = f"limits-{uuid.uuid4().hex[:8]}"
            _declare(channel, queue, "quorum")
            seconds.append(parallel_publish(vhost_url, queue, publishers, chunk, total))
            channel.queue_delete(queue)
        nbytes = publishers * max(1, (total // publishers) // chunk) * chunk
        rows.append({"queue": "quorum", "confirms": True, "chunk_mib": chunk_mib,
                     "publishers": publishers,
                     "publish_mb_s": nbytes / MB / statistics.median(seconds)})
        print(f"[broker] {publishers} publishers, quorum, confirms, {chunk_mib:g} MiB: "
              f"{rows[-1]['publish_mb_s']:.0f} MB/s", flush=True)
        connection.close()
    return rows


def to_markdown(report: dict[str, Any]) -> str:
    c = report["codec"]
    lines = ["# Transport limits", "", *stamp_lines(report), "",
             f"Upload: {c['upload_mb']:.2f} MB encoded, {c['sealed_mb']:.2f} MB sealed "
             "(FedAMoLE, LLaMA-3.2-1B shapes, as in transport.md).", "",
             "## Codec, one CPU core", "",
             "| stage | MB/s | ms per upload |", "|:---|---:|---:|"]
    for stage in ("encode", "decode", "seal", "open"):
        lines.append(f"| {stage} | {c[stage]['mb_s']:.0f} | {c[stage]['seconds'] * 1e3:.1f} |")
    lines += ["", f"## Broker (RabbitMQ on this machine, {report['parameters']['total_mb']:g} MB "
              "per case, persistent messages)", "",
              "| queue | confirms | chunk MiB | publishers | publish MB/s | drain basic_get MB/s "
              "| drain basic_consume (prefetch 16) MB/s |",
              "|:---|:---|---:|---:|---:|---:|---:|"]
    for r in report["broker"]:
        drains = (f"{r['get_mb_s']:.0f} | {r['consume_mb_s']:.0f}" if "get_mb_s" in r
                  else "- | -")
        lines.append(f"| {r['queue']} | {'each' if r['confirms'] else 'none'} | "
                     f"{r['chunk_mib']:g} | {r.get('publishers', 1)} | "
                     f"{r['publish_mb_s']:.0f} | {drains} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--vhost", choices=("fresh", "url"), default="fresh",
                        help="fresh: a new vhost per run, deleted after (rabbitmqctl); url: "
                             "the vhost of --url as is")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="llama-3.2-1b",
                        help="the upload the codec stages are timed on")
    parser.add_argument("--total-mb", type=float, default=400.0,
                        help="bytes published per broker case (default 400 MB)")
    parser.add_argument("--chunk-mib", default="1,4,16",
                        help="message sizes to compare, MiB (the transport's default is 4)")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chunks = [float(v) for v in args.chunk_mib.split(",") if v.strip()]
    report: dict[str, Any] = {
        "command": masked_command_line(sys.argv[1:] if argv is None else list(argv)).replace(
            "transport.py", "transport_limits.py", 1),
        "git": git_info(BENCHED_CODE),
        "date": now(),
        "machine": {**machine(("torch", "pika", "cryptography")),
                    "rabbitmq": broker_machine()["rabbitmq"]},
        "benchmark": NAME,
        "parameters": {"profile": args.profile, "total_mb": args.total_mb, "chunk_mib": chunks,
                       "publishers": args.publishers, "repeat": args.repeat},
    }
    if args.publishers < 1 or args.repeat < 1 or not chunks or min(chunks) <= 0:
        parser.error("--publishers and --repeat must be >= 1, --chunk-mib sizes > 0")
    report["codec"] = bench_codec(args.profile, args.repeat)
    print("[codec] " + ", ".join(f"{k} {report['codec'][k]['mb_s']:.0f} MB/s"
                                 for k in ("encode", "decode", "seal", "open")), flush=True)
    report["broker"] = bench_broker(args.url, args.vhost == "fresh", args.total_mb, chunks,
                                    args.publishers, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{NAME}.md").write_text(to_markdown(report))
    print(f"wrote {args.out / NAME}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
