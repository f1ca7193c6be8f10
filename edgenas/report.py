"""``report.html``: one self-contained page about a run (no server, images embedded): the
device and its telemetry, the predictors' accuracy beside the baselines, the front with the
baselines, the verified points, and the settings and versions that produced them."""

from __future__ import annotations

import base64
import html
import json
import sqlite3
from pathlib import Path
from typing import Any

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}.bad{color:#b00}"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">({_esc(path.name)} not found)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.2e}"
    return str(v)


def _device_section(run: Path) -> str:
    db = run / "measurements.db"
    if not db.is_file():
        return "<h2>Device</h2><p class='note'>no measurement store in this run</p>"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        devices = con.execute("SELECT name, fingerprint, info FROM devices ORDER BY id").fetchall()
        counts = con.execute("SELECT phase, COUNT(*), SUM(unstable), SUM(throttled) FROM measurements "
                             "WHERE is_reference=0 GROUP BY phase").fetchall()
    finally:
        con.close()
    out = ["<h2>Device</h2>"]
    for name, fp, info in devices:
        hello = (json.loads(info) or {}).get("hello") or {}
        board, ort = hello.get("board") or {}, hello.get("onnxruntime") or {}
        cpus = ((hello.get("telemetry") or {}).get("cpu") or {})
        govs = sorted({c.get("governor") for c in cpus.values() if c.get("governor")})
        rows = [["name", name], ["fingerprint", fp], ["board", board.get("kind")], ["CPU", board.get("cpu_model")],
                ["cores", board.get("cpu_count")], ["memory (MB)", board.get("memory_mb")],
                ["onnxruntime", f"{ort.get('version')} ({', '.join(ort.get('providers') or [])})"],
                ["CPU governor", ", ".join(govs) or "-"], ["Python", hello.get("python")]]
        out.append(_table(["property", "value"], rows))
    out.append(_table(["phase", "measurements", "unstable", "throttled"], [list(r) for r in counts]))
    return "".join(out)


def _predictor_section(run: Path) -> str:
    from predictor.model import model_form

    out = ["<h2>Latency predictors</h2>"]
    for meta_path in sorted((run / "predictors").glob("*/*/meta.json")):
        meta = json.loads(meta_path.read_text())
        m = meta.get("metrics") or {}
        bound = (meta.get("fit_info") or {}).get("bound") or {}
        out.append(f"<h3>{_esc(meta['device_name'])}, {_esc(m.get('backend') or '')}, {_esc(meta['phase'])}"
                   + (" (transferred)" if (meta_path.parent / "prior").is_dir() else "") + "</h3>")
        out.append(f"<p>{_esc(m.get('n'))} measurements at {_esc(m.get('threads'))} thread(s), back-end "
                   f"<code>{_esc(m.get('backend'))}</code>, protocol <code>{_esc(m.get('protocol'))}</code>; "
                   f"bound: {bound.get('method', '-')} at nominal {_fmt(bound.get('nominal', 0) * 100, 0)}%, "
                   f"guaranteed {_fmt(bound.get('guaranteed', 0) * 100, 0)}% over {_esc(bound.get('sub_networks'))} "
                   f"sub-networks; {_esc(model_form(meta.get('fit_info') or {}))}.</p>")
        cv = m.get("cv") or {}
        rows = [[name, _fmt(100 * r.get("within_5pct", 0)) + "%", _fmt(100 * r.get("within_10pct", 0)) + "%",
                 _fmt(100 * r.get("mape", 0), 2) + "%", _fmt(r.get("kendall_tau"), 3),
                 "-" if r.get("upper_coverage") is None else _fmt(100 * r["upper_coverage"]) + "%"]
                for name, r in cv.items()]
        out.append(_table(["model (held-out sub-networks)", "±5%", "±10%", "MAPE", "Kendall τ", "bound covers"], rows))
        out.append(_img(meta_path.parent / "predicted_vs_measured.png", f"{meta['phase']} predicted vs measured"))
    if len(out) == 1:
        out.append("<p class='note'>no predictors in this run</p>")
    return "".join(out)


def _search_section(run: Path) -> str:
    path = run / "search" / "search.json"
    if not path.is_file():
        return "<h2>Search</h2><p class='note'>no search in this run</p>"
    res = json.loads(path.read_text())
    full = res.get("full_perplexity")
    cap = res.get("max_perplexity") or (10 * full if full else None)
    out = ["<h2>Pareto front</h2>", _img(run / "search" / "front.png", "Pareto front")]
    front = [p for p in res.get("front", []) if cap is None or p["perplexity"] <= cap]
    out.append(f"<p>{len(res.get('front', []))} front points, {len(front)} within the quality ceiling"
               + (f" (perplexity {cap:.0f})" if cap else "") + (f"; full model perplexity {full:.1f}" if full else "")
               + f"; study <code>{_esc(res.get('study'))}</code>.</p>")
    if not front:
        out.append("<p class='bad'>No sub-network met both the latency budget and the quality ceiling: raise "
                   "the budget or the ceiling (--max-perplexity), or recover quality by training (--train-steps).</p>")
    out.append(_table(["sub-network", "perplexity", "predicted ms", "upper ms", "params (M)"],
                      [[p["summary"], _fmt(p["perplexity"]), _fmt(p["latency_ms"]), _fmt(p["upper_ms"]),
                        _fmt(p["params"] / 1e6)] for p in sorted(front, key=lambda p: p["latency_ms"])]))
    if res.get("matched"):
        out.append("<h3>Baselines under the budget</h3>")
        out.append(_table(["baseline", "its sub-network", "perplexity", "ms", "searched ms", "searched ppl", "latency cut"],
                          [[r["baseline"], r["summary"], _fmt(r["baseline_ppl"]), _fmt(r["baseline_ms"]),
                            _fmt(r.get("searched_ms")), _fmt(r.get("searched_ppl")),
                            "-" if r.get("reduction") is None else f"{100 * r['reduction']:.0f}%"]
                           for r in res["matched"]]))
    if res.get("verified"):
        out.append("<h2>Verified on the device</h2>")
        out.append(_table(["sub-network", "perplexity", "predicted ms", "measured ms", "error", "meets budget"],
                          [[r["summary"], _fmt(r["perplexity"]), _fmt(r["latency_ms"]), _fmt(r.get("measured_ms")),
                            "-" if r.get("error_pct") is None else f"{100 * r['error_pct']:+.1f}%",
                            "-" if r.get("measured_ms") is None else ("yes" if r["meets_budget"] else "NO")]
                           for r in res["verified"]]))
    return "".join(out)


def _recommendation_section(run: Path) -> str:
    path = run / "recommendation.json"
    if not path.is_file():
        return ""
    rec = json.loads(path.read_text())
    out = ["<h2>What to ship</h2>"]
    chosen = rec.get("chosen")
    cap = rec.get("max_perplexity")
    limits = f"latency budget {_fmt(rec['budget_ms'])} ms" + (f", perplexity within {_fmt(cap)}" if cap else "")
    if chosen:
        out.append(f"<p><b>{_esc(chosen['summary'])} at {_esc(chosen['precision'])} on {_esc(chosen['runtime'])}</b>: "
                   f"perplexity {_fmt(chosen['perplexity'])}, measured {_fmt(chosen.get('measured_ms'))} ms ({limits}); "
                   "files in <code>ship/</code>.</p>")
    else:
        out.append(f"<p class='bad'>Nothing meets both limits ({_esc(limits)}); relax: {_esc(rec.get('relax'))}.</p>")
    if (run / "recommendation.png").is_file():
        out.append(_img(run / "recommendation.png", "what to ship: every deployment of the table"))
    rows = [(role, c) for role, cs in (("ship", [chosen] if chosen else []), ("instead of", rec.get("alternatives", [])),
                                       ("set aside", rec.get("rejected", [])), ("nearest", rec.get("nearest", [])))
            for c in cs]
    out.append(_table(["", "deployment", "architecture", "MB", "perplexity", "predicted ms", "bound ms", "measured ms",
                       "ppl gain", "latency cut"],
                      [[role, f"{c['family']} @ {c['precision']}", c["summary"], _fmt(c["size_mb"], 0),
                        _fmt(c["perplexity"]), _fmt(c["predicted_ms"]), _fmt(c["upper_ms"]), _fmt(c.get("measured_ms")),
                        "-" if c.get("ppl_gain") is None else f"{100 * c['ppl_gain']:+.0f}%",
                        "-" if c.get("latency_cut") is None else f"{100 * c['latency_cut']:+.0f}%"]
                       for role, c in rows]))
    return "".join(out)


def _settings_section(run: Path) -> str:
    import platform

    out = ["<h2>Settings and versions</h2>"]
    db = run / "measurements.db"
    if db.is_file():
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            protocols = con.execute("SELECT digest, record FROM protocols").fetchall()
        except sqlite3.OperationalError:
            protocols = []
        finally:
            con.close()
        out.append(_table(["protocol", "record"], [[d, r] for d, r in protocols]))
    meta = next(iter(sorted((run / "predictors").glob("*/*/meta.json"))), None)
    versions = json.loads(meta.read_text()).get("versions", {}) if meta else {}
    versions = {**versions, "platform": platform.platform()}
    out.append(_table(["component", "version"], [[k, v] for k, v in versions.items()]))
    return "".join(out)


def write_report(run: Path, out: Path | None = None) -> Path:
    """Write ``run``/report.html (or ``out``) from what the run left on disk."""
    run = Path(run)
    out = out or run / "report.html"
    body = "".join([f"<h1>edgenas run: {_esc(run.resolve().name)}</h1>",
                    f"<p class='note'>{_esc(run.resolve())}</p>", _recommendation_section(run), _device_section(run),
                    _predictor_section(run),
                    _search_section(run), _settings_section(run)])
    out.write_text(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edgenas report</title>"
                   f"<style>{CSS}</style></head><body>{body}</body></html>")
    return out
