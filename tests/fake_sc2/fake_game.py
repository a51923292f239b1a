"""A simulated StarCraft II game, so that the REAL smac / smacv2 code runs without the game.

install() replaces pysc2.run_configs.get, which smac (d6aab33) and smacv2 (577ab5a) call when they
launch: they then talk to FakeController instead of a game, through the same calls and the same
s2clientprotocol messages (create_game, join_game, game_info, observe, actions, step, debug, data).
What it simulates: a 32x32 flat pathable map; the SMAC maps in LAYOUTS spawn both teams at the
start and again when no unit is left (the maps' trigger that smac's restart relies on); SMACv2's
32x32_flat spawns nothing (units come from debug create_unit); a toy battle (an attack takes 30
points, shield first; a move teleports); a killed unit leaves the unit list. Counters counts the
launches (for smac, a launch is where it adds the enemies' health to its reward normaliser);
fail_step_at raises pysc2's ConnectionError at that controller step (smac's full_restart);
fail_launch_at makes that launch of this process fail as a game that never opens its port does
(pysc2's ConnectError); with log set, each process appends "launch <pid>" / "close <pid>" there.

Run as a program, it plays a script on the simulated game, configured from the environment
(FAKE_SC2_FAIL_STEP_AT, FAKE_SC2_FAIL_LAUNCH_AT, FAKE_SC2_LOG); the vector env's workers are
forked, so they play it too:
    python tests/fake_sc2/fake_game.py mappo_lorasa_smac.py --map 3s5z --env-backend sc2 ...
"""

import itertools
import os
import runpy
import sys
import types

from pysc2.lib import protocol, remote_controller
from pysc2.run_configs import lib as run_configs_lib
from s2clientprotocol import raw_pb2
from s2clientprotocol import sc2api_pb2 as sc_pb

# standard unit types (pysc2.lib.units) -> (health_max, shield_max); enemies use these ids:
# marine, marauder, medivac, zealot, stalker, colossus, baneling, zergling, hydralisk
STATS = {48: (45, 0), 51: (125, 0), 54: (150, 0), 73: (100, 50), 74: (80, 80), 4: (200, 150)}
STATS.update({9: (30, 0), 105: (35, 0), 107: (90, 0)})
# len(controller.data().units): smacv2's first custom ally type is N_DATA_UNITS - 9
N_DATA_UNITS = 2000
SMACV2_STD = dict(baneling=9, colossus=4, hydralisk=107, marauder=51, marine=48, medivac=54)
SMACV2_STD.update(stalker=74, zealot=73, zergling=105)
# SMAC map -> (allies' standard types, enemies' types); allies get custom types ALLY_BASE + k in
# smac's order (stalker before zealot: smac takes the smallest ally type as the stalker)
LAYOUTS = {
    "3m": ([48] * 3, [48] * 3),
    "2s3z": ([74] * 2 + [73] * 3, [74] * 2 + [73] * 3),
    "3s5z": ([74] * 3 + [73] * 5, [74] * 3 + [73] * 5),
}
ALLY_BASE = 1970


class Counters:
    launches = 0
    closes = 0
    fail_step_at = None
    fail_launch_at = None
    log = None

    @classmethod
    def record(cls, event):
        if cls.log:
            with open(cls.log, "a") as file:
                file.write(f"{event} {os.getpid()}\n")


class FakeController:
    def __init__(self):
        self.map = None
        self.units = {}
        self.tags = itertools.count(0x100000001)
        self.loop = 0
        self.steps = 0
        self.pending = []
        self.custom_stats = {}

    def create_game(self, request):
        # "SMAC_Maps/<map>.SC2Map"
        self.map = request.local_map.map_path.split("/")[-1][: -len(".SC2Map")]
        return sc_pb.ResponseCreateGame()

    def join_game(self, request):
        self._spawn_map_units()
        return sc_pb.ResponseJoinGame(player_id=1)

    def game_info(self):
        info = sc_pb.ResponseGameInfo(map_name=self.map)
        raw = info.start_raw
        raw.map_size.x, raw.map_size.y = 32, 32
        raw.playable_area.p1.x, raw.playable_area.p1.y = 32, 32
        # 1 bit per cell, 1 = pathable
        raw.pathing_grid.bits_per_pixel = 1
        raw.pathing_grid.size.x, raw.pathing_grid.size.y = 32, 32
        raw.pathing_grid.data = b"\xff" * (32 * 32 // 8)
        raw.terrain_height.bits_per_pixel = 8
        raw.terrain_height.size.x, raw.terrain_height.size.y = 32, 32
        raw.terrain_height.data = b"\x80" * (32 * 32)
        return info

    def data(self):
        return types.SimpleNamespace(units={i: f"unit{i}" for i in range(N_DATA_UNITS)})

    def _add(self, owner, unit_type, x, y):
        health, shield = STATS.get(unit_type) or self.custom_stats[unit_type]
        unit = raw_pb2.Unit(tag=next(self.tags), unit_type=unit_type, owner=owner, health=health)
        unit.health_max, unit.shield, unit.shield_max = health, shield, shield
        unit.pos.x, unit.pos.y, unit.pos.z = x, y, 8
        self.units[unit.tag] = unit

    def _spawn_map_units(self):
        if self.map not in LAYOUTS:  # smacv2's 32x32_flat: its 9 custom types come last
            for k, name in enumerate(sorted(SMACV2_STD)):
                self.custom_stats[N_DATA_UNITS - 9 + k] = STATS[SMACV2_STD[name]]
            return
        allies, enemies = LAYOUTS[self.map]
        kinds = sorted(set(allies), key=lambda t: {74: 0, 73: 1}.get(t, 0))
        for k, unit_type in enumerate(kinds):
            self.custom_stats[ALLY_BASE + k] = STATS[unit_type]
        for i, unit_type in enumerate(allies):
            self._add(1, ALLY_BASE + kinds.index(unit_type), 9.0, 10.0 + i)
        for i, unit_type in enumerate(enemies):
            self._add(2, unit_type, 14.0, 10.0 + i)

    def observe(self, disable_fog=False, target_game_loop=0):
        response = sc_pb.ResponseObservation()
        response.observation.game_loop = self.loop
        response.observation.raw_data.units.extend(self.units.values())
        return response

    def actions(self, request):
        self.pending.extend(request.actions)
        return sc_pb.ResponseAction()

    def step(self, count=1):
        self.steps += 1
        if self.steps == Counters.fail_step_at:
            raise protocol.ConnectionError("Connection already closed. SC2 probably crashed.")
        for action in self.pending:
            command = action.action_raw.unit_command
            for tag in command.unit_tags:
                if tag not in self.units:
                    continue
                if command.ability_id == 23 and command.target_unit_tag in self.units:  # attack
                    target = self.units[command.target_unit_tag]
                    absorbed = min(target.shield, 30.0)
                    target.shield -= absorbed
                    target.health = max(0.0, target.health - (30.0 - absorbed))
                elif command.ability_id == 16:  # move
                    position = command.target_world_space_pos
                    self.units[tag].pos.x, self.units[tag].pos.y = position.x, position.y
        self.pending = []
        self.units = {tag: unit for tag, unit in self.units.items() if unit.health > 0}
        self.loop += count
        if not self.units and self.map in LAYOUTS:  # the SMAC maps' trigger: a new round
            self._spawn_map_units()
        return sc_pb.ResponseStep()

    def debug(self, commands):
        for command in commands:
            if command.HasField("kill_unit"):
                for tag in command.kill_unit.tag:
                    self.units.pop(tag, None)
            elif command.HasField("create_unit"):
                unit = command.create_unit
                for _ in range(unit.quantity):
                    self._add(unit.owner, unit.unit_type, unit.pos.x, unit.pos.y)
        return sc_pb.ResponseDebug()

    def save_replay(self):
        # what a replay holds: the game since its launch
        return f"fake replay: game loop {self.loop}".encode()


class FakeProcess:
    def __init__(self):
        Counters.launches += 1
        if Counters.launches == Counters.fail_launch_at:
            Counters.record("failed")
            raise remote_controller.ConnectError(
                "Failed to connect to the SC2 websocket. Is it up?"
            )
        Counters.record("launch")
        self.controller = FakeController()
        self.closed = False

    def close(self):
        if not self.closed:
            Counters.record("close")
        Counters.closes += not self.closed
        self.closed = True


class FakeRunConfig:
    def __init__(self, version=None):
        self.version = run_configs_lib.Version("latest", 75689, None, None)

    def start(self, **kwargs):
        return FakeProcess()

    def map_data(self, map_name, players=None):
        return b"fake map"

    def save_replay(self, replay_data, replay_dir, prefix=None):
        return "/dev/null"


def install():
    """smac and smacv2 launch the fake from now on (in this process and in those it forks)."""
    import pysc2.run_configs

    pysc2.run_configs.get = FakeRunConfig
    return Counters


def number(name):
    return int(os.environ[name]) if os.environ.get(name) else None


if __name__ == "__main__":
    install()
    Counters.fail_step_at = number("FAKE_SC2_FAIL_STEP_AT")
    Counters.fail_launch_at = number("FAKE_SC2_FAIL_LAUNCH_AT")
    Counters.log = os.environ.get("FAKE_SC2_LOG") or None
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
