"""The report of a benchmark run: results.json, results.md (the targets table
first, then one table per benchmark) and the plots serving.png and scaling.png.
results.md is written from results.json's content only, so the two always agree."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import scaling
from benchmarks.serving import CLIENTS, PREDICT


def write(results: dict, out: Path) -> str:
    """Targets into ``results``, then results.json, results.md and the plots in ``out``."""
    results["targets"] = [dict(zip(("target", "wanted", "measured", "met"), t)) for t in targets(results)]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    plots(results, out)
    return text


def _servers(serving: dict) -> dict:
    return {name: r for name, r in serving.items() if name not in ("ratios", "method")}


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results.get("serving"):
        serving = _servers(results["serving"])
        names = list(serving)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
        a1.barh(names, [serving[n]["p50_ms"] for n in names], label="p50")
        a1.barh(names, [serving[n]["p99_ms"] - serving[n]["p50_ms"] for n in names],
                left=[serving[n]["p50_ms"] for n in names], alpha=0.5, label="p99")
        a1.set(xlabel="ms (one client)", title="Latency, one entity")
        a1.set_xscale("log")
        a1.set_xlim(left=0.02)  # bars start at 0, which a log axis cannot show
        a1.legend()
        http_names = [n for n in names if serving[n].get("req_per_s")]
        a2.barh(http_names, [serving[n]["req_per_s"] for n in http_names])
        a2.set(xlabel=f"requests/s, {CLIENTS} clients", title="Throughput over HTTP")
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
    if results.get("serving"):
        method = results["serving"].get("method", {})
        lines += [f"Serving: {method.get('client', '')}, median of {method.get('rounds', '')} interleaved "
                  f"rounds of {method.get('seconds_per_run', '')} s per server; Redis at {method.get('redis', '')}.",
                  "", f"| serving | p50 ms | p99 ms | req/s ({CLIENTS} clients) |", "|---|---|---|---|"]
        for name, r in _servers(results["serving"]).items():
            lines.append(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {r.get('req_per_s') or ''} |")
        lines.append("")
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
    if "ratios" in serving:
        r = serving["ratios"]
        rows += [("/predict req/s over mlflow models serve", ">= 8", f"{r['predict_req_per_s_over_mlflow']:.1f}x",
                  r["predict_req_per_s_over_mlflow"] >= 8),
                 ("/predict p50 over the floor app's p50", "<= 1.5", f"{r['predict_p50_over_floor_p50']:.2f}x",
                  r["predict_p50_over_floor_p50"] <= 1.5),
                 ("/predict p99, one client", "< 1.5 ms", f"{serving[PREDICT]['p99_ms']:.2f} ms",
                  serving[PREDICT]["p99_ms"] < 1.5)]
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
