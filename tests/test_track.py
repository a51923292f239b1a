"""--track: Weights & Biases follows a run (offline here: WANDB_MODE=offline writes the run's log beside it), with
the TensorBoard metrics and the effective arguments; without wandb installed, --track is one error line."""

import collections
import glob
import json
import os

import pytest
from conftest import ROOT, load_script, make_args, only_run, present, run, scalars

# one script per suite and per algorithm: track_run is the same function in all four (test_consistency)
TRACKED = {
    "mappo_lorasa_mamujoco.py": [
        "--num-envs",
        "2",
        "--num-steps",
        "40",
        "--max-episode-steps",
        "50",
    ],
    "a2po_lorasa_smac.py": ["--map", "3m", "--num-envs", "2", "--num-steps", "40"],
}
OFFLINE = dict(WANDB_MODE="offline", WANDB_SILENT="true")


def wandb_log(runs):
    """{tag: [values]} of the history and the config of the offline W&B log in `runs` (--run-dir)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = glob.glob(os.path.join(runs, "wandb", "offline-run-*", "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    history, config = collections.defaultdict(list), {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)].append(json.loads(item.value_json))
        elif kind == "run":
            config.update(
                {item.key: json.loads(item.value_json) for item in record.run.config.update}
            )
    return history, config


@pytest.mark.parametrize("script", present(TRACKED), ids=lambda s: s[:-3])
def test_track_offline_holds_the_metrics_and_the_effective_arguments(script, tmp_path):
    flags = TRACKED[script] + ["--total-timesteps", "160", "--eval-episodes", "1", "--track"]
    run(script, flags + ["--wandb-project-name", "lorasa-test"], tmp_path, env=OFFLINE)
    run_dir = only_run(tmp_path)
    history, config = wandb_log(tmp_path / "runs")
    # W&B's files stay beside the run folder: it copies the events it syncs into them
    assert not os.path.exists(os.path.join(run_dir, "wandb"))
    tensorboard = scalars(run_dir)
    # the effective arguments, derived ones included
    assert config["track"] is True and config["seed"] == 1 and config["batch_size"] == 80
    assert config["lora_start"] == 40 and config["exp_name"] == script[:-3]
    for tag in (
        "losses/value_loss",
        "charts/phase",
        "eval/episodic_return",
        "lorasa/delta_norm/agent_0",
    ):
        logged = [value for _, value in tensorboard[tag]]
        assert history[tag] == pytest.approx(logged, rel=1e-6), tag
    assert history["global_step"][-1] == 160


def test_track_without_wandb_is_one_error_line(monkeypatch, capsys):
    S = load_script(next(iter(present(TRACKED))))
    find_spec = S.importlib.util.find_spec
    monkeypatch.setattr(
        S.importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name)
    )
    with pytest.raises(SystemExit) as exit_:
        make_args(S, track=True)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --track needs wandb") and "pip install wandb==" in err
    make_args(S, track=False)  # no wandb needed without --track
    # the version the line names is the one requirements.txt pins (and the tests use)
    pins = open(os.path.join(ROOT, "requirements.txt")).read().split()
    assert next(pin for pin in pins if pin.startswith("wandb==")) in err
