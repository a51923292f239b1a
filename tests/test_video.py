"""--capture-video on MaMuJoCo: each evaluation films its first episode (up to 10 s) into runs/<run>/videos and
TensorBoard, the files decode, and recording changes no training number; --eval-only films beside the checkpoint."""

import os

import imageio
import numpy as np
import pytest
from conftest import MAMUJOCO, only_run, present, run, scalars
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
    run(script, TINY, tmp_path)
    checkpoint = os.path.join(only_run(tmp_path), "checkpoint.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    flags = ["--checkpoint", checkpoint, "--eval-only", "--capture-video", "--eval-episodes", "1"]
    res = run(script, flags, elsewhere)
    video = os.path.join(os.path.dirname(checkpoint), "videos", "eval_160.mp4")
    assert f"video: {video}" in res.stdout and os.listdir(elsewhere) == []
    # --eval-only plays the full 1000-step episodes: the video stops at 10 s, 200 frames at 20 fps
    assert len(imageio.mimread(video, memtest=False)) == 200
