"""ZeRO-2 and ZeRO-3 over 2 CPU ranks (gloo) give the update of 1 rank on the same global batch.

One launch of tests/trainer/learner_worker.py on 2 ranks runs two updates in a row: first each
rank holds 2 of the 4 samples, then rank 0 holds 1 sample (1 micro-batch) and rank 1 holds 3
(3 micro-batches), which only finishes if the learner pads rank 0 with dummy passes. The same
two updates on 1 rank, in this process, are the reference. "The same update" is the same whole
gradient at each optimizer step (gathered from the ZeRO partitions), not the same parameters
after AdamW: its first step is lr * sign(g), which flips on near-zero entries with the order in
which ranks sum; a small lr keeps such a flip in update 1 from moving update 2's gradient.

Run: DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/trainer/test_distributed.py -q
(about 30 s on 2 cores; deselect with -m "not distributed").
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.learner_worker import assert_same_named_gradients, distributed_batch, record_full_gradients

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("learner_worker.py")
# micro_batch_tokens=1: every sample is a micro-batch of its own
OVERRIDES = ["learner.lr=1e-6", "learner.threads=1", "learner.micro_batch_tokens=1"]
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(learner_model_dir):
    return learner_model_dir


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def stage(request) -> list[str]:
    return [f"learner.zero_stage={request.param}"]


@pytest.fixture(scope="module")
def two_ranks(model_dir, stage, tmp_path_factory):
    """Launch both ranks (like the `deepspeed` launcher would: RANK/WORLD_SIZE/... env), wait
    with a timeout; returns (out_dir, return codes, logs)."""
    out = tmp_path_factory.mktemp("two-ranks")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        log = open(out / f"log_{rank}.txt", "w")
        cmd = [sys.executable, str(WORKER), model_dir, str(out), "even,uneven", *OVERRIDES, *stage]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=TIMEOUT_S))
        except subprocess.TimeoutExpired:
            codes.append("timeout")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} ---\n" + (out / f"log_{r}.txt").read_text()[-3000:] for r in range(2))
    return out, codes, logs


@pytest.fixture(scope="module")
def one_rank(model_dir, stage):
    """The same two updates on 1 rank over the whole batch: parameters after each."""
    from trainer.config import load
    from trainer.learner.deepspeed import DeepSpeedLearner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    learner = DeepSpeedLearner(load(None, OVERRIDES + stage), model_dir)
    grads = record_full_gradients(learner)
    for _ in range(2):
        learner.update(*distributed_batch())
    torch.set_num_threads(threads)
    assert len(grads) == 2
    return grads


def assert_params_close(got: dict, want: dict):
    """The same gradient at the optimizer step (what "the same update" means, see above)."""
    assert_same_named_gradients(got, want)


def test_two_ranks_match_one_rank(two_ranks, one_rank):
    out, codes, logs = two_ranks
    assert (out / "params_0.pt").exists(), f"return codes {codes}\n{logs}"
    assert_params_close(torch.load(out / "grads_0.pt"), one_rank[0])


def test_uneven_micro_batch_counts_do_not_hang(two_ranks, one_rank):
    out, codes, logs = two_ranks
    assert codes == [0, 0], f"return codes {codes} (timeout = a rank waited in a collective)\n{logs}"
    assert (out / "done_0").exists() and (out / "done_1").exists()
    # and the dummy passes add nothing: still the 1-rank update of the whole batch
    assert_params_close(torch.load(out / "grads_1.pt"), one_rank[1])
