"""Diff discipline, checked on the source: a top-level definition present in several scripts has the same source in
all of them (AST segments, so no marker comments are needed); the two scripts of a suite differ only in the
algorithm's parts; the section banners come in the fixed order; no script imports another; ruff is clean."""

import ast
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS, present

# May differ between the MAPPO and the A2PO script: the update rule and the arguments, defaults and checks it adds.
ALGORITHM_PARTS = {"Args", "TASK_DEFAULTS", "finalize_args", "update"}
# May differ between suites (identical within one): the environment, the action distribution, the masks, and what
# is logged and saved of them.
SUITE_PARTS = {
    *("TASK_DEFAULTS", "TASK_KEYS", "POSITIVE", "task_defaults", "finalize_args"),
    *("make_env", "make_worker_env", "make_envs", "agent_parameters", "RolloutBuffer"),
    *("collect_rollout", "critic_values", "compute_returns", "evaluate", "log_evaluation"),
    *("load_checkpoint", "adapters_only", "log_start", "log_iteration"),
    # A2PO's parts that read the action distribution or the masks
    *("trace_deltas", "policy_ratios", "trace_agent", "critic_step", "turn"),
}
# A2PO arguments whose default is the reference's per suite (SMAC: the ppo loop, the retrace trace, one-stage critic),
# and the reference's suite-wide settings, literal defaults in each suite's Args.
SUITE_FIELDS = {
    f"Args.{name}"
    for name in (
        "a2po_loop",
        "capture_video",
        "trace_variant",
        "two_stage",
        "total_timesteps",
        "num_envs",
        "num_steps",
    )
    + (
        "learning_rate",
        "critic_learning_rate",
        "update_epochs",
        "gae_lambda",
        "ent_coef",
        "eval_episodes",
    )
}
BANNERS = ["DOCSTRING", "IMPORTS", "ARGS", "ENVIRONMENT", "LAYERS", "ACTOR, CRITIC, VALUENORM",
           "ROLLOUT BUFFER, CHUNKS, GAE", "UPDATE", "EVALUATION", "CHECKPOINTS", "MAIN"]  # fmt: skip


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def definitions(source):
    """{name: source segment} of the top-level functions, classes and assignments, plus "__main__" for the main block;
    Args' fields as "Args.<field>"."""
    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                out[ast.unparse(target)] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            out["__main__"] = ast.get_source_segment(source, node)
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for field in node.body:
                if isinstance(field, ast.AnnAssign):
                    line = source.splitlines()[field.lineno - 1]  # with its help comment
                    out[f"Args.{ast.unparse(field.target)}"] = line
    return out


def suite(name):
    return name.rsplit("_", 1)[1]


def mismatches(texts):
    """The names whose source differs where the rules above say it must not, for a dict file -> source."""
    parsed = {name: definitions(text) for name, text in texts.items()}
    bad = set()
    for a in parsed:
        for b in parsed:
            if a >= b:
                continue
            same_suite = suite(a) == suite(b)
            for name in set(parsed[a]) & set(parsed[b]):
                allowed = name in ALGORITHM_PARTS or (
                    name in SUITE_PARTS | SUITE_FIELDS | {"__main__"} and not same_suite
                )
                if parsed[a][name] != parsed[b][name] and not allowed:
                    bad.add(name)
    return sorted(bad)


def test_shared_definitions_identical_across_scripts():
    texts = {name: read(name) for name in present(SCRIPTS)}
    assert mismatches(texts) == []


def test_checker_detects_a_changed_definition():
    """The check above can fail: one changed character in a copy is reported, in a function and in a field's help."""
    text = read("mappo_lorasa_mamujoco.py")
    assert mismatches(
        {
            "a_x_mamujoco.py": text,
            "b_x_mamujoco.py": text.replace("return advantages + values", "return 1 + values"),
        }
    )
    changed_help = text.replace("# discount factor", "# discount")
    assert mismatches({"a_x_mamujoco.py": text, "b_x_mamujoco.py": changed_help}) == ["Args.gamma"]
    assert mismatches(
        {"a_x_mamujoco.py": text, "b_x_mamujoco.py": text.replace("buf.roll()", "buf.roll( )")}
    ) == ["__main__"]


@pytest.mark.parametrize("suite_name", ["mamujoco", "smac"])
def test_a2po_script_differs_from_mappo_only_in_the_algorithm(suite_name):
    """`diff mappo_lorasa_X.py a2po_lorasa_X.py` shows only A2PO: every MAPPO definition exists in the A2PO script and
    only the algorithm's parts differ; what A2PO adds are new names (its trace functions) and new Args fields."""
    names = [f"mappo_lorasa_{suite_name}.py", f"a2po_lorasa_{suite_name}.py"]
    if present(names) != names:
        pytest.skip(f"the {suite_name} pair is not there yet")
    mappo, a2po = (definitions(read(name)) for name in names)
    assert set(mappo) <= set(a2po)
    differing = {name for name in mappo if mappo[name] != a2po[name]}
    assert differing <= ALGORITHM_PARTS, differing - ALGORITHM_PARTS
    assert {name for name in set(a2po) - set(mappo) if name.startswith("Args.")} == {
        f"Args.{field}" for field in ("a2po_loop", "a2po_order", "a2po_clip_schedule", "a2po_others", "others_clip_coef",
                                      "clip_tuner_weight", "trace_variant", "trace_clip", "trace_lambda_squared",
                                      "two_stage", "approx_trace")}  # fmt: skip


@pytest.mark.parametrize("script", present(SCRIPTS))
def test_section_order_and_self_contained(script):
    text = read(script)
    found = re.findall(r"^# ==== (\d+)\. (.+?) ====$", text, flags=re.M)
    assert [int(n) for n, _ in found] == list(range(1, len(BANNERS) + 1))
    assert all(banner.startswith(expected) for (_, banner), expected in zip(found, BANNERS)), found
    others = [s[:-3] for s in SCRIPTS if s != script]
    assert not any(
        re.search(rf"^\s*(import|from)\s+{other}\b", text, flags=re.M) for other in others
    )


def late_references(source):
    """(definition, name) pairs where a top-level function or class uses a top-level name defined further down."""
    tree = ast.parse(source)
    top_level = {
        node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    top_level |= {
        ast.unparse(target)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
    }
    seen, late = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            used = {
                n.id
                for n in ast.walk(node)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            }
            late += [(node.name, name) for name in sorted(used & top_level - seen - {node.name})]
            seen.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            seen |= {
                ast.unparse(t)
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            }
    return late


@pytest.mark.parametrize("script", present(SCRIPTS))
def test_no_name_is_used_before_the_line_that_defines_it(script):
    """Read top-down: a top-level function or class uses only top-level names defined above it (main block excepted)."""
    assert late_references(read(script)) == []
    assert late_references("def f():\n    return g()\n\n\ndef g():\n    return 1\n") == [("f", "g")]


def test_the_repository_stands_on_its_own():
    """Nothing the project ships cites files a user who clones it does not have (the development team's notes)."""
    tracked = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    texts = [
        name for name in tracked if name.endswith((".py", ".md", ".txt", ".toml", "run"))
    ] or present(SCRIPTS)
    for name in texts:
        assert not re.search(
            r"\.\./shared|shared/spe[c]|(lorasa|envs|a2po|style)\.md", read(name)
        ), name


def test_ruff_format_and_check_clean():
    files = [os.path.join(ROOT, name) for name in ("tests", "benchmarks", *present(SCRIPTS))]
    for command in (["format", "--check"], ["check"]):
        res = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *files],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stdout + res.stderr
