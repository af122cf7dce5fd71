"""Settings precedence and decoder-layout validation (one-line errors, before any work)."""
import logging

import pytest

from qwen3build.settings.layout import parse_layout, preset_layout
from qwen3build.settings.settings import load_settings, parse_seq_len
from qwen3build.errors import BuildError
from qwen3build.paths import DEFAULTS_FILE
from conftest import make_checkpoint


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


# ---------------------------------------------------------------- defaults fitted to the model

def plan_settings(root, config, **extra) -> dict:
    return {"CONFIG": str(config), "RECIPE": "fp16", "OUT_DIR": str(root / "artifacts/coreml/packages"),
            "MIL_DIR": str(root / "artifacts/coreml/mil"), "TMP_DIR": str(root / "artifacts/.tmp"),
            "CACHE_DIR": str(root / "cache"), **extra}


def test_default_seq_len_is_lowered_to_the_models_maximum_with_a_note(tmp_path, gqa_checkpoint, caplog):
    from qwen3build.build.plan import make_plan
    caplog.set_level(logging.INFO, logger="qwen3build")
    plan = make_plan(plan_settings(tmp_path, gqa_checkpoint), environ={})  # SEQ_LEN not given: 4096 > 512
    assert plan.settings.SEQ_LEN == plan.config.max_position_embeddings == 512
    notes = [r.getMessage() for r in caplog.records if "SEQ_LEN" in r.getMessage()]
    assert len(notes) == 1 and "using SEQ_LEN=512" in notes[0]
    assert make_plan(plan_settings(tmp_path, gqa_checkpoint), environ={"SEQ_LEN": "256"}).settings.SEQ_LEN == 256
    with pytest.raises(BuildError, match="SEQ_LEN=1024 exceeds the model's max_position_embeddings=512"):
        make_plan(plan_settings(tmp_path, gqa_checkpoint, SEQ_LEN="1024"), environ={})  # given: never lowered


@pytest.mark.parametrize("rows,group_size,expected", [
    (2048, 128, 128), (64, 128, 64), (96, 128, 96), (192, 128, 96), (320, 128, 80), (257, 128, 1), (6, 4, 3)])
def test_lut_group_size_is_the_largest_divisor_not_above_the_recipes(rows, group_size, expected):
    from qwen3build.settings.recipes import Recipe
    recipe = Recipe("r", "", {"q_proj": 4}, {}, None, group_size)
    assert recipe.lut_group_size(rows) == expected


def test_plan_resolves_group_sizes_per_matrix_with_one_note_per_kind(tmp_path, gqa_checkpoint, caplog):
    from qwen3build.build.plan import make_plan
    caplog.set_level(logging.INFO, logger="qwen3build")
    plan = make_plan(plan_settings(tmp_path, gqa_checkpoint, SEQ_LEN="32", RECIPE="default"), environ={})
    # gqa: q 128 rows, k/v 64, o 64, gate/up 96, down 64 output channels; the recipe says 128.
    expected = {"q_proj": 128, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 96, "up_proj": 96,
                "down_proj": 64}
    assert all(plan.group_sizes(layer) == expected for layer in range(plan.config.num_hidden_layers))
    notes = [r.getMessage() for r in caplog.records if "LUT groups are" in r.getMessage()]
    assert len(notes) == 6, notes  # one per affected kind, not one per layer
    assert any("k_proj has 64 output channels, not a multiple of group_size 128: its LUT groups are 64 rows" in n
               for n in notes)


def test_plan_notes_come_only_after_every_check_passed(tmp_path, gqa_checkpoint, caplog):
    from qwen3build.build.plan import make_plan
    caplog.set_level(logging.INFO, logger="qwen3build")
    with pytest.raises(BuildError, match="SCALES"):
        make_plan(plan_settings(tmp_path, gqa_checkpoint, RECIPE="default", SCALES=str(tmp_path / "none.npy")),
                  environ={})
    assert not caplog.records  # a refusal is the only line a user sees


def test_default_prefill_len_follows_a_lowered_seq_len(tmp_path):
    """A model whose maximum is below the default PREFILL_LEN: both defaults fit it; a
    given PREFILL_LEN above the fitted SEQ_LEN is refused in one line."""
    from qwen3build.build.plan import make_plan
    config = make_checkpoint(tmp_path / "ckpt", "gqa", max_position_embeddings=32)
    plan = make_plan(plan_settings(tmp_path, config), environ={})
    assert (plan.settings.SEQ_LEN, plan.settings.PREFILL_LEN) == (32, 32)
    with pytest.raises(BuildError, match="PREFILL_LEN=64 exceeds SEQ_LEN=32"):
        make_plan(plan_settings(tmp_path, config, PREFILL_LEN="64"), environ={})
