"""scripts/launch_deepspeed.sh for real: the DeepSpeed launcher starts 2 CPU ranks (gloo) that
run the whole loop (rollout shards, one ZeRO-2 learner) on the tiny model and real games.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_launch.py -q   (~1-2 min)
"""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from trainer.learner.common import shm_buffer_path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_launch_script_trains_on_two_cpu_ranks(number_model_dir, game_cache, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "ENTRORL_CACHE": str(game_cache),
        "NUM_GPUS": "2",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [
            str(ROOT / "scripts/launch_deepspeed.sh"),
            "configs/debug/cpu_tiny.yaml",
            f"model.name={number_model_dir}",
            f"train.output_dir={tmp_path}",
            "learner.zero_stage=2",
            "train.steps=1",
            "train.eval_before=false",
            "train.save_model=false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ranks 2 | tasks/step 2 (1 per rank)" in out.stdout + out.stderr  # the startup sizes line
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "rollout/episodes" in r]
    assert [r["step"] for r in train] == [1]
    assert train[0]["rollout/episodes"] == 2.0  # one task x group 2 on each rank (mean over ranks)
    evals = [r for r in records if "eval/episodes" in r]
    assert evals and evals[-1]["eval/episodes"] == 2.0  # 2 eval games split over the ranks, summed
    # DeepSpeed's CPU all-reduce made a 66 MB /dev/shm file per rank; the ranks unlinked them
    left = [shm_buffer_path(rank, "127.0.0.1", str(port)) for rank in range(2)]
    assert not [path for path in left if path.exists()], "DeepSpeed's shm buffers were left in /dev/shm"
