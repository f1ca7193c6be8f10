"""What an export leaves on disk: its manifest (``export.json``) naming the graphs or files,
their sha256s and where each weight tensor lies, read back by the profiler and the board."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "export.json"


@dataclass
class TensorRecord:
    """Where one weight tensor lies in the shared weights file."""

    name: str
    shape: list[int]
    offset: int
    length: int
    kind: str  # "linear", "norm", "embed", "bias", "q4", "q8", "scale": how a board fills it when weights are absent
    dtype: str = "float32"  # numpy dtype of the stored values


@dataclass
class ExportedSubnet:
    key: str
    folder: Path
    graphs: dict[str, str]  # phase -> file name
    graph_sha256: dict[str, str]
    weights_file: str
    weights_bytes: int
    weights_sha256: str | None  # None when the weights were not written
    options: dict[str, object]
    tensors: list[TensorRecord] = field(default_factory=list)

    def path(self, phase: str) -> Path:
        return self.folder / self.graphs[phase]

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ExportedSubnet:
        d = {k: v for k, v in d.items() if k != "config"}
        d["folder"] = Path(str(d["folder"]))
        d["tensors"] = [TensorRecord(**t) for t in d.get("tensors", [])]  # type: ignore[union-attr]
        return cls(**d)  # type: ignore[arg-type]
