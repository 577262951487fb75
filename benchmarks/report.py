"""Turn the suite's results into a markdown table, a JSON file and a PNG chart,
and check them against the project's performance targets (as ratios).

    python benchmarks/report.py benchmarks/results/host.json [--readme README.md]

re-renders the markdown and chart from a JSON file and, with ``--readme``,
puts the summary table and the chart into the README's benchmark block.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = {False: "c-recv", True: "c-recv-zc"}  # keyed by "ran in the VM"
AREA_MIB = 64  # create_zcrx_server's default area
RSS_SLACK_MIB = 16  # "a small constant" over the area, for target 4


def median(results: dict[str, Any], scenario: str, receiver: str, key: str) -> float | None:
    run = results["runs"].get(scenario, {}).get(receiver)
    if run is None or key not in run:
        return None
    return run[key]["median"]  # type: ignore[no-any-return]


def is_iouzcrx(name: str) -> bool:
    return name.startswith("iouzcrx-")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# -- targets -------------------------------------------------------------------------
#
# Every target names its iouzcrx receiver and the receiver it is held against
# before the run; nothing is picked from the results afterwards.  A ratio is
# an advantage: above 1 when iouzcrx does better, whether the figure is one
# to raise (GB/s, requests/s, connections/s) or to lower (CPU, latency).

# (what is compared, the iouzcrx API, the uvloop receiver it replaces)
DROP_IN_PAIRS = [
    ("asyncio.Protocol", "protocol", "uvloop-protocol"),
    ("asyncio.BufferedProtocol", "buffered", "uvloop-buffered"),
    ("streams", "streams", "uvloop-streams"),
]
# Per scenario kind: (figure, key, True when higher is better).
SPEED = {
    "bulk": ("GB/s", "gbps", True),
    "rr": ("p50 latency", "p50_us", False),
    "short": ("conn/s", "rate", True),
}
CPU = {
    "bulk": ("send+recv CPU/GB", "total_cpu_s_per_gb", False),
    "rr": ("recv CPU/request", "recv_cpu_us_per_request", False),
    "short": ("recv CPU/conn", "recv_cpu_us_per_connection", False),
}
INSTRUCTIONS_GOAL = 223 / 2  # halve the 2026-11-25 figure


@dataclass(frozen=True)
class Target:
    number: int
    text: str
    receiver: str  # the iouzcrx receiver, named before the run
    peer: str
    scenario: str
    figure: str
    key: str
    higher_is_better: bool
    goal: float


def declared_targets(in_vm: bool, kinds: dict[str, str]) -> list[Target]:
    """The ratio targets, each with its receivers, for the scenarios in ``kinds``
    (name -> bulk | rr | short)."""
    mode = "copy" if in_vm else "bufring"
    declared: list[Target] = []
    for text, api, peer in DROP_IN_PAIRS:
        receiver = f"iouzcrx-{mode}-{api}-uvloop"
        for scenario, kind in kinds.items():
            for figure, key, higher in (SPEED[kind], CPU[kind]):
                declared.append(
                    Target(
                        1,
                        f"{text} drop-in vs uvloop",
                        receiver,
                        peer,
                        scenario,
                        figure,
                        key,
                        higher,
                        1.0,
                    )
                )
    if "bulk8" in kinds:
        declared.append(
            Target(
                2,
                "zero-copy protocol, one loop thread, vs one C epoll thread",
                f"iouzcrx-{mode}-zerocopy-uvloop",
                "c-epoll",
                "bulk8",
                "GB/s",
                "gbps",
                True,
                0.95,
            )
        )
    if in_vm:
        for scenario in ("bulk1", "bulk8"):
            if scenario in kinds:
                declared.append(
                    Target(
                        5,
                        "copy mode vs C RECV_ZC",
                        "iouzcrx-copy-zerocopy-uvloop",
                        "c-recv-zc",
                        scenario,
                        "GB/s",
                        "gbps",
                        True,
                        0.9,
                    )
                )
    return declared


def advantage(
    results: dict[str, Any], target: Target
) -> tuple[float | None, float | None, float | None]:
    """The ratio of medians, with the lowest and highest ratio of the runs made
    in the same round (both receivers ran back to back in it)."""
    runs = results["runs"].get(target.scenario, {})
    mine, theirs = runs.get(target.receiver, {}), runs.get(target.peer, {})
    if target.key not in mine or target.key not in theirs:
        return None, None, None

    def ratio(a: float, b: float) -> float | None:
        num, den = (a, b) if target.higher_is_better else (b, a)
        return num / den if den else None

    value = ratio(mine[target.key]["median"], theirs[target.key]["median"])
    paired = [ratio(a, b) for a, b in _same_rounds(mine, theirs, target.key)]
    paired = [r for r in paired if r is not None]
    if not paired:
        return value, None, None
    return value, min(paired), max(paired)


def _same_rounds(
    mine: dict[str, Any], theirs: dict[str, Any], key: str
) -> list[tuple[float, float]]:
    """(mine, theirs) for each round where both ran; with no round record
    (older results), the extremes: worst against best and best against worst."""
    a, b = mine[key], theirs[key]
    if "values" in a and "values" in b and "rounds" in mine and "rounds" in theirs:
        by_round = dict(zip(theirs["rounds"], b["values"], strict=True))
        return [
            (value, by_round[r])
            for r, value in zip(mine["rounds"], a["values"], strict=True)
            if r in by_round
        ]
    return [(a["min"], b["max"]), (a["max"], b["min"])]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each declared target with its measured ratio (None when not measured in
    this run)."""
    in_vm = bool(results["machine"].get("in_vm", False))
    kinds = {sc["name"]: sc["kind"] for sc in results["scenarios"]}
    rows: list[dict[str, Any]] = []
    for t in declared_targets(in_vm, kinds):
        value, low, high = advantage(results, t)
        rows.append(
            {
                "target": t.number,
                "text": t.text,
                "receiver": t.receiver,
                "peer": t.peer,
                "scenario": t.scenario,
                "figure": t.figure,
                "value": value,
                "min": low,
                "max": high,
                "goal": f">= {t.goal:g}",
                "met": None if value is None else value >= t.goal,
            }
        )
    counts = results.get("instructions")
    if isinstance(counts, dict) and counts.get("rows"):
        mode = "copy" if in_vm else "bufring"
        declared = [
            row
            for row in counts["rows"]
            if (row.get("mode"), row.get("loop"), row.get("consumer"), row.get("connections"))
            == (mode, "uvloop", "len", 1)
        ]
        if declared and declared[0]["instructions_per_chunk_library"] is not None:
            value = declared[0]["instructions_per_chunk_library"]
            rows.append(
                {
                    "target": 3,
                    "text": "instructions per 4 KiB chunk in the library (callgrind)",
                    "receiver": f"ZeroCopyProtocol, {mode}, uvloop, 1 conn",
                    "peer": "–",
                    "scenario": "instructions",
                    "figure": "instructions",
                    "value": value,
                    "min": None,
                    "max": None,
                    "goal": f"<= {INSTRUCTIONS_GOAL:g}",
                    "met": value <= INSTRUCTIONS_GOAL,
                }
            )
    growth = [
        (name, run["rss_growth_mib"]["max"], run.get("rss_second_half_mib", {}).get("max"))
        for sc in ("bulk1", "bulk8", "bulk64")
        for name, run in results["runs"].get(sc, {}).items()
        # The library's own memory: the drop-in protocols add their own
        # buffers per connection on top.
        if is_iouzcrx(name)
        and ("-zerocopy-" in name or "-streams-" in name)
        and "rss_growth_mib" in run
    ]
    if growth:
        worst = max(growth, key=lambda g: g[1])
        second = max((g[2] for g in growth if g[2] is not None), default=None)
        rows.append(
            {
                "target": 4,
                "text": "peak RSS growth while receiving (MiB), "
                f"most in a second half {_fmt(second, '.3f')}",
                "receiver": worst[0],
                "peer": "–",
                "scenario": "bulk",
                "figure": "MiB",
                "value": worst[1],
                "min": None,
                "max": None,
                "goal": f"<= area {AREA_MIB} + {RSS_SLACK_MIB}, none in the second half",
                "met": worst[1] <= AREA_MIB + RSS_SLACK_MIB and (second is None or second <= 1),
            }
        )
    return rows


def target_table(rows: list[dict[str, Any]]) -> list[str]:
    """The targets as markdown, one line per receiver pair and scenario: each
    figure's ratio with its min–max, and whether every one meets its goal."""
    lines = [
        "| # | target | iouzcrx receiver | against | scenario | ratios (min–max) | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in rows:
        key = (t["target"], t["text"], t["receiver"], t["peer"], t["scenario"], t["goal"])
        groups.setdefault(key, []).append(t)
    for (number, text, receiver, peer, scenario, goal), group in groups.items():
        ratios = "; ".join(f"{t['figure']} {_ratio_cell(t)}" for t in group)
        met_values = [t["met"] for t in group]
        met = "not measured" if None in met_values else "yes" if all(met_values) else "**no**"
        lines.append(
            f"| {number} | {text} | {receiver} | {peer} | {scenario} | {ratios} | {goal} | {met} |"
        )
    return lines


def _ratio_cell(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return "–"
    text = f"{t['value']:.2f}"
    if t["min"] is not None and t["max"] is not None:
        text += f" ({t['min']:.2f}–{t['max']:.2f})"
    return text


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
    """The command that produced these results, with the options that
    narrowed its default selection."""
    flags = " --vm" if results["machine"].get("in_vm") else ""
    flags += " --quick" if results["quick"] else ""
    for option, value in (results.get("options") or {}).items():
        if value:
            flags += f" --{option} {shlex.quote(str(value))}"
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
            "Ratios are iouzcrx's advantage (above 1: iouzcrx does better) of medians; the "
            "min–max pairs the runs of one round. Every receiver was named before the run.",
            "",
            *target_table(rows),
            "",
        ]
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
            "Targets: each names its iouzcrx receiver and the receiver it is held against "
            "before the run. A ratio is iouzcrx's advantage (above 1: iouzcrx does better: "
            "more GB/s, lower latency or CPU), of medians, with the lowest and highest "
            "ratio of the runs of one round.",
            "",
            *target_table(targets(results)),
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
