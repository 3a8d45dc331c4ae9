"""Evaluation metrics (trainer/evaluation.py) against hand-computed values."""

import pytest

from trainer.evaluation import eval_metrics, majority_correct, pass_at_k, wilson_interval


def test_wilson_interval():
    # 0 of 10: centre = (0 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.13877 = half-width -> [0, 0.2775]
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    lo, hi = wilson_interval(5, 10)  # symmetric around 0.5
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_pass_at_k():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - C(3,1)/C(4,1)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(ValueError, match="samples_per_task"):
        pass_at_k(2, 1, 4)


def test_majority_vote():
    assert not majority_correct(["7", "8", "8", None], [True, False, False, False])  # vote 8, wrong
    assert majority_correct(["7", "7", "8"], [True, True, False])
    assert not majority_correct(["7", "8"], [False, True])  # tie: the first seen (7) is the vote
    assert not majority_correct([None, None], [True, True])  # no answers, no vote


def episode(task, won, answer=None, **meta):
    return {"won": won, "task": {"question": task, **meta}, "actions": [answer or ""]}


def test_eval_score_is_the_mean_env_score_overall_and_per_task_name():
    summaries = [
        {**episode("a", False, task_name="find"), "score": 25.0},
        {**episode("a", True, task_name="find"), "score": 100.0},
        {**episode("b", False, task_name="boil"), "score": 8.0},
    ]
    m = eval_metrics(summaries)
    assert m["eval/score"] == pytest.approx(133 / 3)
    assert m["eval/by/task_name=find/score"] == 62.5 and m["eval/by/task_name=boil/score"] == 8.0


def test_eval_metrics_pass_maj_and_breakdown():
    summaries = [
        episode("q1", True, "4", subject="algebra"), episode("q1", False, "5", subject="algebra"),
        episode("q1", False, "5", subject="algebra"),
        episode("q2", False, "1", subject="geometry"), episode("q2", False, "1", subject="geometry"),
        episode("q2", True, "2", subject="geometry"),
    ]  # fmt: skip
    m = eval_metrics(summaries, answer_of=lambda s: s["actions"][-1])
    assert m["eval/success"] == pytest.approx(2 / 6) and m["eval/episodes"] == 6.0
    assert m["eval/success_lo"] < 2 / 6 < m["eval/success_hi"]
    assert m["eval/pass@1"] == pytest.approx(1 / 3) and m["eval/pass@3"] == 1.0
    assert m["eval/maj@3"] == 0.0  # both majorities (5, 1) are wrong
    assert m["eval/by/subject=algebra/success"] == pytest.approx(1 / 3)
    assert m["eval/by/subject=geometry/success"] == pytest.approx(1 / 3)
    assert "eval/score" not in m  # these summaries report no score
    single = eval_metrics(summaries[:1])
    assert "eval/pass@1" not in single and not any(k.startswith("eval/by/") for k in single)
