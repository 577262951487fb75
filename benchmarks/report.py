"""Turn the suite's results into a markdown table, a JSON file and a PNG chart,
and check them against the project's performance targets (as ratios).

    python benchmarks/report.py benchmarks/results/host.json [--readme README.md]

re-renders the markdown and chart from a JSON file and, with ``--readme``,
puts the summary table and the chart into the README's benchmark block.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

REFERENCE = {False: "c-recv", True: "c-recv-zc"}  # keyed by "ran in the VM"
AREA_MIB = 64  # create_zcrx_server's default area
RSS_SLACK_MIB = 16  # "a small constant" over the area, for target 6


def median(results: dict[str, Any], scenario: str, receiver: str, key: str) -> float | None:
    run = results["runs"].get(scenario, {}).get(receiver)
    if run is None or key not in run:
        return None
    return run[key]["median"]  # type: ignore[no-any-return]


def best(
    results: dict[str, Any],
    scenario: str,
    key: str,
    pick: Callable[[str], bool],
    lowest: bool = False,
) -> tuple[str, float] | None:
    """The receiver matching ``pick`` with the best median of ``key``."""
    found = [
        (name, run[key]["median"])
        for name, run in results["runs"].get(scenario, {}).items()
        if pick(name) and key in run
    ]
    if not found:
        return None
    return min(found, key=lambda x: x[1]) if lowest else max(found, key=lambda x: x[1])


def is_iouzcrx(name: str) -> bool:
    return name.startswith("iouzcrx-")


def is_stock(name: str) -> bool:
    return name.startswith(("asyncio-", "uvloop-"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured ratio (None when not measured in this run)."""
    in_vm = results["machine"].get("in_vm", False)
    ref = REFERENCE[in_vm]
    rows: list[dict[str, Any]] = []

    def add(
        number: int, text: str, value: float | None, goal: str, ok: bool | None, detail: str
    ) -> None:
        rows.append(
            {
                "target": number,
                "text": text,
                "value": value,
                "goal": goal,
                "met": ok,
                "detail": detail,
            }
        )

    def add_ratio(
        number: int, text: str, a: float | None, b: float | None, bound: str, detail: str
    ) -> None:
        """A ratio target: ``bound`` is ">= x" or "<= x"."""
        r = _ratio(a, b)
        limit = float(bound[3:])
        ok = None if r is None else (r >= limit if bound.startswith(">=") else r <= limit)
        add(number, text, r, bound, ok, detail)

    if not in_vm:
        top = best(results, "bulk8", "gbps", is_iouzcrx)
        stock = best(results, "bulk8", "gbps", is_stock)
        c = median(results, "bulk8", ref, "gbps")
        one_thread = median(results, "bulk8", "c-epoll", "gbps")
        if top:
            detail = f"{top[0]} {top[1]:.2f} GB/s vs {_fmt(c, '.2f')} GB/s"
            if one_thread and c:
                # The library runs on one loop thread; c-recv uses one per connection.
                detail += (
                    f"; one C epoll thread (c-epoll): {one_thread:.2f} GB/s,"
                    f" {one_thread / c:.2f}× C recv(), iouzcrx {top[1] / one_thread:.2f}× it"
                )
            add_ratio(1, "bulk 8 conns: throughput vs C recv()", top[1], c, ">= 0.9", detail)
            if stock:
                add_ratio(
                    1,
                    "bulk 8 conns: throughput vs best stock asyncio/uvloop",
                    top[1],
                    stock[1],
                    ">= 1.4",
                    f"{top[0]} vs {stock[0]} {stock[1]:.2f} GB/s"
                    + (f"; 1.4× it is {1.4 * stock[1] / c:.2f}× C recv()" if c else ""),
                )
            cpu = median(results, "bulk8", top[0], "total_cpu_s_per_gb")
            c_cpu = median(results, "bulk8", ref, "total_cpu_s_per_gb")
            add_ratio(
                1,
                "bulk 8 conns: sender+receiver CPU/GB vs C recv()",
                cpu,
                c_cpu,
                "<= 1.1",
                f"{top[0]} {_fmt(cpu, '.3f')} s/GB vs {_fmt(c_cpu, '.3f')} s/GB",
            )
        top = best(results, "bulk1", "gbps", is_iouzcrx)
        c = median(results, "bulk1", ref, "gbps")
        if top:
            add_ratio(
                2,
                "bulk 1 conn: throughput vs C recv()",
                top[1],
                c,
                ">= 0.95",
                f"{top[0]} {top[1]:.2f} GB/s vs {_fmt(c, '.2f')} GB/s",
            )
        top = best(results, "rr1k", "p50_us", is_iouzcrx, lowest=True)
        uv = median(results, "rr1k", "uvloop-protocol", "p50_us")
        if top:
            add_ratio(
                3,
                "1 KiB req/resp: p50 latency vs uvloop Protocol",
                top[1],
                uv,
                "<= 1.0",
                f"{top[0]} {top[1]:.1f} us vs {_fmt(uv, '.1f')} us",
            )
    else:
        for scenario in ("bulk1", "bulk8"):
            top = best(
                results, scenario, "gbps", lambda n: is_iouzcrx(n) and n.startswith("iouzcrx-copy-")
            )
            c = median(results, scenario, ref, "gbps")
            if top:
                add_ratio(
                    4,
                    f"VM copy mode, {scenario}: throughput vs C RECV_ZC",
                    top[1],
                    c,
                    ">= 0.9",
                    f"{top[0]} vs {ref}",
                )
    counts = results.get("instructions")
    if isinstance(counts, dict) and counts.get("rows"):
        lib = [row for row in counts["rows"] if row.get("consumer") == "len"]
        if lib:
            low = min(lib, key=lambda row: row["instructions_per_chunk_library"] or 1e9)
            value = low["instructions_per_chunk_library"]
            add(
                5,
                "instructions per 4 KiB chunk in the library",
                value,
                "<= 300",
                value <= 300,
                f"{low['mode']} on {low['loop']}",
            )
    growth = [
        (name, run["rss_growth_mib"]["max"], run.get("rss_second_half_mib", {}).get("max"))
        for sc in ("bulk1", "bulk8", "bulk64")
        for name, run in results["runs"].get(sc, {}).items()
        # The library's own memory: the BufferedProtocol drop-in adds its
        # 256 KiB bytearray per connection on top.
        if is_iouzcrx(name) and "-buffered-" not in name and "rss_growth_mib" in run
    ]
    if growth:
        worst = max(growth, key=lambda g: g[1])
        second = max((g[2] for g in growth if g[2] is not None), default=None)
        ok = worst[1] <= AREA_MIB + RSS_SLACK_MIB and (second is None or second <= 1)
        add(
            6,
            "peak RSS growth while receiving (MiB)",
            worst[1],
            f"<= area {AREA_MIB} + {RSS_SLACK_MIB}, none in the second half",
            ok,
            f"worst {worst[0]}; most growth in a run's second half: {_fmt(second, '.3f')} MiB",
        )
    return rows


# -- markdown ----------------------------------------------------------------------

BULK_COLUMNS = [
    ("GB/s", "gbps", "{:.2f}"),
    ("recv CPU s/GB", "recv_cpu_s_per_gb", "{:.3f}"),
    ("send+recv CPU s/GB", "total_cpu_s_per_gb", "{:.3f}"),
    ("chunks/s", "chunks_per_s", "{:,.0f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
]
RR_COLUMNS = [
    ("req/s", "rate", "{:,.0f}"),
    ("p50 µs", "p50_us", "{:.1f}"),
    ("p99 µs", "p99_us", "{:.1f}"),
    ("recv CPU µs/req", "recv_cpu_us_per_request", "{:.1f}"),
]
SHORT_COLUMNS = [
    ("conn/s", "rate", "{:,.0f}"),
    ("recv CPU µs/conn", "recv_cpu_us_per_connection", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
]
COLUMNS = {"bulk": BULK_COLUMNS, "rr": RR_COLUMNS, "short": SHORT_COLUMNS}
RATIO_KEY = {"bulk": "gbps", "rr": "p50_us", "short": "rate"}


def cell(run: dict[str, Any], key: str, fmt: str, repeat: int) -> str:
    if key not in run:
        return "–"
    m = run[key]
    text = fmt.format(m["median"])
    if repeat > 1:
        text += f" ({fmt.format(m['min'])}–{fmt.format(m['max'])})"
    return text


def command(results: dict[str, Any]) -> str:
    """The command that produced these results (its default selection)."""
    flags = " --vm" if results["machine"].get("in_vm") else ""
    flags += " --quick" if results["quick"] else ""
    return f"bash benchmarks/run{flags}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    where = "VM (qemu TCG)" if m.get("in_vm") else "host"
    ref = REFERENCE[bool(m.get("in_vm"))]
    quick = " Quick run: sizes too small to compare." if results["quick"] else ""
    lines = [
        f"Benchmarks of {results['date']} on the {where}: Linux {m['kernel']}, {m['cpu']}, "
        f"{m['cores']} cores, Python {m['python']}, uvloop {m.get('uvloop', '–')}, "
        f"iouzcrx {m['iouzcrx']}. Loopback TCP; C sender; medians of {results['repeat']} "
        f"interleaved runs (min–max).{quick} Command: `{command(results)}`.",
        "",
    ]
    for sc in results["scenarios"]:
        runs = results["runs"].get(sc["name"], {})
        if not runs:
            continue
        columns = COLUMNS[sc["kind"]]
        ratio_key = RATIO_KEY[sc["kind"]]
        ref_value = runs.get(ref, {}).get(ratio_key, {}).get("median")
        lines.append(f"### {sc['title']}")
        lines.append("")
        header = ["receiver"] + [c[0] for c in columns] + [f"{ratio_key} vs {ref}"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for name, run in runs.items():
            row = [name] + [cell(run, key, fmt, results["repeat"]) for _, key, fmt in columns]
            value = run.get(ratio_key, {}).get("median")
            row.append(f"{value / ref_value:.2f}×" if value and ref_value else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    counts = results.get("instructions")
    if isinstance(counts, dict) and counts.get("rows"):
        lines += ["### Instructions per 4 KiB chunk (callgrind, user space)", ""]
        lines += [
            "| mode | loop | consumer | conns | chunks | deliveries | library | whole process |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in counts["rows"]:
            lib = row["instructions_per_chunk_library"]
            lines.append(
                f"| {row['mode']} | {row['loop']} | {row['consumer']} | "
                f"{row['connections']} | {row['chunks']} | {row['deliveries']} | "
                f"{'–' if lib is None else f'{lib:,.0f}'} | "
                f"{row['instructions_per_chunk_process']:,.0f} |"
            )
        lines.append("")
    elif isinstance(counts, dict) and counts.get("error"):
        lines += [f"Instruction counts not measured: {counts['error'].splitlines()[-1]}", ""]
    rows = targets(results)
    if rows:
        lines += [
            "### Targets",
            "",
            "| # | target | measured | goal | met | detail |",
            "|---|---|---|---|---|---|",
        ]
        for t in rows:
            value = "–" if t["value"] is None else f"{t['value']:.2f}"
            met = {True: "yes", False: "no", None: "–"}[t["met"]]
            lines.append(
                f"| {t['target']} | {t['text']} | {value} | {t['goal']} | {met} | {t['detail']} |"
            )
        lines.append("")
    if results["unavailable"]:
        lines += [
            "Not available here: "
            + "; ".join(f"{n} ({why})" for n, why in results["unavailable"].items()),
            "",
        ]
    if results["failures"]:
        lines += [
            "Failed runs: "
            + "; ".join(
                f"{f['scenario']} {f['receiver']}: {f['error']}" for f in results["failures"]
            ),
            "",
        ]
    return "\n".join(lines)


# -- chart ---------------------------------------------------------------------------


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = []
    for sc in results["scenarios"]:
        runs = results["runs"].get(sc["name"], {})
        if not runs:
            continue
        if sc["kind"] == "bulk":
            panels.append((sc, "gbps", "GB/s (higher is better)"))
            panels.append((sc, "recv_cpu_s_per_gb", "receiver CPU s/GB (lower is better)"))
        elif sc["kind"] == "rr":
            panels.append((sc, "rate", "requests/s (higher is better)"))
            panels.append((sc, "p50_us", "p50 latency µs (lower is better)"))
        else:
            panels.append((sc, "rate", "connections/s (higher is better)"))
            panels.append((sc, "recv_cpu_us_per_connection", "receiver CPU µs/conn (lower)"))
    if not panels:
        return False
    names = list(
        dict.fromkeys(n for sc in results["scenarios"] for n in results["runs"].get(sc["name"], {}))
    )
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(
        rows, 2, figsize=(14, 0.23 * len(names) * rows + 1.2 * rows), squeeze=False
    )
    for ax, (sc, key, label) in zip(axes.flat, panels, strict=False):
        runs = results["runs"][sc["name"]]
        shown = [n for n in names if n in runs and key in runs[n]]
        med = [runs[n][key]["median"] for n in shown]
        err = [
            [runs[n][key]["median"] - runs[n][key]["min"] for n in shown],
            [runs[n][key]["max"] - runs[n][key]["median"] for n in shown],
        ]
        colours = [
            "#d62728" if n.startswith("c-") else "#1f77b4" if is_iouzcrx(n) else "#7f7f7f"
            for n in shown
        ]
        ax.barh(range(len(shown)), med, xerr=err, color=colours)
        ax.set_yticks(range(len(shown)), shown, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{sc['title']}: {label}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    m = results["machine"]
    fig.suptitle(
        f"iouzcrx benchmarks, {results['date']}, Linux {m['kernel']}, {m['cpu']} "
        "(red: C, blue: iouzcrx, grey: stock asyncio/uvloop)",
        fontsize=10,
    )
    # Leave the top strip to the title, whatever the figure's height.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


SUMMARY_COLUMNS = [
    ("bulk1", "gbps", "bulk 1 conn GB/s", "{:.2f}"),
    ("bulk8", "gbps", "bulk 8 conns GB/s", "{:.2f}"),
    ("bulk64", "gbps", "bulk 64 conns GB/s", "{:.2f}"),
    ("bulk8", "total_cpu_s_per_gb", "bulk 8 send+recv CPU s/GB", "{:.3f}"),
    ("rr1k", "p50_us", "1 KiB req p50 µs", "{:.1f}"),
    ("rr16k", "p50_us", "16 KiB req p50 µs", "{:.1f}"),
    ("short", "rate", "short conn/s", "{:,.0f}"),
]


def summary(results: dict[str, Any]) -> str:
    """One compact table (medians) of every receiver across the scenarios."""
    columns = [c for c in SUMMARY_COLUMNS if results["runs"].get(c[0])]
    names = list(
        dict.fromkeys(n for sc in results["scenarios"] for n in results["runs"].get(sc["name"], {}))
    )
    lines = [
        "| receiver | " + " | ".join(c[2] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in names:
        cells = []
        for scenario, key, _, fmt in columns:
            value = median(results, scenario, name, key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(results: dict[str, Any], readme: Path, chart_path: str) -> None:
    """Replace the block between the benchmark markers in ``readme``."""
    start, end = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} block")
    m = results["machine"]
    block = "\n".join(
        [
            start,
            f"Measured {results['date']} on Linux {m['kernel']}, {m['cpu']}, {m['cores']} cores, "
            f"Python {m['python']}, uvloop {m.get('uvloop', '–')}; medians of "
            f"{results['repeat']} interleaved runs over loopback, by `{command(results)}`. "
            "Full tables with min–max, "
            f"CPU, chunks/s, RSS and the targets: `{Path(chart_path).with_suffix('.md')}`.",
            "",
            summary(results),
            "",
            f"![benchmark chart]({chart_path})",
            end,
        ]
    )
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])


def write_report(results: dict[str, Any], directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = directory / f"{stem}.md"
    md_path.write_text(markdown(results))
    paths = [json_path, md_path]
    png_path = directory / f"{stem}.png"
    if chart(results, png_path):
        paths.append(png_path)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a results file written by suite.py")
    parser.add_argument(
        "--readme", type=Path, help="also put the summary table and chart into this README"
    )
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    for written in write_report(data, args.json.parent, args.json.stem):
        print(written)
    if args.readme:
        png = args.json.with_suffix(".png").resolve()
        update_readme(data, args.readme, str(png.relative_to(args.readme.resolve().parent)))
