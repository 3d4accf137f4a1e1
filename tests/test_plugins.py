"""Plugin loading: built-ins, third-party entry points, and broken or conflicting plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlx import plugins

from .conftest import run_tlx

BROKEN_IMPORT = """
raise ImportError("needs the package frobnicate")
"""

RAISING_HOOK = """
import tlx

@tlx.hookimpl
def register_heads(register):
    raise RuntimeError("registration exploded")
"""

DUPLICATE_HEAD = """
import tlx
from torch import nn

@tlx.hookimpl
def register_heads(register):
    register("linear", lambda d, c, o: nn.Linear(d, c), description="a second linear head")
"""

SHADOWING_BACKBONE = """
import tlx

@tlx.hookimpl
def register_backbones(register):
    register("resnet18", lambda name, *, pretrained, weights: None, description="not timm's resnet18")
    register("resnet18.tv_in1k", lambda name, *, pretrained, weights: None, description="nor its tag")
    register("resnet18.mine", lambda name, *, pretrained, weights: None, description="a tag of its own")
"""

HEAD_TRAIN_DEFAULTS = """
import tlx
from torch import nn

@tlx.hookimpl
def register_heads(register):
    register("eager", lambda d, c, o: nn.Linear(d, c), train={"lr": 0.5, "epochs": 3})
    register("odd", lambda d, c, o: nn.Linear(d, c), train={"learning_rate": 0.5})
"""


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch, fake_plugin):
    """Install a fake plugin and make it visible to this process."""

    def install(name: str, code: str) -> None:
        env = fake_plugin(name, code)
        monkeypatch.syspath_prepend(env["PYTHONPATH"].split(":")[0])

    return install


def info(name: str) -> plugins.PluginInfo:
    return next(p for p in plugins.load().plugins if p.name == name)


def test_builtins_are_plugins_registered_through_the_hooks() -> None:
    loaded = plugins.load()
    assert loaded.backbones.get("resnet18.tv_in1k", "backbone.name").plugin == "tlx.timm"
    assert {"linear", "mlp"} <= set(loaded.heads.entries)
    assert loaded.heads.get("mlp", "head.type").plugin == "tlx.heads"
    assert loaded.datasets.get("imagefolder", "dataset.kind").plugin == "tlx.datasets"
    assert loaded.engines.get("local", "extract.engine.kind").plugin == "tlx.local"
    assert all(p.error is None for p in loaded.plugins if p.builtin)


def test_unknown_names_suggest_close_matches() -> None:
    loaded = plugins.load()
    with pytest.raises(Exception, match=r"backbone.name: unknown backbone 'resnet81'.*resnet18"):
        loaded.backbones.get("resnet81", "backbone.name")
    with pytest.raises(Exception, match=r"head.type: unknown head 'linaer'; did you mean linear"):
        loaded.heads.get("linaer", "head.type")


def test_import_error_is_reported_by_name_and_not_fatal(on_path, capsys) -> None:
    on_path("tlx-broken", BROKEN_IMPORT)
    broken = info("tlx-broken")
    assert broken.version == "1.2.3"
    assert broken.error == "ImportError: needs the package frobnicate"
    assert "plugin 'tlx-broken': ImportError" in capsys.readouterr().err
    assert plugins.load().heads.get("linear", "head.type").plugin == "tlx.heads"


def test_raising_registration_hook_is_reported(on_path) -> None:
    on_path("tlx-raising", RAISING_HOOK)
    assert info("tlx-raising").error == "register_heads failed: RuntimeError: registration exploded"
    assert {"linear", "mlp"} <= set(plugins.load().heads.entries)


def test_two_plugins_with_one_name_is_an_error_naming_both(on_path) -> None:
    on_path("tlx-dupe", DUPLICATE_HEAD)
    assert "head 'linear' is already registered by plugin 'tlx.heads'" in info("tlx-dupe").error
    with pytest.raises(Exception, match=r"registered by two plugins, 'tlx.heads' and 'tlx-dupe'"):
        plugins.load().heads.get("linear", "head.type")


def test_a_backbone_name_timm_has_is_an_error_of_its_plugin_and_timm_s_model_stays(
    on_path, capsys: pytest.CaptureFixture[str]
) -> None:
    on_path("tlx-shadow", SHADOWING_BACKBONE)
    error = info("tlx-shadow").error
    assert "backbone 'resnet18' is also a model of plugin 'tlx.timm' and is not registered" in error
    assert "backbone 'resnet18.tv_in1k' is also a model" in error  # a pretrained tag of timm's, too
    assert "plugin 'tlx-shadow'" in capsys.readouterr().err  # reported by name, as other broken plugins
    backbones = plugins.load().backbones
    assert backbones.get("resnet18", "backbone.name").plugin == "tlx.timm"
    assert backbones.get("resnet18.tv_in1k", "backbone.name").plugin == "tlx.timm"
    assert backbones.get("resnet18.mine", "backbone.name").plugin == "tlx-shadow"  # its own tag is fine
    assert plugins.load().heads.get("linear", "head.type").plugin == "tlx.heads"  # the rest works


def test_a_head_declares_train_defaults_and_a_bad_one_fails_its_registration(on_path) -> None:
    on_path("tlx-eager", HEAD_TRAIN_DEFAULTS)
    assert plugins.load().heads.get("eager", "head.type").train == {"lr": 0.5, "epochs": 3}
    assert "train={'learning_rate': ...} is not a train key" in info("tlx-eager").error


def test_autoload_can_be_disabled(on_path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path("tlx-broken2", BROKEN_IMPORT)
    monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    names = [p.name for p in plugins.load().plugins]
    assert "tlx-broken2" not in names and "tlx.timm" in names


def test_list_json_shape(fake_plugin) -> None:
    env = fake_plugin("tlx-broken3", BROKEN_IMPORT)
    result = run_tlx("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert set(listing) == {"backbones", "heads", "datasets", "trackers", "engines", "plugins"}
    for key in ("backbones", "heads", "datasets", "engines", "plugins"):
        assert all("name" in item for item in listing[key])
    for key in ("backbones", "heads", "datasets", "trackers", "engines"):
        assert all("plugin" in item for item in listing[key])
    timm_entry = next(b for b in listing["backbones"] if b["name"] == "timm")
    assert timm_entry["plugin"] == "tlx.timm" and timm_entry["count"] > 500
    broken = next(p for p in listing["plugins"] if p["name"] == "tlx-broken3")
    assert broken["error"].startswith("ImportError") and broken["version"] == "1.2.3"
    assert "Traceback" not in result.stderr


def test_list_human_output_shows_broken_plugin(fake_plugin) -> None:
    result = run_tlx("list", env=fake_plugin("tlx-broken4", BROKEN_IMPORT))
    assert result.returncode == 0
    assert "tlx-broken4" in result.stdout and "ERROR ImportError" in result.stdout
    assert "timm (" in result.stdout and "linear" in result.stdout


def test_run_still_works_beside_a_broken_plugin(
    fake_plugin, tiny_dataset: Path, resnet18_file: Path, tmp_path
) -> None:
    env = fake_plugin("tlx-broken5", BROKEN_IMPORT)
    result = run_tlx(
        "run", "hymenoptera",
        "--set", f"dataset.root={tiny_dataset}", "--set", f"backbone.weights={resnet18_file}",
        "--set", "train.epochs=2", "--out", tmp_path / "out",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "plugin 'tlx-broken5'" in result.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_train"] == 12


MISSPELLED_HOOK = """
import tlx
from torch import nn

@tlx.hookimpl
def register_head(register):
    register("never", lambda d, c, o: nn.Linear(d, c))
"""

UNKNOWN_ARGUMENT = """
import tlx

@tlx.hookimpl
def register_heads(register, config):
    pass
"""

FEWER_ARGUMENTS = """
import tlx
from torch import nn

@tlx.hookimpl
def register_heads():
    pass
"""

OPTION_OF_ANOTHER_KIND = """
import tlx
from torch import nn

@tlx.hookimpl
def register_heads(register):
    register("shaky", lambda d, c, o: nn.Linear(d, c), weight_files=lambda name, **kw: None)
"""


def test_misspelled_hook_is_an_error_naming_the_plugin_and_the_hooks(on_path, capsys) -> None:
    on_path("tlx-typo", MISSPELLED_HOOK)
    error = info("tlx-typo").error
    assert "unknown hook 'register_head'" in error and "register_heads" in error
    assert "plugin 'tlx-typo': unknown hook" in capsys.readouterr().err
    assert "never" not in plugins.load().heads.entries
    assert plugins.load().heads.get("linear", "head.type").plugin == "tlx.heads"


def test_hook_asking_for_an_argument_tlx_lacks_is_reported(on_path) -> None:
    on_path("tlx-greedy", UNKNOWN_ARGUMENT)
    assert "{'config'}" in info("tlx-greedy").error


def test_hook_is_called_with_only_the_arguments_it_declares(on_path) -> None:
    on_path("tlx-frugal", FEWER_ARGUMENTS)
    assert info("tlx-frugal").error is None


def test_register_refuses_an_option_that_does_not_apply_to_the_kind(on_path) -> None:
    on_path("tlx-shaky", OPTION_OF_ANOTHER_KIND)
    assert "weight_files" in info("tlx-shaky").error and "head" in info("tlx-shaky").error


def test_public_plugin_api_loads_lazily_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tlx; assert 'torch' not in sys.modules, 'import tlx imported torch';"
        "from tlx import Backbone, Split, Splits, TlxError, hookimpl, load_into, read_state_dict;"
        "from tlx import BackboneFactory, DatasetFactory, HeadFactory, WeightFiles;"
        "import tlx.registry, tlx.data, tlx.errors, tlx.extraction.weights;"
        "assert Backbone is tlx.registry.Backbone and Splits is tlx.data.Splits;"
        "assert TlxError is tlx.errors.TlxError and read_state_dict is tlx.extraction.weights.read_state_dict"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
