"""Progress shown on long work (trainer/progress.py), the rollout's progress hook and the run's
ETA in the console line (trainer/logging.py). Expected strings are computed by hand.

Run: .venv/bin/python -m pytest tests/trainer/test_progress.py -q
"""

from io import StringIO

import pytest

from agents.config import RolloutConfig, SamplingConfig
from agents.engines.scripted import ScriptedEngine
from agents.rollout import Rollout, Task
from trainer.logging import RunLogger
from trainer.progress import Progress, format_duration, format_progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class TTY(StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (20.4, "20s"), (59.6, "1m00s"), (185, "3m05s"), (7620, "2h07m")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_progress_rate_and_eta():
    # 37 in 17.6 s: 2.10 ep/s; 43 left at 17.6 / 37 s each: 20.45 s
    assert format_progress(37, 80, 17.6, "episodes") == "37/80 episodes, 2.1 ep/s, ETA 20s"
    # 8500 tokens in 10 s: 850 tok/s; the ETA from episodes: 52 left at 10 / 12 s each: 43.3 s
    assert format_progress(12, 64, 10.0, "episodes", tokens=8500) == "12/64 episodes, 850 tok/s, ETA 43s"
    # 1 in 100 s: 0.01 ep/s, 99 left: 9900 s
    assert format_progress(1, 100, 100.0) == "1/100 episodes, 0.01 ep/s, ETA 2h45m"


def test_format_progress_at_zero_elapsed_and_edges():
    assert format_progress(0, 80, 0.0) == "0/80 episodes"  # no rate, no ETA yet
    assert format_progress(5, 80, 0.0) == "5/80 episodes"
    assert format_progress(0, 80, 3.0) == "0/80 episodes, 0 ep/s"  # nothing done: no ETA
    assert format_progress(80, 80, 40.0) == "80/80 episodes, 2.0 ep/s"  # done: no ETA
    assert format_progress(0, 0, 1.0) == "0/0 episodes, 0 ep/s"


def test_format_progress_without_a_total():
    assert format_progress(120, None, 60.0, "steps") == "120 steps, 2.0 step/s"
    assert format_progress(3, None, 0.0) == "3 episodes"


def test_a_log_file_gets_exactly_one_final_line():
    clock, stream = Clock(), StringIO()
    progress = Progress("eval", total=80, stream=stream, clock=clock)
    for done in range(1, 81):
        clock.now += 0.5
        progress(done, 80, 0)
    assert stream.getvalue() == ""
    progress.close()
    progress.close()  # closing twice writes nothing more
    assert stream.getvalue() == "eval: 80/80 episodes, 2.0 ep/s (took 40s)\n"


def test_a_terminal_gets_carriage_return_updates_at_most_every_half_second():
    clock, stream = Clock(), TTY()
    with Progress("rollout", total=4, show_tokens=True, stream=stream, clock=clock) as progress:
        for dt, done, tokens in [(0.2, 0, 100), (0.4, 1, 300), (0.2, 1, 400), (0.4, 2, 800), (0.1, 3, 900)]:
            clock.now += dt
            progress(done, tokens=tokens)
    # drawn at 0.6 s (1 done, 300 tok) and 1.2 s (2 done, 800 tok); 0.2 / 0.8 / 1.3 s skipped
    assert stream.getvalue() == (
        "\rrollout: 1/4 episodes, 500 tok/s, ETA 2s"
        "\rrollout: 2/4 episodes, 667 tok/s, ETA 1s"
        "\rrollout: 3/4 episodes, 692 tok/s, ETA 0s (took 1s)\n"
    )


def test_a_shorter_redraw_blanks_the_longer_line_before_it():
    clock, stream = Clock(), TTY()
    progress = Progress("eval", total=100, stream=stream, clock=clock)
    clock.now += 1
    progress(1)
    clock.now += 99
    progress(100)
    first, second = stream.getvalue().split("\r")[1:]
    assert first == "eval: 1/100 episodes, 1.0 ep/s, ETA 1m39s"
    assert second.rstrip() == "eval: 100/100 episodes, 1.0 ep/s" and len(second) == len(first)


def test_other_ranks_write_nothing():
    clock, stream = Clock(), TTY()
    progress = Progress("eval", total=2, enabled=False, stream=stream, clock=clock)
    clock.now += 1
    progress(2)
    progress.close()
    assert stream.getvalue() == ""


# -- the rollout's hook ---------------------------------------------------------------------------


def test_the_rollout_reports_each_round(smol_tokenizer):
    from tests.environments import pool_envs  # noqa: F401 - registers pool-counter

    reply = smol_tokenizer("1</action>")["input_ids"]  # the first command, every turn
    engine = ScriptedEngine(lambda prompt, call: reply, eos_id=smol_tokenizer.eos_token_id)
    rollout = Rollout(engine, smol_tokenizer, RolloutConfig(max_turns=12, env_workers=0))
    calls = []
    rollout.progress = lambda done, total, tokens: calls.append((done, total, tokens))
    tasks = [Task("pool-counter", 0, reset_options={"seed": s}) for s in range(3)]
    try:
        result = rollout.run(tasks, SamplingConfig(temperature=0.0))
        rounds, reports = len(engine.calls), len(calls)
        rollout.progress = None
        rollout.run(tasks[:1], SamplingConfig(temperature=0.0))  # no hook: not called
    finally:
        rollout.close()
    assert reports == len(calls) == rounds + 1  # a report per round (one engine call each), then the last
    replies = [len(s.response_ids) for s in result.samples]  # step mode: one sample per turn
    assert calls[-1] == (3, 3, sum(replies)) and calls[-2] == calls[-1]
    assert [total for _, total, _ in calls] == [3] * len(calls)
    dones, tokens = [d for d, _, _ in calls], [t for _, _, t in calls]
    assert dones == sorted(dones) and tokens == sorted(tokens)
    assert any(0 < d < 3 for d in dones)  # the episodes end in different rounds (seeded walks)
    # each round generated one reply per episode still live after the round before
    live = [3] + [3 - d for d in dones[:-2]]
    assert [b - a for a, b in zip([0] + tokens[:-2], tokens[:-1], strict=True)] == [
        len(reply) * n for n in live
    ]


# -- the run's ETA on the console line ------------------------------------------------------------


def test_the_step_line_shows_the_runs_eta(tmp_path, capsys):
    logger = RunLogger(tmp_path)
    clock = Clock()
    logger.clock = clock
    logger.log(3, {"time/step": 2.0}, total_steps=10)  # first step seen: its own time, 7 x 2 s
    clock.now += 5.0
    logger.log(4, {"time/step": 2.0}, total_steps=10)  # 5 s since step 3: 6 x 5 s
    clock.now += 3.0
    logger.log(5, {}, total_steps=10)  # (5 + 3) / 2 = 4 s a step: 5 x 4 s
    logger.log(5, {"eval/success": 0.5})  # an eval line: no ETA
    clock.now += 100.0
    logger.log(10, {}, total_steps=10)  # the last step: nothing left
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 3/10") and lines[0].endswith("ETA 14s")
    assert lines[1].endswith("ETA 30s") and lines[2].endswith("ETA 20s")
    assert "ETA" not in lines[3] and "ETA" not in lines[4]


def test_no_eta_before_anything_says_how_long_a_step_takes(tmp_path, capsys):
    logger = RunLogger(tmp_path)
    logger.log(1, {"reward/mean": 0.5}, total_steps=10)
    assert "ETA" not in capsys.readouterr().err


def test_evaluate_shows_the_eval_progress_on_rank_0(monkeypatch, capsys):
    from types import SimpleNamespace

    from agents.rollout import RolloutResult
    from tests.trainer.test_loop import fake_trainer

    class Played:
        progress = None

        def run(self, tasks, sampling, seed=None):
            self.seen = self.progress
            for done in range(1, len(tasks) + 1):
                self.progress(done, len(tasks), 0)
            episodes = [{"won": True, "stop_reason": "terminated", "error": None, "turns": 1, "parse_errors": 0,
                         "task": {"seed": i}} for i in range(len(tasks))]  # fmt: skip
            return RolloutResult([], {}, episodes=episodes)

    trainer = fake_trainer(monkeypatch, mixed=set())
    trainer.rollout, trainer.learner, trainer.current_step = Played(), None, 0
    trainer.logger = SimpleNamespace(log=lambda *a: None, info=lambda *a: None)
    trainer.cfg.env.eval.seeds = (0, 3)
    trainer.evaluate(step=0)
    assert trainer.rollout.seen is not None and trainer.rollout.progress is None  # set for the run only
    (line,) = capsys.readouterr().err.splitlines()  # stderr is no terminal here: one final line
    assert line.startswith("eval: 3/3 episodes")
    trainer.rank = 1
    trainer.evaluate(step=0)
    assert capsys.readouterr().err == ""


def test_keep_false_wipes_the_terminal_line_and_writes_no_summary():
    clock, tty, log = Clock(), TTY(), StringIO()
    for stream in (tty, log):
        progress = Progress("rollout", total=2, show_tokens=True, keep=False, stream=stream, clock=clock)
        clock.now += 1
        progress(1, tokens=50)
        progress.close()
    assert tty.getvalue() == "\rrollout: 1/2 episodes, 50 tok/s, ETA 1s" + "\r" + " " * 39 + "\r"
    assert log.getvalue() == ""


def test_on_attaches_for_the_block_and_closes_also_when_it_raises():
    class Target:
        progress = None

    target, stream = Target(), StringIO()
    with pytest.raises(RuntimeError):
        with Progress("eval", total=2, stream=stream, clock=Clock()).on(target) as progress:
            assert target.progress is progress
            progress(1)
            raise RuntimeError("boom")
    assert target.progress is None and stream.getvalue() == "eval: 1/2 episodes (took 0s)\n"
