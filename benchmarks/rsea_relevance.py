"""How distinct do the silos look to RSEA? The spread of its selection probabilities.

For one federation's data and base model: inject AMoLE with E experts per module (fresh,
round-0 adapters), compute every silo's client and expert embeddings on its embedding set,
and run RSEA's `relevance` and `selection_probs` per module. Reported: the mean pairwise
cosine of the silos' client embeddings, and per expert the spread (max - min over silos)
and normalised entropy of P, averaged over experts and modules. A spread near 0 (entropy
near 1) means the assignment program sees uniform scores: its choice is noise.

    python benchmarks/rsea_relevance.py                       # SmolLM2, AG News alpha 0.1
    python benchmarks/rsea_relevance.py --model builtin:tiny --data synthetic   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import command_line, git_info, machine, now


def measure(model_name: str, data: str | None, silos: int, alpha: float, experts: int,
            seed: int, max_examples: int) -> dict[str, float]:
    from fedsilo.sdk.adapters.inject import inject_adapters
    from fedsilo.sdk.adapters.model import set_assignment
    from fedsilo.sdk.aggregation.rsea import relevance, selection_probs
    from fedsilo.sdk.amole.config import AMoLEConfig
    from fedsilo.sdk.amole.model import compute_embeddings
    from fedsilo.sdk.data.tokenize import batches, encode_example
    from fedsilo.sdk.models.loading import load_model
    from fedsilo.simulation.engine import SimulationConfig, build_silo_data

    torch.manual_seed(seed)
    config = SimulationConfig(data=data, silos=silos, alpha=alpha, model=model_name,
                              seed=seed, max_length=64)
    parts = build_silo_data(config)
    loaded = load_model(model_name, seed=seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = AMoLEConfig()
    layers = inject_adapters(model, adapter)
    set_assignment(model, {m: list(range(experts)) for m in layers})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id)
    embeddings = []
    for part in parts:
        encoded = [encode_example(tokenizer, e, 64) for e in (part.emb or part.train)]
        embeddings.append(compute_embeddings(model, batches(encoded[:max_examples], 8, pad)))
    spreads, entropies, cosines = [], [], []
    for module in layers:
        client = torch.stack([e[module].client for e in embeddings])
        expert = torch.stack([
            torch.stack([e[module].experts[j] for e in embeddings]).mean(0)
            for j in range(experts)
        ])
        p = selection_probs(relevance(client, expert, 1 / math.sqrt(adapter.r)))
        spreads.append((p.max(0).values - p.min(0).values).mean().item())
        entropies.append((-(p * p.clamp_min(1e-30).log()).sum(0) / math.log(silos)).mean()
                         .item())
        unit = torch.nn.functional.normalize(client, dim=1)
        cosines.append(((unit @ unit.T).sum() - silos).item() / (silos * (silos - 1)))
    return {
        "modules": len(spreads),
        "embedding_set_sizes": [len(p.emb or p.train) for p in parts],
        "p_spread_mean": sum(spreads) / len(spreads),
        "p_entropy_normalised_mean": sum(entropies) / len(entropies),
        "client_embedding_cosine_mean": sum(cosines) / len(cosines),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="agnews", help="a preset, or 'synthetic'")
    p.add_argument("--silos", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--experts", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = measure(args.model, None if args.data == "synthetic" else args.data, args.silos,
                     args.alpha, args.experts, args.seed, args.max_examples)
    report = {"benchmark": "rsea_relevance", "command": command_line("rsea_relevance.py", argv),
              "git": git_info(), "date": now(), "machine": machine(), **vars(args),
              "out": str(args.out) if args.out else None, **result}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
