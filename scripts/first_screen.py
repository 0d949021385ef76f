"""The end of `make run`: the comparison's key rows, where the champion is registered and how to serve
and call it, or which member is closest to the SLA and the search that may close the gap.

Reads what the report stage wrote (reports/family.json and its metrics file); recomputes nothing.

    python -m scripts.first_screen [--params params.yaml] [--port 5001]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.config import DEFAULT_PARAMS_FILE, load_params
from pipeline.errors import FinCompressError
from pipeline.io import read_json

CURL = ("curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' \\\n"
        "      -d '{{\"dataframe_records\": [{{\"text\": \"Operating profit rose to EUR 13.1 mn.\"}}]}}'")
COLUMNS = "{:<26} {:>8} {:>8} {:>8} {:>10} {:>8}"


def key_rows(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The teacher (the reference), the champion or the member closest to the SLA, and the fastest member."""
    picked: list[tuple[dict[str, Any], str]] = [(rows[0], "the reference")]
    for row in rows:
        if row.get("champion"):
            picked.append((row, "champion"))
        elif row.get("closest_to_sla"):
            picked.append((row, "closest to the SLA"))
    fastest = min(rows, key=lambda row: row["latency_ms_p50"])
    if all(fastest is not row for row, _ in picked):
        picked.append((fastest, "fastest"))
    return picked


def first_screen(rows: list[dict[str, Any]], report: dict[str, Any], port: int, comparison: str) -> str:
    # family.json ends with the members left out (a failed gate, not built): they have no figures.
    rows = [row for row in rows if "excluded" not in row]
    lines = [f"The family: {len(rows)} members, the whole table in {comparison}", "",
             COLUMNS.format("member", "p50 ms", "speedup", "size MB", "val. ret.", "test F1")]
    for row, role in key_rows(rows):
        lines.append(COLUMNS.format(row["name"], f"{row['latency_ms_p50']:.2f}", f"{row['speedup_vs_teacher']:.1f}x",
                                    f"{row['size_mb']:.1f}", f"{row['validation_f1_retention']:.3f}",
                                    f"{row['test_macro_f1']:.3f}") + f"  {role}")
    lines.append("")
    champion = report.get("champion") or {}
    if "registry_version" in champion:
        name = champion["registered_model_name"]
        lines += [f"Champion {champion['member']}: registered as {name} version {champion['registry_version']}, "
                  f"alias champion (models:/{name}@champion).",
                  "Serve it:  make serve",
                  "Call it:   " + CURL.format(port=port)]
    elif champion:
        lines.append(f"Champion {champion['member']}: not registered (report.register_champion is false).")
    else:
        lines.append((report.get("no_champion") or {}).get("message") or "No champion: see the table.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.first_screen", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE)
    parser.add_argument("--port", type=int, default=5001, help="the port `make serve` listens on")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        reports = params.path(params.paths.reports)
        rows = read_json(reports / "family.json")
        report = read_json(params.path(params.paths.metrics) / "report.json")
    except (FinCompressError, OSError, ValueError) as error:
        print(f"error: no report to show ({error}); run the pipeline first: make run", file=sys.stderr)
        return 1
    comparison = (reports / "comparison.md").relative_to(params.root) if reports.is_relative_to(params.root) else reports
    print(first_screen(rows, report, args.port, str(comparison)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
