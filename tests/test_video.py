"""--capture-video: each evaluation films its first episode (MaMuJoCo: up to 10 s; SMAX: up to 20 s) into
runs/<run>/videos and TensorBoard, the files decode, and recording changes no training number; --eval-only films
beside the checkpoint; without a renderer the run goes on without video. StarCraft II's replays: tests/test_smac.py
(the stand-in) and tests/test_sc2_real.py (the real smac on the simulated game)."""

import os

import imageio
import numpy as np
import pytest
from conftest import MAMUJOCO, SCRIPTS, load_script, only_run, present, run, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# 50-step episodes: shorter than the 10 s (200 frames at HalfCheetah's 20 fps) a video may hold
TINY = ["--num-envs", "2", "--num-steps", "40", "--total-timesteps", "160", "--eval-episodes", "2"]
TINY += ["--max-episode-steps", "50"]


@pytest.mark.parametrize("script", present(MAMUJOCO), ids=lambda s: s[:-3])
def test_capture_video_films_every_evaluation_and_changes_no_number(script, tmp_path):
    filmed, plain = tmp_path / "filmed", tmp_path / "plain"
    filmed.mkdir()
    plain.mkdir()
    res = run(script, TINY + ["--capture-video"], filmed)
    run(script, TINY, plain)
    run_dir = only_run(filmed)
    videos = os.path.join(run_dir, "videos")
    assert sorted(os.listdir(videos)) == ["eval_0.mp4", "eval_160.mp4"]
    assert f"video: runs/{os.path.basename(run_dir)}/videos/eval_160.mp4" in res.stdout
    for name in os.listdir(videos):
        frames = np.stack(imageio.mimread(os.path.join(videos, name), memtest=False))
        # the whole 50-step episode, 240 x 240 RGB, and the cheetah moves
        assert frames.shape == (50, 240, 240, 3), frames.shape
        assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 1
    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("eval/video")] == [0, 160]
    # same seed, same numbers: only the timings differ
    with_video, without = scalars(run_dir), scalars(only_run(plain))
    assert with_video.keys() == without.keys()
    for tag in with_video:
        if not tag.startswith(("perf/", "charts/SPS")):
            assert with_video[tag] == without[tag], tag
    assert not os.path.exists(os.path.join(only_run(plain), "videos"))


def test_eval_only_films_beside_the_checkpoint(tmp_path):
    script = present(MAMUJOCO)[0]
    run(script, TINY + ["--capture-video"], tmp_path)
    checkpoint = os.path.join(only_run(tmp_path), "checkpoint.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags = ["--checkpoint", checkpoint, "--eval-only", "--capture-video", "--eval-episodes", "1"]
    videos = os.path.join(os.path.dirname(checkpoint), "videos")
    before = {name: open(os.path.join(videos, name), "rb").read() for name in os.listdir(videos)}
    res = run(script, flags, elsewhere)
    # a new file beside the run's own videos, which stay as they were
    new = sorted(set(os.listdir(videos)) - set(before))
    assert len(new) == 1 and new[0].startswith("eval-only_160_") and new[0].endswith(".mp4"), new
    assert all(open(os.path.join(videos, name), "rb").read() == before[name] for name in before)
    video = os.path.join(videos, new[0])
    assert f"video: {video}" in res.stdout and os.listdir(elsewhere) == []
    # --eval-only plays the full 1000-step episodes: the video stops at 10 s, 200 frames at 20 fps
    assert len(imageio.mimread(video, memtest=False)) == 200


def test_without_a_renderer_the_run_goes_on_without_video(tmp_path):
    # no display: the script picks EGL, which MuJoCo refuses when PyOpenGL is told to use another platform
    env = dict(DISPLAY=None, MUJOCO_GL=None, PYOPENGL_PLATFORM="osmesa")
    res = run(present(MAMUJOCO)[0], TINY + ["--capture-video"], tmp_path, env)
    warnings = [line for line in res.stderr.splitlines() if "capture-video" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --capture-video: MuJoCo"), (
        res.stderr
    )
    assert "  eval @ step 160:" in res.stdout
    assert not os.path.exists(os.path.join(only_run(tmp_path), "videos"))


SMAX_TINY = ["--map", "3m", "--num-envs", "2", "--num-steps", "40", "--total-timesteps", "160"]
SMAX_TINY += ["--eval-episodes", "1"]


@pytest.mark.parametrize("script", present([s for s in SCRIPTS if s.endswith("smac.py")]))
def test_smax_films_the_battle_and_changes_no_number(script, tmp_path):
    filmed, plain = tmp_path / "filmed", tmp_path / "plain"
    filmed.mkdir()
    plain.mkdir()
    res = run(script, SMAX_TINY + ["--capture-video"], filmed)
    assert res.stderr == ""
    run_dir = only_run(filmed)
    videos = os.path.join(run_dir, "videos")
    assert sorted(os.listdir(videos)) == ["eval_0.mp4", "eval_160.mp4"]
    assert f"video: runs/{os.path.basename(run_dir)}/videos/eval_160.mp4" in res.stdout
    lengths = dict(scalars(run_dir)["eval/episodic_length"])
    for step in (0, 160):
        frames = np.stack(imageio.mimread(os.path.join(videos, f"eval_{step}.mp4"), memtest=False))
        # the one evaluation episode, four frames a step (every second world tick), units moving
        assert frames.shape == (4 * lengths[step], 240, 240, 3), (frames.shape, lengths[step])
        assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.1
        # blue allies and red enemies on a white field
        assert ((frames[0, ..., 2] > 150) & (frames[0, ..., 0] < 100)).any()
        assert ((frames[0, ..., 0] > 150) & (frames[0, ..., 2] < 100)).any()
    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("eval/video")] == [0, 160]
    run(script, SMAX_TINY, plain)
    with_video, without = scalars(run_dir), scalars(only_run(plain))
    assert with_video.keys() == without.keys()
    for tag in with_video:
        if not tag.startswith(("perf/", "charts/SPS")):
            assert with_video[tag] == without[tag], tag
    # --eval-only films beside the checkpoint, in a file of its own
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    flags = ["--checkpoint", checkpoint, "--eval-only", "--capture-video"]
    res = run(script, flags, plain)
    new = sorted(set(os.listdir(videos)) - {"eval_0.mp4", "eval_160.mp4"})
    assert len(new) == 1 and new[0].startswith("eval-only_160_"), new
    assert f"video: {os.path.join(videos, new[0])}" in res.stdout


def test_smax_film_shows_env_0s_steps_as_they_happen():
    """The frames of a step are drawn from the world ticks of exactly the step the env takes
    (the same key and actions): after the last tick, positions, life and health are the stepped
    state's; only env 0 is filmed; filming changes no env state."""
    module = load_script(present([s for s in SCRIPTS if s.endswith("smac.py")])[0])
    args = module.finalize_args(module.Args(map="3s5z", env_backend="smax", capture_video=True))
    envs = module.SMAXEnvs("3s5z", 3, args)
    obs, _ = envs.reset(seed=[5, 6, 7])
    jax = envs.jax
    rng = np.random.default_rng(0)
    for _ in range(12):
        actions = np.array([[rng.choice(np.flatnonzero(a)) for a in env] for env in obs["avail"]])
        keys, states = np.array(envs.keys), jax.tree.map(np.array, envs.states)
        state = jax.tree.map(lambda x: x[0], envs.states)
        positions, alive, health, radius = envs.ticks(envs.keys[0], state, actions[0])
        frames = envs.film(actions)
        assert (np.array(envs.keys) == keys).all()
        assert all(
            (a == b).all() for a, b in zip(jax.tree.leaves(envs.states), jax.tree.leaves(states))
        )
        obs, *_ = envs.step(actions)
        world = jax.tree.map(lambda x: np.array(x[0]), envs.states).state
        # 8 ticks, every second one drawn; the last tick is the state after the step
        assert len(frames) == 4 and np.array(positions).shape[0] == 8
        np.testing.assert_allclose(np.array(positions[-1]) * 32, world.unit_positions, atol=1e-4)
        assert (np.array(alive[-1]) == world.unit_alive).all()
        full = np.array([45.0, 125, 160, 150, 35, 80])[world.unit_types]
        np.testing.assert_allclose(np.array(health[-1]) * full, world.unit_health, atol=1e-3)
        # every living unit of env 0 is drawn where it stands (row 0: the top of the map)
        for x, y in np.array(positions[-1])[world.unit_alive] * 240:
            assert (frames[-1][239 - int(y), int(x)] < 250).any()
