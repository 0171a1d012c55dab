import subprocess
import sys

import pytest

from clvr.config import Config, load_config
from clvr.errors import ConfigError


def test_profiles_resolve_to_typed_config():
    ci, cpu = load_config("ci"), load_config("cpu")
    assert isinstance(ci, Config) and ci.profile == "ci"
    assert ci.pretrain.steps < cpu.pretrain.steps


def test_override_is_typed():
    assert load_config("ci", ["pretrain.lr=0.5"]).pretrain.lr == 0.5


@pytest.mark.parametrize("override,needle", [
    ("pretrain.stepz=3", "pretrain.stepz"),
    ("pretrain.steps=many", "pretrain.steps"),
    ("nokey", "key=value"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("ci", [override])


def test_bad_yaml_key_names_file_and_key(tmp_path, monkeypatch):
    (tmp_path / "base.yaml").write_text("seed: 1\n")
    (tmp_path / "bad.yaml").write_text("world:\n  gird: 5\n")
    monkeypatch.setenv("CLVR_CONF_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_config("bad")
    assert "bad.yaml" in str(e.value) and "world.gird" in str(e.value)


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config("nope")


def test_cli_config_show_and_bad_input():
    ok = subprocess.run([sys.executable, "-m", "clvr", "config", "show", "-p", "ci", "pretrain.steps=9"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "steps: 9" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "clvr", "config", "show", "pretrain.x=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "pretrain.x" in bad.stderr and "Traceback" not in bad.stderr


def test_an_override_with_nothing_after_the_sign_is_the_empty_string():
    """`sft.data=` (what a shell makes of `sft.data=""`) empties a string key; YAML alone would read null."""
    assert load_config("ci").sft.data != "" and load_config("ci", ["sft.data="]).sft.data == ""
    with pytest.raises(ConfigError, match="sft.steps"):
        load_config("ci", ["sft.steps="])
