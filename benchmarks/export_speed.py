"""Export time per sub-network: torch's TorchScript ONNX exporter (the usual route) against
edgenas's direct graph builder, on the same sampled SmolLM2 sub-networks, side by side.

    python benchmarks/export_speed.py --n 8 --torch-n 3

Prints per-method medians and the speed-up ratio. The torch route exports the prefill graph
only (the decode graph costs about as much again), so its figure is a lower bound."""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from export.onnx_graphs import ExportOptions, export_subnet
from subnets.extract import build_model
from subnets.workspace import Workspace


class _Prefill(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        # An explicit all-ones mask: without it the TorchScript exporter fails on aten::diff.
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
        kv = []
        for layer in out.past_key_values.layers:
            kv += [layer.keys, layer.values]
        return (out.logits, *kv)


def torch_export(model: torch.nn.Module, path: Path) -> None:
    x = torch.ones(1, 16, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Prefill(model), (x,), str(path), input_names=["input_ids"], dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}}, opset_version=17)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8, help="sub-networks for the edgenas exporter")
    ap.add_argument("--torch-n", type=int, default=3, help="of those, how many also through torch (slow)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    ws = Workspace.open("smollm2")
    configs = [ws.space.full(), *ws.space.sample(args.n - 1, args.seed, layer_ranking=ws.importance.layer_ranking())]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, c in enumerate(configs):
            t0 = time.perf_counter()
            w = ws.weights(c)
            t1 = time.perf_counter()
            export_subnet(w, root / "real", ExportOptions(weights="real"))
            t2 = time.perf_counter()
            export_subnet(w, root / "none", ExportOptions(weights="none"))
            t3 = time.perf_counter()
            tt = None
            if i < args.torch_n:
                model = build_model(w)
                t4 = time.perf_counter()
                try:
                    torch_export(model, root / f"torch{i}.onnx")
                    tt = time.perf_counter() - t4
                except Exception as e:  # report, keep measuring the rest
                    print(f"torch exporter failed on {c.summary()}: {type(e).__name__}: {e}")
            rows.append((c.summary(), t1 - t0, t2 - t1, t3 - t2, tt))
            print(f"{c.summary():42s} slice {t1 - t0:6.3f}s  edgenas(weights) {t2 - t1:6.3f}s  "
                  f"edgenas(graph only) {t3 - t2:6.3f}s  torch prefill-only {'-' if tt is None else f'{tt:.2f}s'}")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    real = [r[1] + r[2] for r in rows]
    none = [r[1] + r[3] for r in rows]
    tor = [r[4] for r in rows if r[4] is not None]
    print(f"\nmedian per sub-network (slice + export, both graphs): with weights {med(real):.3f}s, "
          f"graph only {med(none):.3f}s")
    if tor:
        same = [r[1] + r[2] for r in rows if r[4] is not None]
        print(f"torch TorchScript exporter, prefill graph only: median {med(tor):.2f}s over {len(tor)}; "
              f"edgenas on the same sub-networks {med(same):.3f}s: {med(tor) / med(same):.0f}x faster")


if __name__ == "__main__":
    main()
