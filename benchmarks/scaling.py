"""The scaling section's report: ``python -m pipeline run`` by rows, time and peak
memory in total and per stage (measured by :mod:`benchmarks.end_to_end`)."""

from __future__ import annotations

from pipeline.dag import STAGE_NAMES as STAGES

# memory "flat": the largest size's peak within this factor of 10^6 rows' (and time per row too)
FLAT = 1.25
BASE = "1000000"


def _sizes(e2e: dict) -> list[int]:
    return sorted(int(r) for r in e2e)


def markdown(e2e: dict) -> list[str]:
    lines = ["| end-to-end rows | wall s | peak MiB | train chunks | "
             + " | ".join(f"{s} s / MiB" for s in STAGES) + " |", "|---|---|---|---|" + "---|" * len(STAGES)]
    for rows in _sizes(e2e):
        r = e2e[str(rows)]
        peaks = r.get("stages_peak_mib") or {}
        lines.append(f"| {rows} | {r['wall_s']} | {r['peak_mib']} | {r.get('train_chunks') or ''} | "
                     + " | ".join(f"{r['stages_s'][s]} / {peaks.get(s) or '-'}" for s in STAGES) + " |")
    return lines + [""]


def targets(e2e: dict) -> list[tuple[str, str, str, bool]]:
    rows = []
    if BASE in e2e:
        wall = e2e[BASE]["wall_s"]
        rows.append(("python -m pipeline run, 10^6 rows", "< 25 s", f"{wall:.1f} s", wall < 25))
    largest = str(max(_sizes(e2e), default=0))
    if BASE in e2e and int(largest) > int(BASE):
        base, big = e2e[BASE], e2e[largest]
        memory = big["peak_mib"] / base["peak_mib"]
        rows.append((f"python -m pipeline run peak memory, {largest} rows over 10^6 rows'", f"<= {FLAT}",
                     f"{big['peak_mib']:.0f} / {base['peak_mib']:.0f} MiB = {memory:.2f}", memory <= FLAT))
        per_row = (big["wall_s"] / int(largest)) / (base["wall_s"] / int(BASE))
        rows.append((f"python -m pipeline run seconds per row, {largest} rows over 10^6 rows'", f"<= {FLAT}",
                     f"{per_row:.2f}", per_row <= FLAT))
        train = (big["stages_s"]["train"] / int(largest)) / (base["stages_s"]["train"] / int(BASE))
        rows.append((f"train seconds per row, {largest} rows over 10^6 rows'", f"<= {FLAT}", f"{train:.2f}",
                     train <= FLAT))
    return rows


def plot(ax_time, ax_memory, e2e: dict) -> None:
    """Seconds (left) and peak MiB (right) against rows, the whole run and each stage."""
    rows = _sizes(e2e)
    ax_time.plot(rows, [e2e[str(r)]["wall_s"] for r in rows], "o-", color="black", label="python -m pipeline run")
    ax_memory.plot(rows, [e2e[str(r)]["peak_mib"] for r in rows], "o-", color="black",
                   label="python -m pipeline run")
    for stage in STAGES:
        ax_time.plot(rows, [max(e2e[str(r)]["stages_s"][stage], 1e-3) for r in rows], ".--", label=stage,
                     alpha=0.8)
        peaks = [(e2e[str(r)].get("stages_peak_mib") or {}).get(stage) for r in rows]
        if any(p is not None for p in peaks):
            ax_memory.plot([r for r, p in zip(rows, peaks) if p is not None], [p for p in peaks if p is not None],
                           ".--", label=stage, alpha=0.8)
    if len(rows) > 1:  # what linear time would be, from the middle size
        mid = rows[len(rows) // 2]
        ax_time.plot(rows, [e2e[str(mid)]["wall_s"] * r / mid for r in rows], ":", color="grey",
                     label="linear in rows")
    ax_time.set(xscale="log", yscale="log", xlabel="rows", ylabel="seconds", title="End to end: time")
    ax_memory.set(xscale="log", xlabel="rows", ylabel="peak RSS, MiB", ylim=(0, None),
                  title="End to end: peak memory (per stage: its own)")
    ax_time.legend(fontsize=7)
    ax_memory.legend(fontsize=7)
