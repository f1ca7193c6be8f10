"""The host side lets no one in: hostile names stay literal, the agent stays in its folder,
nothing read back is unpickled or evaluated, credentials stay out of the store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import sweep

ROOT = Path(__file__).parent.parent


def test_hostile_paths_never_reach_the_shell_unquoted(tiny_ws, sshd, tmp_path) -> None:
    canary = tmp_path / "pwned"
    hostile = tmp_path / f"board root; touch {canary}; $(touch {canary}) `touch {canary}` 'q\""
    inv = tmp_path / "inv.toml"
    inv.write_text("[hosts.board]\nhostname = \"board\"\n"
                   f"python = {json.dumps(sys.executable)}\nremote_dir = {json.dumps(str(hostile))}\n")
    s = sweep(tiny_ws, "board", tmp_path / "m.db", tiny_ws.space.sample(1, 0), inv, sshd.ssh_config, phases=("decode",))
    assert s.measured == 1
    assert not canary.exists()
    assert hostile.is_dir() and (hostile / "models").is_dir()  # the folder was made with its literal name


def test_agent_refuses_paths_outside_its_folder(tmp_path) -> None:
    agent = ROOT / "device_agents" / "agent.py"
    reqs = [
        {"id": 1, "verb": "verify", "args": {"key": "../../etc", "files": {}}},
        {"id": 2, "verb": "verify", "args": {"key": "ok", "files": {"../../x": "0" * 64}}},
        {"id": 3, "verb": "materialize", "args": {"key": "/abs/path"}},
        {"id": 4, "verb": "measure", "args": {"key": "a/b", "phase": "prefill"}},
        {"id": 5, "verb": "eval", "args": {}},
    ]
    (tmp_path / "root" / "models" / "ok.partial").mkdir(parents=True)
    out = subprocess.run([sys.executable, str(agent), "--root", str(tmp_path / "root")], capture_output=True, text=True,
                         input="".join(json.dumps(r) + "\n" for r in reqs), timeout=120).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["ok"] for a in answers] == [False] * 5
    assert "invalid model key" in answers[0]["error"]["message"]
    assert "invalid file name" in answers[1]["error"]["message"]
    assert answers[4]["error"]["class"] == "protocol_error"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["models"]


def test_no_pickle_eval_or_exec_anywhere() -> None:
    """Nothing read from a board, a store or a predictor file is unpickled or evaluated."""
    pattern = re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|allow_pickle=True|\btorch\.load\(|joblib")
    offenders = []
    for pkg in ("subnets", "profiler", "predictor", "training", "search", "device_agents", "edgenas"):
        for f in (ROOT / pkg).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line) and "noqa: S" not in line:
                    offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_credentials_stay_out_of_the_store_and_logs(tiny_ws, sshd, tmp_path, caplog) -> None:
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r")
    db = tmp_path / "m.db"
    with caplog.at_level("DEBUG"):
        sweep(tiny_ws, "board", db, tiny_ws.space.sample(1, 0), inv, sshd.ssh_config, phases=("decode",))
    key_body = "".join(sshd.user_key.read_text().splitlines()[1:-1])
    blob = db.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("m.db*"))
    for secret in (key_body[:40], key_body[-40:]):  # the private key's material (its path is no secret)
        assert secret.encode() not in blob
        assert secret not in caplog.text
