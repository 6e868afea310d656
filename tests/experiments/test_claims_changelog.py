"""The changelog's old claims are quoted from the README's history and gone from today's README."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import claims_changelog as cc  # noqa: E402


def test_the_changelog_section_is_left_out_when_looking_for_old_claims():
    text = "intro old claim\n\n## Changelog\n\n<!-- section:changelog -->\nWas: \"old claim\".\n\n## Next\nend\n"
    assert cc.without_changelog(text) == "intro old claim\n\n## Changelog\n\n\n## Next\nend\n"
    assert cc.without_changelog("no section") == "no section"


def test_committed_entries_are_gone_from_the_readme_and_carry_their_numbers():
    res = json.loads((ROOT / "experiments" / "results" / "claims_changelog.json").read_text())
    assert set(res) == set(cc.ENTRIES)
    now = cc.squash(cc.without_changelog((ROOT / "README.md").read_text()))
    for name, entry in res.items():
        assert entry["quote"] == cc.squash(cc.ENTRIES[name][1]) and entry["quote"] not in now, name
        assert entry["numbers"] == [float(x) for x in cc.NUMBER.findall(entry["quote"])]
