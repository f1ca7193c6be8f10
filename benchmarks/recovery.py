"""Recovery training on SmolLM2: what super-network training buys the search.

For the best sub-network at each share of the full model's predicted workload latency:
(a) the search on the untrained, importance-sorted weights; (b) the search rerun on the
weights of a super-network trained with the sandwich rule; (c) the best baseline of that
latency (uniform width or layer dropping) fine-tuned with distillation from the full model
on the same tokens; (d) the full model trained on the same data (the domain-adaptation
control); (e) the point (b) found, fine-tuned the same way as (c) but starting from the
super-network's weights (the method's last step; it sees the training tokens twice). Perplexity on the held-out text and on a second text of another domain. Then the
matched-quality comparison: measured workload latency of the fastest searched point at least
as good as (c), beside (c). Every stage is cached in OUT (rerun to resume).

    python benchmarks/recovery.py --predictor runs/pipeline/predictors/local --device local \
        --db runs/recovery/measurements.db --steps 60 --out runs/recovery
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from predictor.features import ConfigBatch
from predictor.workload import LatencyObjective, Workload
from search.baselines import baseline_configs
from search.study import run_search
from search.verify import verify
from subnets.config import SubnetConfig
from subnets.quality import perplexity, tokenize
from subnets.textdata import read_text_file
from subnets.workspace import Workspace
from training.recovery import finetune, open_supernet, train_supernet
from training.settings import TrainSettings

log = logging.getLogger("recovery")


class Stages:
    """Results by stage name in OUT/results.json, so a rerun skips what is done."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, name: str, fn: Any) -> Any:
        if name not in self.data:
            t0 = time.perf_counter()
            self.data[name] = fn()
            self.data[f"{name}:seconds"] = time.perf_counter() - t0
            self.path.write_text(json.dumps(self.data, indent=1, default=str))
        return self.data[name]


def best_under(points: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    ok = [p for p in points if p["upper_ms"] <= budget and math.isfinite(p["perplexity"]) and p["perplexity"] < 1e11]
    return min(ok, key=lambda p: p["perplexity"]) if ok else None


def search_points(ws: Workspace, objective: LatencyObjective, folder: Path, evals: int, budget: float,
                  seed: int) -> list[dict[str, Any]]:
    warm = [c for cs in baseline_configs(ws, 12, 12).values() for c in cs]
    res = run_search(ws, objective, "nsga2", evals, budget, folder / "study.db", seed=seed, granularity="tapered",
                     warm_start=warm)
    return [p for p in res.points if p["feasible"]]


def ppl_of(model: Any, tokens: Any) -> float:
    return float(perplexity(model.eval(), tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--predictor", type=Path, required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--db", type=Path, default=Path("runs/recovery/measurements.db"))
    ap.add_argument("--workload", default="128,64")
    ap.add_argument("--shares", default="0.6,0.7,0.85")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--kd", default="inplace", help="the super-network's distillation (inplace, teacher, none)")
    ap.add_argument("--latency-range", default=None, help="the super-network's range (default: lowest share - 0.1 to 1)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a finished run's folder: take its untrained, baseline, fine-tuned (c) and full-model (d) "
                         "results, and train only another super-network")
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--quality-tokens", type=int, default=2048)
    ap.add_argument("--second-text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--no-finetune-searched", action="store_true", help="skip (e), the searched points fine-tuned")
    ap.add_argument("--no-measure", action="store_true", help="skip the on-device matched-quality measurements")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/recovery"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    st = Stages(args.out)
    if args.reuse is not None:
        old = json.loads((args.reuse / "results.json").read_text())
        keep = ("search_untrained", "full_untrained", "baselines", "full_trained")
        st.data.update({k: v for k, v in old.items() if k.split(":")[0] in keep or k.startswith(("a_", "c_"))})
    shares = [float(x) for x in args.shares.split(",")]
    ws0 = Workspace.open(args.model, eval_budget=args.quality_tokens)
    objective = LatencyObjective.load(args.predictor, Workload.parse(args.workload), args.device, ws0.base.base_id)
    full_ms = float(objective.predict(ConfigBatch.from_configs([ws0.space.full()], ws0.space.dims.num_layers))[0])
    # a resumed run keeps the budgets its cached stages were chosen under (a retrained predictor moves them)
    full_ms = float(st.data.get("setup", {}).get("full_ms", full_ms))
    budgets = {s: s * full_ms for s in shares}
    top = max(budgets.values())
    heldout = ws0.eval_tokens()
    second = tokenize(read_text_file(args.second_text), ws0.base.tokenizer, budget=args.quality_tokens, window=512)
    st.data["setup"] = {"full_ms": full_ms, "budgets": budgets, "heldout_tokens": heldout.num_tokens,
                        "second_text": args.second_text, "second_tokens": second.num_tokens}

    def both(model: Any) -> dict[str, float]:
        return {"heldout": ppl_of(model, heldout), "second": ppl_of(model, second)}

    lat_range = (tuple(float(x) for x in args.latency_range.split(",")) if args.latency_range
                 else (max(0.05, min(shares) - 0.1), 1.0))
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             warmup_steps=max(1, args.steps // 20), k=args.k, seed=args.seed, kd=args.kd,
                             latency_range=lat_range, checkpoint_every=10)
    tokens = settings.tokens_per_step * settings.steps

    # (a) untrained weights
    untrained = st.get("search_untrained", lambda: search_points(ws0, objective, args.out / "search-untrained",
                                                                   args.evals, top, args.seed))
    st.get("full_untrained", lambda: both(ws0.model(ws0.space.full())))

    def baselines() -> list[dict[str, Any]]:
        rows = []
        for name, configs in baseline_configs(ws0, 12, 12).items():
            lat, up = objective.predict_both(ConfigBatch.from_configs(configs, ws0.space.dims.num_layers))
            for c, v, u in zip(configs, lat, up):
                rows.append({"baseline": name, "summary": c.summary(), "config": c.to_dict(), "latency_ms": float(v),
                             "upper_ms": float(u), "perplexity": ws0.perplexity(c)})
        return rows

    base_rows = st.get("baselines", baselines)

    # (b) super-network training, then the search on its weights
    sn_dir = args.out / "supernet"

    def train_sn() -> dict[str, Any]:
        res = train_supernet(args.model, ["stdlib"], settings, sn_dir, objective=objective)
        return {"steps": res.steps_done, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "tokens": tokens}

    st.get("train_supernet", train_sn)
    ws1 = open_supernet(sn_dir, eval_budget=args.quality_tokens, base_id=ws0.base.base_id)
    trained = st.get("search_supernet", lambda: search_points(ws1, objective, args.out / "search-supernet",
                                                                args.evals, top, args.seed))

    # (d) the full model trained on the same data (labels only)
    full_dir = args.out / "full-trained"

    def train_full() -> dict[str, Any]:
        s = replace(settings, strategy="standard", kd="none", latency_range=(0.5, 1.0), checkpoint_every=args.steps)
        res = train_supernet(args.model, ["stdlib"], s, full_dir, objective=objective)
        wsf = open_supernet(full_dir, eval_budget=args.quality_tokens, base_id=ws0.base.base_id)
        return {**both(wsf.model(wsf.space.full())), "seconds": res.seconds, "tokens_per_s": res.tokens_per_s}

    full_trained = st.get("full_trained", train_full)

    rows = []
    for share, budget in budgets.items():
        a = best_under(untrained, budget)
        b = best_under(trained, budget)
        c_base = best_under(base_rows, budget)
        row: dict[str, Any] = {"share": share, "budget_ms": budget}
        if a:
            row["a"] = {"summary": a["summary"], "latency_ms": a["latency_ms"],
                        **st.get(f"a_{share}", lambda a=a: both(ws0.model(SubnetConfig.from_dict(a["config"]))))}
        if b:
            row["b"] = {"summary": b["summary"], "latency_ms": b["latency_ms"], "config": b["config"],
                        **st.get(f"b_{share}", lambda b=b: both(ws1.model(SubnetConfig.from_dict(b["config"]))))}
        if c_base:
            cfg = SubnetConfig.from_dict(c_base["config"])

            def ft(cfg: SubnetConfig = cfg, share: float = share) -> dict[str, Any]:
                s = replace(settings, strategy="standard", kd="teacher", latency_range=(0.5, 1.0),
                            checkpoint_every=args.steps)
                res, model = finetune(args.model, cfg, ["stdlib"], s, args.out / f"finetune-{share}")
                return {**both(model), "seconds": res.seconds, "tokens_per_s": res.tokens_per_s}

            row["c"] = {"summary": c_base["summary"], "baseline": c_base["baseline"], "latency_ms": c_base["latency_ms"],
                        "config": c_base["config"], "untrained_ppl": c_base["perplexity"], **st.get(f"c_{share}", ft)}
        if b and not args.no_finetune_searched:
            def ft_searched(cfg_dict: dict[str, Any] = b["config"], share: float = share) -> dict[str, Any]:
                cfg = SubnetConfig.from_dict(cfg_dict)
                s = replace(settings, strategy="standard", kd="teacher", latency_range=(0.5, 1.0),
                            checkpoint_every=args.steps)
                res, model = finetune(args.model, cfg, ["stdlib"], s, args.out / f"finetune-searched-{share}",
                                      supernet=sn_dir)
                return {**both(model), "seconds": res.seconds, "tokens_per_s": res.tokens_per_s}

            row["e"] = {"summary": b["summary"], "latency_ms": b["latency_ms"], **st.get(f"e_{share}", ft_searched)}
        row["d"] = full_trained
        rows.append(row)
    st.data["rows"] = rows
    st.path.write_text(json.dumps(st.data, indent=1, default=str))

    # matched quality: the fastest supernet-searched point at least as good as (c), measured beside (c)
    if not args.no_measure:
        def matched() -> list[dict[str, Any]]:
            out = []
            for r in rows:
                if "c" not in r:
                    continue
                target = r["c"]["heldout"]
                cands = [p for p in trained if p["perplexity"] <= target]
                if not cands:
                    out.append({"share": r["share"], "searched": None})
                    continue
                p = min(cands, key=lambda q: q["latency_ms"])
                pts = [p,
                       {"config": r["c"]["config"], "latency_ms": r["c"]["latency_ms"], "perplexity": target,
                        "summary": r["c"]["summary"], "upper_ms": r["c"]["latency_ms"]}]
                measured = verify(ws1, objective, pts, args.device, args.db, r["budget_ms"])
                out.append({"share": r["share"], "searched": p["summary"], "searched_ppl": p["perplexity"],
                            "searched_ms": measured[0].get("measured_ms"), "baseline": r["c"]["summary"],
                            "baseline_ppl": target, "baseline_ms": measured[1].get("measured_ms")})
            return out

        st.get("matched", matched)
    print(json.dumps({k: v for k, v in st.data.items() if k in ("setup", "rows", "matched", "train_supernet")},
                     indent=1, default=str))


if __name__ == "__main__":
    main()
