"""``budget.average_from``: the student finishes as the mean of its weights over the averaged steps."""

import pytest
import torch

from dfq.pipeline import Cancelled, Pipeline
from dfq.spec import JobSpec


def _spec(tiny_spec, average_from):
    budget = tiny_spec.budget.model_copy(update={"average_from": average_from})
    return tiny_spec.model_copy(update={"budget": budget})


def _pipe(spec, teacher):
    return Pipeline(spec, teacher, 10, (1, 28, 28), "cpu")


def test_the_final_student_is_the_mean_of_the_averaged_steps(tiny_teacher, tiny_spec):
    # tiny_spec: 3 epochs x 3 steps, warm-up 1; averaging from epoch 2 takes the last 3 student steps
    pipe = _pipe(_spec(tiny_spec, 2), tiny_teacher)
    snapshots, step = [], pipe.train_step

    def recording_step():
        metrics = step()
        if pipe.step // 3 >= 2:  # pipe.step counts completed steps; this one is step pipe.step + 1
            snapshots.append([p.detach().clone() for p in pipe.student.parameters()])
        return metrics

    pipe.train_step = recording_step
    history = pipe.run()
    assert len(snapshots) == 3 and history["averaged_steps"] == 3
    for live, *seen in zip(pipe.student.parameters(), *snapshots, strict=True):
        torch.testing.assert_close(live.detach(), torch.stack(seen).mean(0), rtol=1e-6, atol=1e-7)
    # the last step alone is not the answer: the weights moved over the three steps
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[-1], strict=True))


def test_without_it_the_last_step_stands(tiny_teacher, tiny_spec):
    pipe = _pipe(tiny_spec, tiny_teacher)
    assert pipe.averaged is None and "averaged_steps" not in pipe.run()


def test_resume_keeps_the_running_mean(tiny_teacher, tiny_spec, tmp_path):
    spec = _spec(tiny_spec, 1)
    straight = _pipe(spec, tiny_teacher)
    straight.run()
    ckpt = tmp_path / "state.pt"
    first = _pipe(spec, tiny_teacher)
    with pytest.raises(Cancelled):  # step 6: three of the six averaged steps are in the mean
        first.run(should_cancel=lambda: first.step == 6, checkpoint_path=ckpt)
    resumed = _pipe(spec, tiny_teacher)
    resumed.load(ckpt)
    assert int(resumed.averaged.n_averaged) == 3
    resumed.run(checkpoint_path=ckpt)
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("average_from", [0, 3])
def test_the_spec_refuses_an_epoch_without_student_steps(average_from):
    budget = {"epochs": 3, "warmup_epochs": 1, "average_from": average_from}
    with pytest.raises(ValueError, match="average_from"):
        JobSpec.model_validate({"budget": budget})
    with pytest.raises(ValueError, match="average_from"):  # calibration only: no student step at all
        JobSpec.model_validate({"budget": {"preset": "calibrate", "average_from": 0}})
    assert JobSpec.model_validate({"budget": {**budget, "average_from": 1}}).budget.average_from == 1
