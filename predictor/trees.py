"""A small evaluator for the booster's trees, for the few-row calls of a search loop.

XGBoost's predict costs milliseconds per call whatever the row count (DMatrix set-up,
threading); a search asks for one or a few sub-networks at a time. The trees are flattened
once into arrays and walked for all trees at once with numpy (about 0.1 ms a row); large
batches still go to XGBoost."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


class FlatTrees:
    def __init__(self, booster: Any) -> None:
        feats, thr, left, right, leaf, is_leaf, roots = [], [], [], [], [], [], []
        depth = 0
        names = booster.feature_names
        for dump in booster.get_dump(dump_format="json"):
            tree = json.loads(dump)
            base = len(feats)
            roots.append(base)
            stack = [(tree, 0)]
            nodes: dict[int, tuple[dict[str, Any], int]] = {}
            while stack:
                node, d = stack.pop()
                nodes[node["nodeid"]] = (node, d)
                depth = max(depth, d)
                for child in node.get("children", []):
                    stack.append((child, d + 1))
            n = max(nodes) + 1
            feats += [0] * n
            thr += [0.0] * n
            left += [0] * n
            right += [0] * n
            leaf += [0.0] * n
            is_leaf += [True] * n
            for nid, (node, _) in nodes.items():
                i = base + nid
                if "leaf" in node:
                    leaf[i] = float(node["leaf"])
                    continue
                split = node["split"]
                feats[i] = names.index(split) if names and split in names else int(str(split).lstrip("f"))
                thr[i] = float(node["split_condition"])
                left[i] = base + int(node["yes"])
                right[i] = base + int(node["no"])
                is_leaf[i] = False
        self.feat = np.asarray(feats, dtype=np.int64)
        self.thr = np.asarray(thr, dtype=np.float32)
        self.left = np.asarray(left, dtype=np.int64)
        self.right = np.asarray(right, dtype=np.int64)
        self.leaf = np.asarray(leaf, dtype=np.float64)
        self.is_leaf = np.asarray(is_leaf, dtype=bool)
        self.roots = np.asarray(roots, dtype=np.int64)
        self.depth = depth

    def margin(self, X: np.ndarray) -> np.ndarray:
        """Sum of leaf values per row (add the base margin yourself)."""
        X = np.asarray(X, dtype=np.float32)  # XGBoost compares in float32
        idx = np.broadcast_to(self.roots, (X.shape[0], len(self.roots))).copy()
        rows = np.arange(X.shape[0])[:, None]
        for _ in range(self.depth):
            go_left = X[rows, self.feat[idx]] < self.thr[idx]
            nxt = np.where(go_left, self.left[idx], self.right[idx])
            idx = np.where(self.is_leaf[idx], idx, nxt)
        return self.leaf[idx].sum(axis=1)
