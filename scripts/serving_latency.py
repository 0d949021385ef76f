"""End-to-end latency and throughput of a served model (`make serve`), measured as a client sees it.

    python scripts/serving_latency.py --url http://127.0.0.1:5001

One request of one text, `--requests` times (after a few warm-up requests): p50/p95/p99 milliseconds
including HTTP, JSON, tokenization and inference. Then `--total` texts sent in batches of
`--batch-size` per request: texts per second. Texts come from the `text` column of `--texts`
(default: the bundled demo set), repeated as needed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import time
import urllib.request
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "financial_news_sentiment.csv"


def post(url: str, texts: list[str]) -> list[dict]:
    body = json.dumps({"dataframe_records": [{"text": text} for text in texts]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        predictions = json.loads(response.read())["predictions"]
    if len(predictions) != len(texts):
        raise SystemExit(f"asked for {len(texts)} predictions, got {len(predictions)}")
    return predictions


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5001", help="the server (make serve's default port)")
    parser.add_argument("--texts", type=Path, default=DEMO, help="a CSV file with a `text` column")
    parser.add_argument("--requests", type=int, default=200, help="single-text requests to time")
    parser.add_argument("--total", type=int, default=1000, help="texts for the throughput run")
    parser.add_argument("--batch-size", type=int, default=100, help="texts per request in the throughput run")
    args = parser.parse_args()
    with open(args.texts, newline="", encoding="utf-8") as handle:
        pool = [row["text"] for row in csv.DictReader(handle) if row["text"].strip()]
    url = args.url.rstrip("/") + "/invocations"
    texts = list(itertools.islice(itertools.cycle(pool), max(args.total, args.requests)))

    for text in texts[:10]:  # warm-up: first requests pay for lazy initialisation
        post(url, [text])
    single = []
    for text in texts[: args.requests]:
        start = time.perf_counter()
        post(url, [text])
        single.append((time.perf_counter() - start) * 1000)

    batch = texts[: args.total]
    start = time.perf_counter()
    for offset in range(0, len(batch), args.batch_size):
        post(url, batch[offset : offset + args.batch_size])
    seconds = time.perf_counter() - start

    print(json.dumps({
        "url": url,
        "one_text_ms": {"requests": len(single), "p50": percentile(single, 50), "p95": percentile(single, 95),
                        "p99": percentile(single, 99), "mean": statistics.fmean(single)},
        "throughput": {"texts": len(batch), "batch_size": args.batch_size, "seconds": seconds,
                       "texts_per_second": len(batch) / seconds},
    }, indent=2))


if __name__ == "__main__":
    main()
