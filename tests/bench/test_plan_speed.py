"""How long `python -m orchestrator plan` takes as the grid grows, against a one-point plan in the same run.

  10^4 points: plan seconds / one-point plan seconds   goal <= 2x
  10^5 points: plan seconds                            goal <= 30 s

Each figure is the command as a user runs it: interpreter start, imports, reading and checking the spec,
expanding and validating every grid point, the table and the cost estimate. The grid is demo.yaml's
sections with lr x batch size x epochs axes (synthetic data, nothing drawn). The one-point and 10^4 plans
run five times each, interleaved so a busy machine slows both alike; the best of each is kept.
"""
import time


def plan_seconds(orchestrate, folder, spec) -> float:
    started = time.perf_counter()
    done = orchestrate(folder, "plan", str(spec), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - started


def test_plan_time_as_the_grid_grows(tmp_path, grid_spec, orchestrate):
    one, ten_k = grid_spec(tmp_path, 1, 1, 1), grid_spec(tmp_path, 100, 10, 10)
    seconds = {one: [], ten_k: []}
    for _ in range(5):
        for spec in seconds:
            seconds[spec].append(plan_seconds(orchestrate, tmp_path, spec))
    base, mid = min(seconds[one]), min(seconds[ten_k])
    big_spec = grid_spec(tmp_path, 100, 100, 10)
    big_spec.write_text(big_spec.read_text() + "execution: {max_trials: 100000}\n")     # the default is 10,000
    big = plan_seconds(orchestrate, tmp_path, big_spec)
    print(f"\nplan 1 point: {base:.2f} s (interpreter start and imports, mostly)")
    print(f"plan 10^4 points: {mid:.1f} s, {mid / base:.1f}x a one-point plan (goal <= 2x)")
    print(f"plan 10^5 points: {big:.1f} s (goal <= 30 s)")
    assert mid / base <= 2 and big <= 30
