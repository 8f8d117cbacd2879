"""The README says what the code does: its phases in the code's order, a row for every setting."""
import re
from pathlib import Path

from fabdeploy import phases as ph
from fabdeploy.settings import DEFAULTS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_the_readmes_phases_are_the_codes_in_its_order():
    listed = re.findall(r"(?:^\d+\. |\band \d+\. )\*\*(\w+)\*\*", section("What a deploy does"), re.M)
    declared = [s.name for s in ph.PREPARE + ph.INSTALL + ph.MIGRATE + ph.START + ph.GO_LIVE + ph.FINISH if s.printed]
    assert listed == list(dict.fromkeys(declared))


MAPPINGS = {"env", "secrets", "hooks"}  # one setting each, a mapping of names (or of hook points)


def keys(tree: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in MAPPINGS:  # a section
            found |= keys(value, f"{prefix}{key}.")
        else:
            found.add(prefix + key)
    return found


def test_every_setting_has_a_row_in_the_reference_and_every_row_is_a_setting():
    rows = set(re.findall(r"^\| `([\w.]+)` \|", section("Configuration reference"), re.M))
    assert rows == keys(DEFAULTS) | {"hosts", "stages"}
