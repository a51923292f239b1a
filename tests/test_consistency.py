"""Diff discipline (style.md section 2): every `# >>> shared:<name>` block is byte-identical in all scripts that
contain it, markers are balanced, the section banners come in the fixed order, and no script imports another.
Blocks whose text depends on the suite carry its name (`shared:evaluate-mamujoco`): shared by that suite's two scripts."""
import os
import re

import pytest

from conftest import ROOT, present_scripts

BANNERS = ["DOCSTRING", "IMPORTS", "ARGS", "ENVIRONMENT", "LAYERS", "ACTOR, CRITIC, VALUENORM",
           "ROLLOUT BUFFER, CHUNKS, GAE", "UPDATE", "EVALUATION", "CHECKPOINTS", "MAIN"]


def shared_blocks(text):
    """{name: text} of the shared blocks; raises ValueError on unbalanced, nested or repeated markers."""
    blocks, open_name, lines = {}, None, []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# >>> shared:"):
            if open_name is not None:
                raise ValueError(f"block {open_name} not closed before {stripped}")
            open_name, lines = stripped[len("# >>> shared:"):], []
        elif stripped.startswith("# <<< shared:"):
            name = stripped[len("# <<< shared:"):]
            if name != open_name:
                raise ValueError(f"closing {name}, open {open_name}")
            if name in blocks:
                raise ValueError(f"block {name} appears twice")
            blocks[name], open_name = "\n".join(lines), None
        elif open_name is not None:
            lines.append(line)
    if open_name is not None:
        raise ValueError(f"block {open_name} never closed")
    return blocks


def mismatches(texts):
    """Names of the blocks whose text differs between the files (a dict file -> source) containing them."""
    parsed = {f: shared_blocks(t) for f, t in texts.items()}
    names = {n for b in parsed.values() for n in b}
    return sorted(n for n in names if len({b[n] for b in parsed.values() if n in b}) > 1)


def read(name):
    return open(os.path.join(ROOT, name)).read()


def test_shared_blocks_identical_across_scripts():
    texts = {s: read(s) for s in present_scripts()}
    assert mismatches(texts) == []
    for s, t in texts.items():
        assert len(shared_blocks(t)) >= 12, s


def test_checker_detects_a_changed_block():
    """The check above can fail: one changed character in a shared block of a copy is reported."""
    text = read("mappo_lorasa_mamujoco.py")
    changed = text.replace("return adv + values[:-1]", "return adv + values[:-1] * 1")
    assert mismatches({"a": text, "b": changed}) == ["gae"]
    with pytest.raises(ValueError):
        shared_blocks(text.replace("# <<< shared:gae", ""))


@pytest.mark.parametrize("script", present_scripts())
def test_section_order_and_self_contained(script):
    text = read(script)
    found = re.findall(r"^# ==== (\d+)\. (.+?) ====$", text, flags=re.M)
    assert [int(n) for n, _ in found] == list(range(1, len(BANNERS) + 1))
    assert all(b.startswith(expect) for (_, b), expect in zip(found, BANNERS)), found
    others = [s[:-3] for s in present_scripts() if s != script]
    assert not any(re.search(rf"^\s*(import|from)\s+{o}\b", text, flags=re.M) for o in others)
