"""The sweep's ETA: what the live table promises must account for the trials still running."""
from orchestrator.sweep.display import Running, eta_seconds, remaining_seconds


def test_a_long_trial_in_its_first_epoch_holds_the_eta_back():
    # Two small trials took 10 s each; a ResNet-50 trial costing 30x as much has run 20 s, no epoch yet.
    done = [(10.0, 1.0), (10.0, 1.0)]
    resnet = Running(elapsed=20.0, epoch=0, epochs=3, cost=30.0)
    assert remaining_seconds(resnet, 10.0) == 280.0          # 30 x 10 s per unit cost, 20 s of it gone
    # Counting it as half a mean trial (the old rule) said ~5 s; its own cost says it has minutes left.
    assert eta_seconds(done, [resnet], left=0, slots=2) == 280.0


def test_a_trial_past_its_first_epoch_is_timed_by_its_own_pace():
    trial = Running(elapsed=60.0, epoch=2, epochs=5, cost=1.0)
    assert remaining_seconds(trial, None) == 90.0             # 30 s an epoch, 3 to go
    # The queued trials take the mean time of those done, shared over the slots with the running one.
    assert eta_seconds([(40.0, 1.0)], [trial], left=3, slots=2) == (90.0 + 3 * 40.0) / 2


def test_no_estimate_before_anything_can_be_timed():
    assert eta_seconds([], [Running(5.0, 0, 3, 1.0)], left=4, slots=2) is None
    assert eta_seconds([], [], left=0, slots=2) == 0.0


def test_a_trial_resumed_from_its_checkpoint_is_timed_by_this_attempts_epochs():
    # Resumed at epoch 7 of 10 (a checkpoint), it finished epoch 8 in 60 s: two epochs of 60 s are left.
    trial = Running(elapsed=60.0, epoch=8, epochs=10, cost=1.0, resumed_at=7)
    assert remaining_seconds(trial, None) == 120.0
