"""Medians, ratios and targets of one run, and the three outputs: JSON, Markdown, PNG.

Ratios are always NexFS over the other system from the same run, in the figure's own
direction: for throughput and IOPS above 1 means NexFS is faster; for elapsed times
(unit ``s``) below 1 means NexFS is faster.  The chart shows every ratio as a speed-up
(times are inverted) so that taller is better throughout.

Efficiency (issue 11's targets) is NexFS against the two reference systems of the same run:
the raw image (what the device does) and the ceiling (bench/ceilingfs.py: what any pyfuse3
filesystem gets).  At queue depth 1 a request and its device transfer happen one after the
other, so the best NexFS can do there is the *serial ideal* ``1 / (1/ceiling + 1/raw)``; with
four jobs it is ``min(ceiling, raw)``.  Every efficiency is computed for the cold figure and,
where the run has one, the hot figure (the raw image has no hot figure: it caches nothing, so
its cold one stands for both).

Two reference variants of the ceiling do what NexFS must do and nothing else
(bench/ceilingfs.py): ``ceiling-posix`` (no FUSE direct I/O, xattrs answered: a write is two
requests) and ``ceiling-dev`` (the same, its file on the image through the valve).  The
report gives NexFS's ratio to each (:func:`references`: what NexFS can still gain within
this design) and their own ratios against the same targets (:func:`efficiency` with
``subject``): a target the minimal device-backed filesystem misses too is beyond the design.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NEXFS, FUSE2FS, EXT4, RAW, CEILING = "nexfs", "fuse2fs", "ext4", "raw", "ceiling"
NBD = "nbd"
CEILING_POSIX, CEILING_DEV = "ceiling-posix", "ceiling-dev"
LABELS = {NEXFS: "NexFS", FUSE2FS: "fuse2fs", EXT4: "kernel ext4", RAW: "raw --direct=1",
          CEILING: "pyfuse3 ceiling", NBD: "NexFS on NBD", CEILING_POSIX: "ceiling-posix",
          CEILING_DEV: "ceiling-dev"}
OTHERS = (FUSE2FS, EXT4, RAW, CEILING, NBD, CEILING_POSIX, CEILING_DEV)
REFERENCES = (CEILING, CEILING_POSIX, CEILING_DEV, RAW)
"""The reference systems NexFS's efficiency is stated against (:func:`references`)."""
RSS_LIMIT_MIB = 256
MOUNT_LIMIT_S = 1.0


@dataclass(frozen=True)
class Target:
    """NexFS / ``other`` must be >= ``bound`` (throughput) or <= ``bound`` (time)."""

    workload: str
    other: str
    bound: float


TARGETS = (
    Target("seq-write-1m", FUSE2FS, 2.0),
    Target("seq-write-1m", EXT4, 1.0),
    Target("seq-read-1m", FUSE2FS, 1.0),
    Target("seq-read-1m", EXT4, 0.5),
    Target("seq-read-1m-direct", FUSE2FS, 1.0),
    Target("seq-read-1m-direct", EXT4, 0.5),
    Target("randread-4k-qd1-direct", FUSE2FS, 0.7),
    Target("randwrite-4k-qd1-direct", FUSE2FS, 1.0),
    Target("tar-extract", FUSE2FS, 0.7),
    Target("rm-rf", FUSE2FS, 0.7),
    Target("create", FUSE2FS, 0.7),
)

Figure = Callable[[str, str], "float | None"]
"""``figure(system, workload)``: a median from this run, or None."""


@dataclass(frozen=True)
class Efficiency:
    """``subject``'s ``workload`` over ``ideal(figure, workload, subject)`` must be >=
    ``bound`` (the subject is NexFS; a reference variant is held to the same bound)."""

    workload: str
    ideal_name: str
    ideal: Callable[[Figure, str, str], float | None]
    bound: float
    device: bool = False
    """The ideal counts the device: meaningless for a subject that reads no device."""


def _serial(figure: Figure, w: str, subject: str) -> float | None:
    ceiling, raw = figure(CEILING, w), figure(RAW, w)
    return 1 / (1 / ceiling + 1 / raw) if ceiling and raw else None


def _lesser(figure: Figure, w: str, subject: str) -> float | None:
    ceiling, raw = figure(CEILING, w), figure(RAW, w)
    return min(ceiling, raw) if ceiling and raw else None


def _own_qd1(figure: Figure, w: str, subject: str) -> float | None:
    return figure(subject, w.replace("-4jobs", "-qd1"))


EFFICIENCY = (
    Efficiency("randread-4k-qd1-direct", "serial ideal 1/(1/ceiling+1/raw)", _serial, 0.85,
               device=True),
    Efficiency("randread-4k-4jobs-direct", "min(ceiling, raw), 4 jobs", _lesser, 0.8,
               device=True),
    Efficiency("randread-4k-4jobs-direct", "NexFS's own QD1", _own_qd1, 2.5),
    Efficiency("randwrite-4k-qd1-direct", "ceiling", lambda f, w, s: f(CEILING, w), 0.8),
    Efficiency("randwrite-4k-4jobs-direct", "NexFS's own QD1", _own_qd1, 2.0),
)


def _figures(medians: dict[str, dict[str, float]]) -> Figure:
    def figure(system: str, workload: str) -> float | None:
        got = medians.get(system, {})
        if workload in got:
            return got[workload]
        # The raw image caches nothing: its cold figure is its hot one too.
        return got.get(workload.removesuffix("-hot")) if system == RAW else None

    return figure


def efficiency(medians: dict[str, dict[str, float]], subject: str = NEXFS
               ) -> list[dict[str, Any]]:
    """Every :data:`EFFICIENCY` row for the cold and the hot variant the run measured, for
    NexFS or (``subject``) a reference variant held to the same targets; "NexFS's own QD1"
    is then the subject's own."""
    figure = _figures(medians)
    rows = []
    for e in EFFICIENCY:
        if e.device and subject == CEILING_POSIX:
            continue
        for workload in (e.workload, f"{e.workload}-hot"):
            value = figure(subject, workload)
            ideal = e.ideal(figure, workload, subject)
            if workload.endswith("-hot") and value is None:
                continue  # this run has no hot variant of the job
            ratio = round(value / ideal, 3) if value and ideal else None
            row = {"workload": workload, "versus": e.ideal_name,
                   "ideal": None if ideal is None else round(ideal, 1),
                   "target": f">= {e.bound:g}x", "ratio": ratio,
                   "met": None if ratio is None else ratio >= e.bound}
            if subject != NEXFS:
                row = {"system": subject, **row}
            rows.append(row)
    return rows


def references(medians: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per efficiency job (cold and hot): NexFS's figure, each reference system's, and
    NexFS's ratio to each.  NexFS / ceiling-dev is what NexFS can still gain within this
    design; ceiling-dev / ceiling is what the device and the valve cost any design like it."""
    figure = _figures(medians)
    rows = []
    for job in dict.fromkeys(e.workload for e in EFFICIENCY):
        for workload in (job, f"{job}-hot"):
            nexfs = figure(NEXFS, workload)
            if nexfs is None and workload.endswith("-hot"):
                continue
            figures = {s: figure(s, workload) for s in REFERENCES}
            rows.append({
                "workload": workload, "nexfs": nexfs,
                "references": {s: None if v is None else round(v, 1)
                               for s, v in figures.items()},
                "nexfs_over": {s: round(nexfs / v, 3) if nexfs and v else None
                               for s, v in figures.items()},
            })
    return rows


def summarise(samples: dict[str, dict[str, list[float]]], units: dict[str, str]
              ) -> dict[str, Any]:
    """Medians per system and workload, NexFS ratios, the targets' verdicts and NexFS's
    efficiency against the reference systems."""
    medians = {system: {w: statistics.median(v) for w, v in figures.items() if v}
               for system, figures in samples.items()}
    nexfs = medians.get(NEXFS, {})
    ratios: dict[str, dict[str, float]] = {}
    for workload, value in nexfs.items():
        for other in OTHERS:
            base = medians.get(other, {}).get(workload)
            if base:
                ratios.setdefault(workload, {})[other] = round(value / base, 3)
    targets = []
    for t in TARGETS:
        ratio = ratios.get(t.workload, {}).get(t.other)
        lower_is_better = units.get(t.workload) == "s"
        met = None if ratio is None else (ratio <= t.bound if lower_is_better
                                          else ratio >= t.bound)
        targets.append({"workload": t.workload, "versus": t.other,
                        "target": f"{'<=' if lower_is_better else '>='} {t.bound:g}x",
                        "ratio": ratio, "met": met})
    return {"medians": {s: {w: round(v, 3) for w, v in m.items()} for s, m in medians.items()},
            "ratios": ratios, "targets": targets, "efficiency": efficiency(medians),
            "references": references(medians),
            "reference_efficiency": [row for s in (CEILING_POSIX, CEILING_DEV)
                                     if s in medians for row in efficiency(medians, s)]}


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.2f} s"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The results table (one row per workload), the targets and the efficiency tables."""
    units: dict[str, str] = result["units"]
    medians: dict[str, dict[str, float]] = result["summary"]["medians"]
    ratios: dict[str, dict[str, float]] = result["summary"]["ratios"]
    systems = [s for s in (NEXFS, NBD, FUSE2FS, EXT4, RAW, CEILING, CEILING_POSIX, CEILING_DEV)
               if s in medians]
    head = ["workload", "unit", *(LABELS[s] for s in systems), "NexFS/fuse2fs", "NexFS/ext4",
            "NexFS/ceiling"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(systems) + 3)]
    for workload, unit in units.items():
        cells = [workload, "time" if unit == "s" else unit]
        cells += [_fmt(medians[s].get(workload), unit) for s in systems]
        for other in (FUSE2FS, EXT4, CEILING):
            r = ratios.get(workload, {}).get(other)
            cells.append("—" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    rows = result["summary"].get("efficiency", [])
    if rows:
        lines += ["", "| efficiency (same run) | ideal | NexFS ratio | target | met |",
                  "|---|---:|---:|---|---|"]
        lines += [_efficiency_row(f"{e['workload']} vs {e['versus']}", e) for e in rows]
    lines += _reference_tables(result["summary"])
    lines += ["", "| target | NexFS ratio | met |", "|---|---:|---|"]
    for t in result["summary"]["targets"]:
        verdict = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['workload']} vs {LABELS[t['versus']]} {t['target']} | {ratio} | "
                     f"{verdict} |")
    memory = result.get("nexfs_peak_rss_mib")
    if memory is not None:
        ok = "yes" if memory < RSS_LIMIT_MIB else "**no**"
        lines.append(f"| NexFS daemon peak RSS (VmHWM) < {RSS_LIMIT_MIB} MiB | "
                     f"{memory:.0f} MiB | {ok} |")
    mount = result.get("mount_1tib_s")
    if mount is not None:
        ok = "yes" if mount < MOUNT_LIMIT_S else "**no**"
        lines.append(f"| mount of a 1 TiB image < {MOUNT_LIMIT_S:g} s | {mount:.2f} s | {ok} |")
    return "\n".join(lines) + "\n"


def _reference_tables(summary: dict[str, Any]) -> list[str]:
    """NexFS against the reference variants, and their own efficiency (same run)."""
    lines: list[str] = []
    refs = [r for r in summary.get("references", [])
            if r["references"].get(CEILING_POSIX) or r["references"].get(CEILING_DEV)]
    if refs:
        shown = [s for s in REFERENCES if any(r["references"].get(s) for r in refs)]
        lines += ["", "| NexFS vs the references (same run) | NexFS | "
                  + " | ".join(LABELS[s] for s in shown) + " | "
                  + " | ".join(f"NexFS/{s}" for s in shown if s != RAW) + " |",
                  "|---|---:|" + "---:|" * (2 * len(shown) - (RAW in shown))]
        for r in refs:
            cells = [r["workload"], _fmt(r["nexfs"], "IOPS")]
            cells += [_fmt(r["references"][s], "IOPS") for s in shown]
            cells += ["—" if r["nexfs_over"][s] is None else f"{r['nexfs_over'][s]:.2f}"
                      for s in shown if s != RAW]
            lines.append("| " + " | ".join(cells) + " |")
    rows = summary.get("reference_efficiency", [])
    if rows:
        lines += ["", "| reference's own efficiency (same run) | ideal | ratio | target | met |",
                  "|---|---:|---:|---|---|"]
        lines += [_efficiency_row(f"{e['system']}: {e['workload']} vs "
                                  + e["versus"].replace("NexFS's own", "its own"), e)
                  for e in rows]
    return lines


def _efficiency_row(label: str, e: dict[str, Any]) -> str:
    """One row of an efficiency table: the label, the ideal, the ratio, the target, met."""
    verdict = {True: "yes", False: "**no**", None: "not measured"}[e["met"]]
    ideal = "—" if e["ideal"] is None else f"{e['ideal']:,.0f}"
    ratio = "—" if e["ratio"] is None else f"{e['ratio']:.2f}"
    return f"| {label} | {ideal} | {ratio} | {e['target']} | {verdict} |"


def chart(result: dict[str, Any], path: Path) -> None:
    """A bar chart of NexFS's speed-up over fuse2fs and over kernel ext4 per workload."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    units: dict[str, str] = result["units"]
    ratios: dict[str, dict[str, float]] = result["summary"]["ratios"]
    workloads = [w for w in units if w in ratios]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(workloads) + 2), 5))
    width = 0.38
    for k, (other, colour) in enumerate(((FUSE2FS, "tab:orange"), (EXT4, "tab:blue"))):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            r = ratios[w].get(other)
            if r:
                xs.append(i + (k - 0.5) * width)
                ys.append(1 / r if units[w] == "s" else r)
        ax.bar(xs, ys, width, label=f"NexFS vs {LABELS[other]}", color=colour)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("NexFS speed-up (x, log scale; > 1 is faster)")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, rotation=40, ha="right", fontsize=8)
    ax.set_title(f"NexFS vs fuse2fs and kernel ext4 ({result['config']['mode']} run, "
                 "medians)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``stem``.json, .md and .png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result))
    chart(result, paths["png"])
    return paths
