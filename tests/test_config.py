"""Settings precedence and decoder-layout validation (one-line errors, before any work)."""
import pytest

from qwen3build.settings.layout import parse_layout, preset_layout
from qwen3build.settings.settings import load_settings, parse_seq_len
from qwen3build.errors import BuildError
from qwen3build.paths import DEFAULTS_FILE


def test_preset_is_the_seed_split_at_28_layers():
    assert preset_layout(28) == "left:0-10,mid:11-19,right:20-27"


@pytest.mark.parametrize("layers", [3, 4, 6, 8, 12, 24, 36, 48, 64])
def test_preset_scales_with_depth_and_covers_every_layer(layers):
    layout = parse_layout("preset", layers)
    assert [s.name for s in layout] == ["left", "mid", "right"]
    assert layout[0].first == 0 and layout[-1].last == layers - 1
    assert all(len(s.layers) >= 1 for s in layout)


@pytest.mark.parametrize("layers,names", [(1, ["left"]), (2, ["left", "right"])])
def test_preset_for_very_shallow_models(layers, names):
    layout = parse_layout("preset", layers)
    assert [s.name for s in layout] == names
    assert layout[0].is_entry and layout[-1].is_exit


def test_roles_entry_interior_exit():
    layout = parse_layout("a:0-1,b:2-3,c:4-4,d:5-7", 8)
    assert [s.role for s in layout] == ["entry", "interior", "interior", "exit"]
    assert parse_layout("solo:0-3", 4)[0].role == "entry+exit"


def test_layout_order_in_text_does_not_matter():
    layout = parse_layout("right:4-5,left:0-1,mid:2-3", 6)
    assert [s.name for s in layout] == ["left", "mid", "right"]


@pytest.mark.parametrize("text,needle", [
    ("left:0-2,right:4-5", "gap, layers 3-3"),
    ("left:0-3,right:3-5", "overlap"),
    ("left:0-2,right:3-6", "reaches layer 6"),
    ("left:0-2,right:3-4", "gap, layers 5-5"),
    ("left:3-1,right:0-5", "is empty"),
    ("left:0-2,,right:3-5", "empty shard entry"),
    ("left:0-1,mid:2-3,left:4-5", "appears twice"),
    ("left:0-1+3-4,right:2-2", "not name:first-last"),
    ("left 0-5", "not name:first-last"),
])
def test_invalid_layouts_get_one_line_errors(text, needle):
    with pytest.raises(BuildError) as info:
        parse_layout(text, 6)
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("raw", ["abc", "-5", "1.5", "0", "1", "99999999"])
def test_invalid_seq_len(raw):
    with pytest.raises(BuildError, match="SEQ_LEN"):
        parse_seq_len(raw)


def test_precedence_defaults_then_environment_then_doit_vars(tmp_path):
    defaults = tmp_path / "qwen3build.toml"
    config = tmp_path / "config.json"
    config.write_text("{}")
    shipped = DEFAULTS_FILE.read_text().split("[verify.")[0]  # every flat setting, as shipped
    defaults.write_text(shipped.replace('CONFIG = "assets/qwen3-tiny/config.json"', 'CONFIG = "config.json"')
                        .replace('RECIPE = "default"', 'RECIPE = "fp16"') + "\n[recipes.fp16]\n")
    assert load_settings({}, {}, defaults).SEQ_LEN == 4096
    assert load_settings({}, {"SEQ_LEN": "1024"}, defaults).SEQ_LEN == 1024
    assert load_settings({"SEQ_LEN": "512"}, {"SEQ_LEN": "1024"}, defaults).SEQ_LEN == 512
    with pytest.raises(BuildError, match="unknown setting"):
        load_settings({"SEQLEN": "5"}, {}, defaults)
    with pytest.raises(BuildError, match="PALETTIZE_MASKS"):
        load_settings({"PALETTIZE_MASKS": "maybe"}, {}, defaults)
    with pytest.raises(BuildError, match="RECIPE"):
        load_settings({"RECIPE": "int3"}, {}, defaults)
