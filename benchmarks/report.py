"""The report of a benchmark run: results.json, results.md (the targets table
first, then one table per benchmark) and the plots serving.png and scaling.png.
results.md is written from results.json's content only, so the two always agree."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import lakehouse, scaling
from benchmarks.serving import CHAIN, CLIENTS, FLOOR, PREDICT, TARGETS


def write(results: dict, out: Path) -> str:
    """Targets into ``results``, then results.json, results.md and the plots in ``out``."""
    results["targets"] = [dict(zip(("target", "wanted", "measured", "met"), t)) for t in targets(results)]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results) + backup_markdown(results) + lakehouse.markdown(results)
    (out / "results.md").write_text(text)
    plots(results, out)
    backup_plot(results, out)
    lakehouse.plot(results, out)
    return text


def _lookups(serving: dict) -> dict:
    """The in-process lookups: one entity's features by raw HMGET and by Feast's SDK."""
    return {name: serving[name] for name in ("raw_redis_hmget", "feast_sdk_get_online_features") if name in serving}


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results.get("serving", {}).get("servers"):
        serving, servers = results["serving"], results["serving"]["servers"]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.8), width_ratios=(1.4, 1, 1))
        single = {f"{n} ({c})": servers[f"{c}/1/{n}"] for c in ("wrk", "python") for n in (PREDICT, FLOOR)
                  if f"{c}/1/{n}" in servers}
        single.update({f"{n} (in-process)": r for n, r in _lookups(serving).items()})
        names = list(single)
        a1.barh(names, [single[n]["p50_ms"] for n in names], label="p50")
        a1.barh(names, [single[n]["p99_ms"] - single[n]["p50_ms"] for n in names],
                left=[single[n]["p50_ms"] for n in names], alpha=0.5, label="p99")
        a1.set(xlabel="ms (one client)", title="Latency, one entity")
        a1.set_xscale("log")
        a1.set_xlim(left=0.02)  # bars start at 0, which a log axis cannot show
        a1.legend()
        many = {n: servers[f"python/{CLIENTS}/{n}"] for n in (PREDICT, FLOOR, CHAIN)}
        a2.barh(list(many), [r["req_per_s"] for r in many.values()], color=["tab:blue", "tab:grey", "tab:red"])
        a2.set(xlabel=f"requests/s, {CLIENTS} Python clients", title="Throughput over HTTP")
        b = serving["batch"]
        a3.bar(["POST /predict", "Feast SDK\n(in-process)"], [b["predict_post_rows_per_s"], b["feast_sdk_rows_per_s"]],
               color=["tab:blue", "tab:grey"])
        a3.set(ylabel="rows/s", title=f"Batch of {b['entities']} entities")
        fig.tight_layout()
        fig.savefig(out / "serving.png", dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    e2e, feats, loading = results.get("end_to_end", {}), results.get("features", {}), results.get("loading", {})
    axes = [axes[0], axes[2], axes[3], axes[1]]  # time and memory of the whole run side by side
    if e2e:
        scaling.plot(axes[0], axes[3], e2e)
    if feats:
        frows = sorted(int(r) for r in feats)
        axes[1].plot(frows, [feats[str(r)]["features_rows_per_s"] for r in frows], "o-", label="features stage")
        axes[1].plot(frows, [feats[str(r)]["pyarrow_rows_per_s"] for r in frows], "s-", label="bare pyarrow pass")
        twin = axes[1].twinx()
        twin.plot(frows, [feats[str(r)]["features_peak_mib"] for r in frows], "^:", color="grey",
                  label="stage peak MiB")
        twin.set(ylabel="peak MiB", ylim=(0, None))
        axes[1].set(xscale="log", xlabel="rows", ylabel="rows/s", title="Features throughput and memory")
        axes[1].legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
    if "ratio" in loading:
        names = ["feast_materialize", "project_loader"]
        axes[2].bar(names, [loading[n]["rows_per_s"] for n in names], color=["tab:grey", "tab:blue"])
        for i, n in enumerate(names):
            axes[2].annotate(f"{loading[n]['seconds']} s, {loading[n]['peak_mib']:.0f} MiB",
                             (i, loading[n]["rows_per_s"]), ha="center", va="bottom", fontsize=9)
        axes[2].set(ylabel="rows/s", title=f"Loading Redis, {loading['project_loader']['rows']} rows "
                                           f"({loading['ratio']:.1f}x)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    if results.get("targets"):
        lines += ["| target | wanted | measured | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['wanted']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
                  for t in results["targets"]]
        lines.append("")
    if results.get("serving", {}).get("servers"):
        serving, method = results["serving"], results["serving"]["method"]
        lines += [f"Serving: {' and '.join(method['clients'])}, median of {method['rounds']} interleaved rounds "
                  f"of {method['seconds_per_run']} s per server; Redis: {method['redis']}.", "",
                  "| client / connections / server | p50 ms | p99 ms | req/s |", "|---|---|---|---|"]
        for key, r in serving["servers"].items():
            lines.append(f"| {key} | {r['p50_ms']} | {r['p99_ms']} | {r['req_per_s'] or ''} |")
        for name, r in _lookups(serving).items():
            lines.append(f"| in-process / 1 / {name} | {r['p50_ms']} | {r['p99_ms']} | |")
        b = serving["batch"]
        lines += ["", f"| batch of {b['entities']} | ms per batch | rows/s |", "|---|---|---|",
                  f"| POST /predict | {b['predict_post_ms']} | {b['predict_post_rows_per_s']} |",
                  f"| Feast SDK get_online_features (in-process) | {b['feast_sdk_ms']} | {b['feast_sdk_rows_per_s']} |",
                  ""]
    if results.get("loading"):
        lines += ["| loading Redis | rows | entities | seconds | rows/s | peak MiB |", "|---|---|---|---|---|---|"]
        for name in ("feast_materialize", "project_loader"):
            r = results["loading"][name]
            lines.append(f"| {name} | {r['rows']} | {r['entities']} | {r['seconds']} | {r['rows_per_s']} | "
                         f"{r['peak_mib']} |")
        lines.append("")
    if results.get("features"):
        lines += ["| features rows | stage rows/s | stage peak MiB | pyarrow rows/s | pyarrow peak MiB | ratio |",
                  "|---|---|---|---|---|---|"]
        for rows, r in results["features"].items():
            lines.append(f"| {rows} | {r['features_rows_per_s']} | {r['features_peak_mib']} | "
                         f"{r['pyarrow_rows_per_s']} | {r['pyarrow_peak_mib']} | {r['ratio_to_pyarrow']} |")
        lines.append("")
    if results.get("end_to_end"):
        lines += scaling.markdown(results["end_to_end"])
    return "\n".join(lines) + "\n"


def targets(results: dict) -> list[tuple[str, str, str, bool]]:
    """(target, wanted, measured, met) for every performance target this run measured."""
    rows = []
    serving, loading = results.get("serving", {}), results.get("loading", {})
    for key, wanted, met in TARGETS:
        if key in serving.get("ratios", {}):
            value = serving["ratios"][key]
            rows.append((f"/predict {key}", wanted, f"{value:.2f}x", met(value)))
    if "ratio" in loading:
        rows += [(f"loader rows/s over feast materialize ({loading['project_loader']['rows']} rows)", ">= 5",
                  f"{loading['ratio']:.1f}x", loading["ratio"] >= 5),
                 ("loader peak memory", "< 1024 MiB", f"{loading['project_loader']['peak_mib']:.0f} MiB",
                  loading["project_loader"]["peak_mib"] < 1024)]
    for n, f in results.get("features", {}).items():
        rows.append((f"features rows/s over bare pyarrow ({n} rows)", ">= 0.5", f"{f['ratio_to_pyarrow']:.2f}",
                     f["ratio_to_pyarrow"] >= 0.5))
    feats = results.get("features", {})
    if len(feats) > 1:
        peaks = [f["features_peak_mib"] for f in feats.values()]
        rows.append(("features peak memory, smallest to largest size", "flat",
                     f"{min(peaks):.0f} to {max(peaks):.0f} MiB", max(peaks) <= 1.25 * min(peaks)))
    rows += scaling.targets(results.get("end_to_end", {}))
    return rows


# ------------------------------------------------------------------ backup
def backup_markdown(results: dict) -> str:
    """The backup section's table: pipeline.backup beside a plain copy of the same files."""
    b = results.get("backup")
    if not b:
        return ""
    r, mb = b["ratios"], b["bytes"] / 1e6
    lines = ["", f"Backup and restore, {b['rows']} rows: {b['files']} files, {mb:.1f} MB, one SeaweedFS on 127.0.0.1"
             + (f" ({b['machine']})." if b.get("machine") else "."),
             "", "| backup / restore | seconds | MB/s | plain copy s | plain MB/s | ratio |", "|---|---|---|---|---|---|",
             f"| backup | {b['backup']['seconds']} | {b['backup']['mb_per_s']} | {b['plain']['upload_s']} | "
             f"{b['plain']['upload_mb_per_s']} | {r['backup_over_plain_upload']} |",
             f"| restore, files and raw data | {b['restore']['copy_s']} | {b['restore']['copy_mb_per_s']} | "
             f"{b['plain']['download_s']} | {b['plain']['download_mb_per_s']} | {r['restore_copy_over_plain_download']} |",
             f"| restore, all (and the online store loaded) | {b['restore']['seconds']} | {b['restore']['mb_per_s']} | "
             f"{b['plain']['download_s']} | {b['plain']['download_mb_per_s']} | {r['restore_over_plain_download']} |",
             f"| backup, unchanged volume | {b['backup']['again_seconds']} | | | | |", "",
             "Phases (s): backup " + ", ".join(f"{k} {v}" for k, v in b["backup"]["phases"].items())
             + "; restore " + ", ".join(f"{k} {v}" for k, v in b["restore"]["phases"].items()) + "."]
    return "\n".join(lines) + "\n"


def backup_plot(results: dict, out: Path) -> None:
    """backup.png: backup and restore beside the plain copy, restore split by phase."""
    b = results.get("backup")
    if not b:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    rows = [("backup", b["backup"]), ("plain upload", b["plain"]["upload_s"]),
            ("restore", b["restore"]), ("plain download", b["plain"]["download_s"])]
    colors = iter(plt.get_cmap("tab20").colors)
    for y, (label, section) in enumerate(rows):
        if not isinstance(section, dict):
            ax.barh(y, section, color="dimgrey")
            continue
        left = 0.0
        for phase, seconds in section["phases"].items():
            ax.barh(y, seconds, left=left, color=next(colors), label=f"{label}: {phase}")
            left += seconds
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"Backup and restore, {b['rows']} rows ({b['bytes'] / 1e6:.0f} MB): "
                 f"{b['ratios']['backup_over_plain_upload']}x and "
                 f"{b['ratios']['restore_copy_over_plain_download']}x a plain copy", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out / "backup.png", dpi=100)
    plt.close(fig)
