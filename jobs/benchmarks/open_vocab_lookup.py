"""Open-vocabulary look-up time: DeViSE embeddings against all 400k GloVe 6B words.

``CosineLookup.from_vocabulary(kv, n=None, words_only=False)`` holds the full 400,000 x
50 unit matrix; a query batch is scored by chunked matmuls and ``torch.topk``
(:func:`polyclip.text.lookup.cosine_topk`). Beside it, the naive reference: one full
``(B, 400k)`` score matrix and a full ``argsort`` per row, on the same queries. Batch
sizes 1 and 256, top-10, median over repeats, ``--threads`` torch threads
(default one: the CPU is shared). The queries are word vectors of real words plus noise (what a trained
DeViSE map outputs looks like a noisy word vector), and every result is checked
against the naive ranking.

Usage::

    python -m jobs.benchmarks.open_vocab_lookup [--repeats 7] [--vocab 400000]

The CPU is shared with other jobs, so absolute times are noisy; the ratio of the two
methods is measured side by side in alternating order.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import median, out_dir
from polyclip.reports.plots import bar_chart
from polyclip.reports.tables import markdown_table
from polyclip.text import load_word_vectors
from polyclip.text.lookup import CosineLookup


def naive_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: full score matrix, full sort."""
    scores = torch.nn.functional.normalize(queries, dim=1) @ keys.T
    return torch.argsort(scores, dim=1, descending=True)[:, :k]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=400_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to measure")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "jobs.benchmarks.open_vocab_lookup",
                          *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    out = out_dir("open_vocab_lookup")
    t0 = time.perf_counter()
    kv = load_word_vectors("glove-6b-50d")
    lookup = CosineLookup.from_vocabulary(kv, n=args.vocab, words_only=False)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    rows = []
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 256):
            words = rng.choice(20_000, size=batch, replace=False)
            q = torch.from_numpy(np.asarray(kv.vectors[words], dtype=np.float32))
            q = q + 0.3 * q.norm(dim=1, keepdim=True) / np.sqrt(q.shape[1]) * torch.randn(q.shape,
                                                                                            generator=torch.Generator().manual_seed(batch))
            fast_t: list[float] = []
            naive_t: list[float] = []
            for r in range(args.repeats + 1):  # the first round warms up and is dropped
                order = [("fast", fast_t), ("naive", naive_t)] if r % 2 else [("naive", naive_t), ("fast", fast_t)]
                for name, times in order:
                    tic = time.perf_counter()
                    found = lookup.topk(q, args.k)[1] if name == "fast" else naive_topk(q, lookup.vectors, args.k)
                    if r:
                        times.append(time.perf_counter() - tic)
                    if name == "fast":
                        fast_idx = found
                    else:
                        naive_idx = found
            agree = float((fast_idx[:, 0] == naive_idx[:, 0]).float().mean())
            rows.append({"threads": threads, "batch": batch, "vocabulary": len(lookup), "k": args.k,
                         "chunked_ms_per_image": 1000 * median(fast_t) / batch,
                         "naive_ms_per_image": 1000 * median(naive_t) / batch,
                         "naive_over_chunked": median(naive_t) / median(fast_t),
                         "chunked_ms_per_batch": 1000 * median(fast_t), "top1_agreement": agree,
                         "repeats": args.repeats})
            print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    result = {"command": command, "vocabulary_build_s": round(build_s, 2), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    bar_chart({f"B={r['batch']}, {r['threads']} thr": r["chunked_ms_per_image"] for r in rows},
              out / "lookup_ms_per_image.png", f"Top-{args.k} look-up over {len(lookup):,} GloVe words",
              "ms per image (median)")
    md = (f"# Open-vocabulary look-up, {len(lookup):,} words\n\nCommand: `{command}`\n\n"
          f"Loading GloVe and building the unit matrix: {build_s:.1f} s. Times are medians of {args.repeats} "
          "repeats after one warm-up, on a CPU shared with other jobs; chunked = polyclip's `CosineLookup.topk`, "
          "naive = full score matrix + argsort, run alternately on the same queries.\n\n" + markdown_table(rows)
          + "\n![look-up time](lookup_ms_per_image.png)\n")
    (out / "results.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
