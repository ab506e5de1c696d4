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
import time
from typing import Any

import numpy as np
import torch

from jobs.benchmarks.common import announce, median, out_dir, write_results
from polyclip.reports.plots import bar_chart
from polyclip.text import DEFAULT_WORD_VECTORS, load_word_vectors
from polyclip.text.lookup import CosineLookup


def naive_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: full score matrix, full sort."""
    scores = torch.nn.functional.normalize(queries, dim=1) @ keys.T
    return torch.argsort(scores, dim=1, descending=True)[:, :k]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=400_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to measure")
    return parser.parse_args(argv)


def noisy_queries(kv: Any, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """``batch`` vectors of frequent words, each moved by noise of 0.3 times its norm."""
    words = rng.choice(20_000, size=batch, replace=False)
    q = torch.from_numpy(np.asarray(kv.vectors[words], dtype=np.float32))
    noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(batch))
    return q + 0.3 * q.norm(dim=1, keepdim=True) / np.sqrt(q.shape[1]) * noise


def time_both(lookup: CosineLookup, q: torch.Tensor, k: int, repeats: int) -> tuple[list[float], list[float], float]:
    """Seconds of the chunked and the naive top-k, alternating, after a warm-up round; and their top-1 agreement."""
    fast_t: list[float] = []
    naive_t: list[float] = []
    for r in range(repeats + 1):  # the first round warms up and is dropped
        order = [("fast", fast_t), ("naive", naive_t)] if r % 2 else [("naive", naive_t), ("fast", fast_t)]
        for name, times in order:
            tic = time.perf_counter()
            found = lookup.topk(q, k)[1] if name == "fast" else naive_topk(q, lookup.vectors, k)
            if r:
                times.append(time.perf_counter() - tic)
            if name == "fast":
                fast_idx = found
            else:
                naive_idx = found
    return fast_t, naive_t, float((fast_idx[:, 0] == naive_idx[:, 0]).float().mean())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = announce(argv, "jobs.benchmarks.open_vocab_lookup")
    out = out_dir("open_vocab_lookup")
    t0 = time.perf_counter()
    kv = load_word_vectors(DEFAULT_WORD_VECTORS)
    lookup = CosineLookup.from_vocabulary(kv, n=args.vocab, words_only=False)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    rows = []
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in (1, 256):
            fast_t, naive_t, agree = time_both(lookup, noisy_queries(kv, batch, rng), args.k, args.repeats)
            rows.append({"threads": threads, "batch": batch, "vocabulary": len(lookup), "k": args.k,
                         "chunked_ms_per_image": 1000 * median(fast_t) / batch,
                         "naive_ms_per_image": 1000 * median(naive_t) / batch,
                         "naive_over_chunked": median(naive_t) / median(fast_t),
                         "chunked_ms_per_batch": 1000 * median(fast_t), "top1_agreement": agree,
                         "repeats": args.repeats})
            print(rows[-1], flush=True)
    torch.set_num_threads(default_threads)
    bar_chart({f"B={r['batch']}, {r['threads']} thr": r["chunked_ms_per_image"] for r in rows},
              out / "lookup_ms_per_image.png", f"Top-{args.k} look-up over {len(lookup):,} GloVe words",
              "ms per image (median)")
    extra = {"vocabulary_build_s": round(build_s, 2)}
    md = write_results(out, command, rows, title=f"Open-vocabulary look-up, {len(lookup):,} words", extra=extra,
                       blocks=[
        f"Loading GloVe and building the unit matrix: {build_s:.1f} s. Times are medians of {args.repeats} "
        "repeats after one warm-up, on a CPU shared with other jobs; chunked = polyclip's `CosineLookup.topk`, "
        "naive = full score matrix + argsort, run alternately on the same queries.\n", rows,
        "![look-up time](lookup_ms_per_image.png)\n"])
    print(md)
    return {"command": command, "rows": rows, **extra}


if __name__ == "__main__":
    main()
