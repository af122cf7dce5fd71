"""Bad input, table-driven: every input a user gets wrong is refused in ONE line that names
the problem and what to do, with no traceback and nothing written.

Each case makes one bad input of the kinds real users produce (truncated downloads,
hand-edited config.json and recipes, other tools' index files, typos on the command
line, unwritable locations). Every case goes through make_plan in-process: dodo.py makes
the plan before any task exists, so a refusal there is a refusal before any work, and the
output root must not even exist afterwards. Cases marked DOIT also run the real
`doit build` against a published good stack: non-zero exit, one "qwen3build:" line, no
"Traceback", and artifacts/ and cache/ unchanged byte for byte. Cases found only while
reading values (non-finite weights, values beyond fp16) run through doit alone, and must
leave the published stack as it was.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from qwen3build.build import plan as plan_module
from qwen3build.build.plan import make_plan
from qwen3build.errors import BuildError
from qwen3build.quant.lut import fit_grouped_lut
from qwen3build.quant.packfile import save_pack

from conftest import REPO, DoitWorkspace, make_checkpoint

# Every message says what to do: one of these verbs (or "did you mean").
ADVICE = re.compile(r"\b(use|give|set|point|fix|re-download|re-export|download|choose|write|quote|keep|"
                    r"remove|omit|leave|make|refit|re-create|check|define|did you mean)\b")
LAYERS = 4  # the gqa fixture's depth
RIGHT_LAST_LAYER = 3  # in the preset layout's right shard (built last)
BF16_NAN = 0x7FC0
BF16_1E5 = 0x47C3  # 99840: a bf16 value beyond fp16's 65504
FSIZE_LIMIT_BYTES = 100_000  # below one shard's weights: the "disk" fills mid-build


# ---------------------------------------------------------------- making bad inputs

def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_safetensors(path: Path, header, payload: bytes, raw_header: bytes | None = None) -> None:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


@dataclasses.dataclass
class Scene:
    """One case's scratch space: copies of the fixture checkpoints, recipe files, packs."""
    root: Path
    good: Path      # gqa checkpoint folder (one model.safetensors)
    sharded: Path   # the same shape, as index + shard files
    monkeypatch: pytest.MonkeyPatch

    def copy(self, source: Path | None = None, name: str = "ckpt") -> Path:
        target = self.root / name
        shutil.copytree(source or self.good, target)
        return target

    def config(self, **changes) -> dict:
        folder = self.copy()
        raw = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                raw.pop(key, None)
            else:
                raw[key] = value
        (folder / "config.json").write_text(json.dumps(raw))
        return {"CONFIG": str(folder / "config.json")}

    def config_text(self, text: str) -> dict:
        folder = self.copy()
        (folder / "config.json").write_text(text)
        return {"CONFIG": str(folder / "config.json")}

    def header(self, edit: Callable[[dict], dict | bytes]) -> dict:
        """Edit model.safetensors's header (a dict, or return raw bytes to write as is)."""
        folder = self.copy()
        path = folder / "model.safetensors"
        header, payload = read_safetensors(path)
        edited = edit(header)
        write_safetensors(path, edited, payload, edited if isinstance(edited, bytes) else None)
        return {"CONFIG": str(folder / "config.json")}

    def set_value(self, tensor: str, bits16: int) -> dict:
        """Overwrite the first element of a bf16 tensor."""
        folder = self.copy()
        path = folder / "model.safetensors"
        header, _ = read_safetensors(path)
        data = bytearray(path.read_bytes())
        start = 8 + struct.unpack("<Q", data[:8])[0] + header[tensor]["data_offsets"][0]
        data[start:start + 2] = struct.pack("<H", bits16)
        path.write_bytes(bytes(data))
        return {"CONFIG": str(folder / "config.json")}

    def index(self, edit: Callable[[dict, Path], dict | str]) -> dict:
        folder = self.copy(self.sharded)
        path = folder / "model.safetensors.index.json"
        edited = edit(json.loads(path.read_text()), folder)
        path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
        return {"CONFIG": str(folder / "config.json")}

    def recipe(self, body: str, name: str = "mine") -> dict:
        path = self.root / "recipes.toml"
        path.write_text(f"[recipes.{name}]\n{body}\n")
        return {"RECIPE_FILE": str(path), "RECIPE": name}

    def file(self, name: str, content: bytes | str = b"") -> Path:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def scales(self, array) -> dict:
        path = self.root / "scales.npy"
        np.save(path, array, allow_pickle=True)
        return {"SCALES": str(path)}

    def lut_dir(self, q_proj_pack=None, group_size: int = 128) -> dict:
        """LUT_DIR with a 4-bit q_proj pack per layer (recipe: q_proj = 4 only)."""
        from qwen3build.checkpoint.reader import Checkpoint, resolve_weight_files
        from qwen3build.settings.model_config import load_model_config
        config_path = self.good / "config.json"
        checkpoint = Checkpoint(load_model_config(config_path), *resolve_weight_files(config_path, None, None, ""))
        root = self.root / "luts"
        for layer in range(LAYERS):
            (root / f"layer{layer:02d}").mkdir(parents=True)
            weight = checkpoint.tensor(f"model.layers.{layer}.self_attn.q_proj.weight")
            pack = q_proj_pack(weight) if q_proj_pack else fit_grouped_lut(weight, 4, group_size)
            path = root / f"layer{layer:02d}" / "q_proj.npz"
            if isinstance(pack, bytes):
                path.write_bytes(pack)
            else:
                save_pack(path, pack)
        return {"LUT_DIR": str(root), **self.recipe("projections = { q_proj = 4 }")}

    def unwritable(self, path: Path) -> None:
        """Make `path` unwritable: chmod for a user; root writes anyway, so refuse access."""
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            return
        real_access = os.access
        self.monkeypatch.setattr(plan_module.os, "access", lambda p, mode, **kw: False
                                 if Path(p) == path and mode & os.W_OK else real_access(p, mode, **kw))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    needle: str                       # regex the one line must match (names the problem)
    make: Callable[[Scene], dict]     # -> doit variables / make_plan overrides (None: not given)
    doit: bool = False                # also run `doit build` against the published stack
    environ: dict | None = None       # environment for make_plan (the rest: {})


def header_edit(fn):
    return lambda s: s.header(fn)


def _drop(entry: str, key: str):
    def edit(header):
        del header[entry][key]
        return header
    return edit


def _set(entry: str, key: str, value):
    def edit(header):
        header[entry][key] = value
        return header
    return edit


def _overlap(header):
    a, b = "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    return header


def _out_of_range(header):
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**6, end + 10**6]
    return header


def _duplicate_key(header):
    text = json.dumps(header)
    entry = json.dumps({"model.norm.weight": header["model.norm.weight"]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode()


def _truncate(scene: Scene) -> dict:
    folder = scene.copy()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])  # an interrupted download
    return {"CONFIG": str(folder / "config.json")}


def _header_too_long(scene: Scene) -> dict:
    folder = scene.copy()
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    return {"CONFIG": str(folder / "config.json")}


def _duplicate_across_files(scene: Scene) -> dict:
    folder = scene.copy(scene.sharded)
    shutil.copy(scene.good / "model.safetensors", folder / "model.safetensors")  # another tool's consolidated copy
    return {"CONFIG": str(folder / "config.json"), "WEIGHTS_GLOB": str(folder / "*.safetensors")}


def _index_outside(scene: Scene) -> dict:
    def edit(raw, folder):
        outside = scene.root / "elsewhere"
        outside.mkdir()
        first = sorted(set(raw["weight_map"].values()))[0]
        shutil.move(folder / first, outside / first)
        raw["weight_map"] = {k: str(outside / v) if v == first else v for k, v in raw["weight_map"].items()}
        return raw
    return scene.index(edit)


def _index_extra_tensor(raw, folder):
    first = sorted(set(raw["weight_map"].values()))[0]
    raw["weight_map"]["model.layers.0.mlp.extra.weight"] = first
    return raw


def _index_wrong_file(raw, folder):
    files = sorted(set(raw["weight_map"].values()))
    crowded = next(f for f in files if list(raw["weight_map"].values()).count(f) > 1)  # stays in the index
    name = next(n for n, f in raw["weight_map"].items() if f == crowded)
    raw["weight_map"][name] = next(f for f in files if f != crowded)
    return raw


def _index_missing_file(raw, folder):
    first = sorted(set(raw["weight_map"].values()))[0]
    (folder / first).unlink()
    return raw


def _under_a_file(key: str):
    def make(scene: Scene) -> dict:
        return {key: str(scene.file("a_file", "x") / "below")}
    return make


def _unwritable_cache(scene: Scene) -> dict:
    place = scene.root / "readonly"
    scene.unwritable(place)
    return {"CACHE_DIR": str(place / "cache")}


def _nan_scales(scene: Scene) -> dict:
    scales = np.ones((LAYERS + 1, 4), np.float32)
    scales[2, 1] = np.nan
    return scene.scales(scales)


def _lut_pack_for_wrong_shape(weight):
    return fit_grouped_lut(weight[:64], 4, 64)


def _omniq_lut_pack(scene: Scene) -> dict:
    omniq = scene.root / "omniq"
    omniq.mkdir()
    weight = np.random.RandomState(0).randn(320, 64).astype(np.float32) * 0.02  # gqa embedding shape
    save_pack(omniq / "embed_tokens.npz", fit_grouped_lut(weight, 8, 64))
    return {"OMNIQ_DIR": str(omniq), **scene.recipe("embed_bits = 8")}


CASES = [
    # -- config.json ---------------------------------------------------------------------
    Case("config-is-a-json-list", r"holds a JSON list, not an object", lambda s: s.config_text("[1, 2]"), doit=True),
    Case("config-not-json", r"config\.json: not valid JSON \(.* line 1", lambda s: s.config_text('{"vocab_size": 3')),
    Case("config-kv-heads-string", r"num_key_value_heads='2' \(a string\) must be a positive whole number",
         lambda s: s.config(num_key_value_heads="2"), doit=True),
    Case("config-hidden-size-bool", r"hidden_size=True \(a boolean\) must be a positive whole number",
         lambda s: s.config(hidden_size=True)),
    Case("config-intermediate-float", r"intermediate_size=96\.0 must be a positive whole number",
         lambda s: s.config(intermediate_size=96.0)),
    Case("config-zero-layers", r"num_hidden_layers=0 must be a positive", lambda s: s.config(num_hidden_layers=0)),
    Case("config-no-vocab-size", r"no vocab_size", lambda s: s.config(vocab_size=...)),
    Case("config-negative-eps", r"rms_norm_eps=-1 must be a positive finite number", lambda s: s.config(rms_norm_eps=-1),
         doit=True),
    Case("config-eps-string", r"rms_norm_eps='1e-6' must be a positive", lambda s: s.config(rms_norm_eps="1e-6")),
    Case("config-theta-zero", r"rope_theta=0 must be a positive", lambda s: s.config(rope_theta=0)),
    Case("config-no-theta", r"no rope_theta", lambda s: s.config(rope_theta=...)),
    Case("config-tie-string", r"tie_word_embeddings='true' must be true or false",
         lambda s: s.config(tie_word_embeddings="true")),
    Case("config-heads-not-multiple", r"num_attention_heads=4 is not a multiple of num_key_value_heads=3",
         lambda s: s.config(num_key_value_heads=3)),
    Case("config-odd-head-dim", r"head_dim=33 must be even", lambda s: s.config(head_dim=33)),
    Case("config-not-qwen3", r"only Qwen3", lambda s: s.config(model_type="llama", architectures=["LlamaForCausalLM"])),
    Case("config-rope-scaling", r"rope scaling 'yarn' is not supported",
         lambda s: s.config(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
    Case("config-sliding-window", r"use_sliding_window=true is not supported", lambda s: s.config(use_sliding_window=True)),
    Case("config-fewer-layers-than-checkpoint", r"num_hidden_layers=3 but the checkpoint has layers 0-3",
         lambda s: s.config(num_hidden_layers=3), doit=True),
    Case("config-more-layers-than-checkpoint", r"missing 11 tensor\(s\): model\.layers\.4\.",
         lambda s: s.config(num_hidden_layers=5)),
    Case("config-wrong-intermediate", r"mlp\.\w+\.weight: shape .* config\.json implies",
         lambda s: s.config(intermediate_size=100)),
    Case("config-eos-beyond-vocab", r"eos_token_id=99999: each id must be a whole number in 0\.\.319",
         lambda s: s.config(eos_token_id=99999)),
    Case("generation-config-not-json", r"generation_config\.json: not valid JSON",
         lambda s: {**s.config(), "CONFIG": str(s.file("ckpt/generation_config.json", "{eos").parent / "config.json")}),
    Case("config-max-positions-one", r"max_position_embeddings=1 leaves no context",
         lambda s: s.config(max_position_embeddings=1)),
    Case("config-is-a-directory", r"CONFIG=.* is a directory; point CONFIG at .*config\.json",
         lambda s: {"CONFIG": str(s.copy())}),
    Case("config-missing", r"CONFIG=.* does not exist", lambda s: {"CONFIG": str(s.root / "nope" / "config.json")}),
    Case("seq-len-beyond-model", r"SEQ_LEN=1024 exceeds the model's max_position_embeddings=512",
         lambda s: {"SEQ_LEN": "1024"}),
    # -- safetensors headers ---------------------------------------------------------------
    Case("header-entry-without-data-offsets", r"model\.norm\.weight has no data_offsets",
         header_edit(_drop("model.norm.weight", "data_offsets")), doit=True),
    Case("truncated-download", r"ends at byte \d+ but the file has \d+ \(truncated\)", _truncate, doit=True),
    Case("header-length-beyond-file", r"header length \d+ runs past the end", _header_too_long),
    Case("header-is-a-list", r"header is a JSON list, not an object", header_edit(lambda h: b"[1, 2, 3]")),
    Case("header-not-json", r"header is not valid JSON", header_edit(lambda h: b"\x00garbage{")),
    Case("header-shape-strings", r"shape \['64', 64\], not a list of whole numbers",
         header_edit(_set("model.layers.0.mlp.down_proj.weight", "shape", ["64", 64]))),
    Case("header-offsets-out-of-range", r"model\.norm\.weight ends at byte .* \(truncated\)", header_edit(_out_of_range)),
    Case("header-offsets-overlap", r"tensors .*q_norm\.weight and .*k_norm\.weight overlap|k_norm.*q_norm.*overlap",
         header_edit(_overlap)),
    Case("header-offsets-wrong-size", r"span \d+ bytes but BF16 \[64, 63\] needs",
         header_edit(_set("model.layers.0.mlp.down_proj.weight", "shape", [64, 63]))),
    Case("header-unsupported-dtype", r"dtype I16 is not supported; use BF16, F16 or F32",
         header_edit(_set("model.norm.weight", "dtype", "I16"))),
    Case("header-unknown-dtype", r"dtype 'F17', not a safetensors dtype", header_edit(_set("model.norm.weight", "dtype", "F17"))),
    Case("header-duplicate-key", r"key 'model\.norm\.weight' appears twice", header_edit(_duplicate_key)),
    Case("tensor-in-two-files", r"appears in both .* keep one copy", _duplicate_across_files),
    Case("weights-not-safetensors", r"config\.json: .*(runs past the end|too short)",
         lambda s: {"WEIGHTS": str(s.good / "config.json")}),
    Case("weights-is-a-directory", r"WEIGHTS=.* is a directory", lambda s: {"WEIGHTS": str(s.good)}),
    Case("weights-missing", r"WEIGHTS=.* does not exist", lambda s: {"WEIGHTS": str(s.root / "model.safetensors")}),
    Case("weights-glob-matches-nothing", r"no safetensors files match",
         lambda s: {"WEIGHTS_GLOB": str(s.root / "*.safetensors")}),
    # -- the index -------------------------------------------------------------------------
    Case("index-without-weight-map", r"no weight_map", lambda s: s.index(lambda raw, f: {"metadata": {}}), doit=True),
    Case("index-absolute-path-outside", r"outside the checkpoint folder", _index_outside, doit=True),
    Case("index-relative-path-escapes", r"\.\./other\.safetensors, outside the checkpoint folder",
         lambda s: s.index(lambda raw, f: {"weight_map": {**raw["weight_map"], "lm_head.weight": "../other.safetensors"}})),
    Case("index-names-missing-file", r"names missing shard file", lambda s: s.index(_index_missing_file)),
    Case("index-names-absent-tensor", r"places model\.layers\.0\.mlp\.extra\.weight in .* no such tensor",
         lambda s: s.index(_index_extra_tensor)),
    Case("index-wrong-file", r"places .* in .* but it is in", lambda s: s.index(_index_wrong_file)),
    Case("index-not-json", r"index\.json: not valid JSON", lambda s: s.index(lambda raw, f: '{"weight_map": ')),
    Case("index-weight-map-list", r"weight_map=.*a safetensors index maps", lambda s: s.index(lambda raw, f: {"weight_map": []})),
    Case("weights-index-missing", r"WEIGHTS_INDEX=.* does not exist",
         lambda s: {"WEIGHTS_INDEX": str(s.root / "model.safetensors.index.json")}),
    # -- recipes ---------------------------------------------------------------------------
    Case("recipe-bits-true", r"projections\.q_proj = True \(bool\); bits must be an integer",
         lambda s: s.recipe("projections = { q_proj = true }"), doit=True),
    Case("recipe-bits-float", r"projections\.q_proj = 8\.0 \(float\)", lambda s: s.recipe("projections = { q_proj = 8.0 }")),
    Case("recipe-bits-string", r"projections\.q_proj = '8' \(str\)", lambda s: s.recipe('projections = { q_proj = "8" }')),
    Case("recipe-bits-five", r"projections\.q_proj = 5; bits must be an integer, one of 1, 2, 3, 4, 6, 8",
         lambda s: s.recipe("projections = { q_proj = 5 }")),
    Case("recipe-bits-negative", r"projections\.q_proj = -4", lambda s: s.recipe("projections = { q_proj = -4 }")),
    Case("recipe-group-size-zero", r"group_size = 0 must be a positive integer",
         lambda s: s.recipe("projections = { q_proj = 8 }\ngroup_size = 0"), doit=True),
    Case("recipe-group-size-string", r"group_size = '128' must be a positive integer",
         lambda s: s.recipe('projections = { q_proj = 8 }\ngroup_size = "128"')),
    Case("recipe-group-size-float", r"group_size = 64\.5 must be a positive integer",
         lambda s: s.recipe("projections = { q_proj = 8 }\ngroup_size = 64.5")),
    Case("recipe-unknown-projection", r"projection 'qproj' is unknown \(did you mean q_proj\?\)",
         lambda s: s.recipe("projections = { qproj = 8 }")),
    Case("recipe-unknown-key", r"unknown key 'groupsize' \(did you mean group_size\?\)",
         lambda s: s.recipe("groupsize = 64")),
    Case("recipe-layer-beyond-depth", r"layer \"9\" is outside the model's 4 layers",
         lambda s: s.recipe('layer_bits = { "9" = 8 }')),
    Case("recipe-layer-key-not-index", r"layer_bits key 'first' is not a layer index",
         lambda s: s.recipe('layer_bits = { "first" = 8 }')),
    Case("recipe-layer-named-twice", r"\"0\" = 8 and \"-4\" = 4 both name layer 0",
         lambda s: s.recipe('layer_bits = { "0" = 8, "-4" = 4 }')),
    Case("recipe-embed-bits-six", r"embed_bits = 6; bits must be an integer, one of 4, 8", lambda s: s.recipe("embed_bits = 6")),
    Case("recipe-projections-not-table", r"projections = 8 must be a table", lambda s: s.recipe("projections = 8")),
    Case("recipe-not-a-table", r"\[recipes\.mine\]: is int 3, not a table",
         lambda s: {"RECIPE_FILE": str(s.file("r.toml", "[recipes]\nmine = 3\n")), "RECIPE": "mine"}),
    Case("recipe-file-missing", r"RECIPE_FILE=.* does not exist", lambda s: {"RECIPE_FILE": str(s.root / "none.toml")}),
    Case("recipe-file-not-toml", r"RECIPE_FILE=.*: not valid TOML",
         lambda s: {"RECIPE_FILE": str(s.file("r.toml", "[recipes.mine\nx = ")), "RECIPE": "mine"}),
    Case("recipe-file-is-a-directory", r"RECIPE_FILE=.* is a directory", lambda s: {"RECIPE_FILE": str(s.root)}),
    Case("recipe-unknown-name", r"RECIPE='fp61' is unknown \(did you mean fp16\?\)", lambda s: {"RECIPE": "fp61"}),
    # -- settings ----------------------------------------------------------------------------
    Case("seq-len-not-a-number", r"SEQ_LEN='abc' is not a whole number", lambda s: {"SEQ_LEN": "abc"}),
    Case("seq-len-fraction", r"SEQ_LEN='1\.5' is not a whole number", lambda s: {"SEQ_LEN": "1.5"}),
    Case("seq-len-zero", r"SEQ_LEN=0 is out of range", lambda s: {"SEQ_LEN": "0"}),
    Case("seq-len-env-bad", r"SEQ_LEN='lots' is not a whole number", lambda s: {"SEQ_LEN": None},
         environ={"SEQ_LEN": "lots"}),
    Case("palettize-masks-maybe", r"PALETTIZE_MASKS='maybe' is not a boolean", lambda s: {"PALETTIZE_MASKS": "maybe"}),
    Case("kv-write-unknown", r"KV_WRITE='fast' is not one of blend, slice", lambda s: {"KV_WRITE": "fast"}),
    Case("prefill-len-not-a-number", r"PREFILL_LEN='x' is not a whole number", lambda s: {"PREFILL_LEN": "x"}),
    Case("prefill-len-too-big", r"PREFILL_LEN=600 is out of range", lambda s: {"PREFILL_LEN": "600"}),
    Case("prefill-len-beyond-seq-len", r"PREFILL_LEN=64 exceeds SEQ_LEN=32",
         lambda s: {"PREFILL_LEN": "64", "SEQ_LEN": "32"}),
    Case("cache-max-size-not-a-size", r"CACHE_MAX_SIZE='lots' is not a size", lambda s: {"CACHE_MAX_SIZE": "lots"}),
    Case("cache-max-size-negative", r"CACHE_MAX_SIZE='-1G' is not a size", lambda s: {"CACHE_MAX_SIZE": "-1G"}),
    Case("formats-misspelled", r"FORMATS='coreml,coreia': 'coreia' is unknown \(did you mean coreai\?\)",
         lambda s: {"FORMATS": "coreml,coreia"}, doit=True),
    Case("formats-empty", r"FORMATS is empty; give at least one of coreml, coreai", lambda s: {"FORMATS": " "}),
    Case("formats-twice", r"FORMATS='coreai,coreai' names coreai twice", lambda s: {"FORMATS": "coreai,coreai"}),
    Case("formats-empty-entry", r"FORMATS='coreml,': an empty entry", lambda s: {"FORMATS": "coreml,"}),
    Case("coreai-compute-unit-unknown", r"COREAI_COMPUTE_UNIT='ane' is not one of default, cpu, gpu, neural_engine",
         lambda s: {"COREAI_COMPUTE_UNIT": "ane"}),
    Case("shards-gap", r"gap, layers 2-2 belong to no shard", lambda s: {"SHARDS": "left:0-1,right:3-3"}),
    Case("shards-beyond-depth", r"reaches layer 9 but the model has layers 0-3", lambda s: {"SHARDS": "left:0-9"}),
    Case("shards-malformed", r"'left=0-3' is not name:first-last", lambda s: {"SHARDS": "left=0-3"}),
    Case("misspelled-variable", r"unknown (setting|variable) SEQLEN.*\(did you mean SEQ_LEN\?\)",
         lambda s: {"SEQLEN": "100"}, doit=True),
    Case("config-empty", r"CONFIG is empty", lambda s: {"CONFIG": ""}),
    # -- output locations ------------------------------------------------------------------
    Case("out-dir-under-a-file", r"OUT_DIR=.*a_file is a file, not a directory", _under_a_file("OUT_DIR"), doit=True),
    Case("cache-dir-under-a-file", r"CACHE_DIR=.*a_file is a file, not a directory", _under_a_file("CACHE_DIR"),
         doit=True),
    Case("tmp-dir-is-a-file", r"TMP_DIR=.* is a file, not a directory", lambda s: {"TMP_DIR": str(s.file("tmpfile"))}),
    Case("mil-dir-under-a-file", r"MIL_DIR=.*a_file is a file", _under_a_file("MIL_DIR")),
    Case("cache-dir-unwritable", r"CACHE_DIR=.*readonly is not writable", _unwritable_cache),
    # -- external packs and scales -----------------------------------------------------------
    Case("lut-dir-missing", r"LUT_DIR=.* does not exist", lambda s: {"LUT_DIR": str(s.root / "luts")}),
    Case("lut-dir-lacks-packs", r"LUT_DIR=.* lacks layer00/q_proj\.npz",
         lambda s: {"LUT_DIR": str((s.root / "luts").mkdir() or s.root / "luts"),
                    **s.recipe("projections = { q_proj = 4 }")}),
    Case("lut-pack-wrong-shape", r"LUT_DIR: .*q_proj\.npz: pack is for shape \[64, 64\] but the model tensor is \[128, 64\]",
         lambda s: s.lut_dir(_lut_pack_for_wrong_shape)),
    Case("lut-pack-wrong-bits", r"LUT_DIR: .*q_proj\.npz: pack has 2 bits but the config asks for 4",
         lambda s: s.lut_dir(lambda w: fit_grouped_lut(w, 2, 128))),
    Case("lut-pack-not-npz", r"LUT_DIR: .*q_proj\.npz: not a readable \.npz pack", lambda s: s.lut_dir(lambda w: b"PK\x03 no")),
    Case("lut-pack-wrong-group-size", r"LUT_DIR: .*q_proj\.npz: group_size 32 but the recipe uses 128 for q_proj",
         lambda s: s.lut_dir(group_size=32)),
    Case("omniq-pack-wrong-kind", r"OMNIQ_DIR: .*embed_tokens\.npz: a lut pack, but this tensor needs a blockwise pack",
         _omniq_lut_pack),
    Case("scales-missing", r"SCALES=.* does not exist", lambda s: {"SCALES": str(s.root / "nope.npy")}, doit=True),
    Case("scales-wrong-shape", r"SLaNC scales have shape \(2, 4\), expected \(5, 4\)",
         lambda s: s.scales(np.ones((2, 4), np.float32))),
    Case("scales-nan", r"SLaNC scales must be finite and positive, but hold NaN", _nan_scales),
    Case("scales-beyond-fp16", r"within fp16 range", lambda s: s.scales(np.full((LAYERS + 1, 4), 1e6, np.float32))),
    Case("scales-strings", r"SLaNC scales have dtype <U1, not numbers", lambda s: s.scales(np.full((LAYERS + 1, 4), "x"))),
    Case("scales-not-npy", r"SCALES=.*: not a readable \.npy array", lambda s: {"SCALES": str(s.file("s.npy", "1,2,3\n"))}),
    Case("scales-is-a-directory", r"SCALES=.* is a directory", lambda s: {"SCALES": str(s.root)}),
]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gqa_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("bad_input_checkpoints")
    return {"good": gqa_checkpoint.parent,
            "sharded": make_checkpoint(root / "sharded", "gqa", max_shard_bytes=60_000).parent}


@pytest.fixture
def scene(tmp_path, checkpoints, monkeypatch) -> Scene:
    (tmp_path / "case").mkdir()
    return Scene(tmp_path / "case", checkpoints["good"], checkpoints["sharded"], monkeypatch)


@pytest.fixture(scope="module")
def published(tmp_path_factory, gqa_checkpoint) -> DoitWorkspace:
    """A good stack, built and published once; every doit case runs against it."""
    ws = DoitWorkspace(tmp_path_factory.mktemp("published"), gqa_checkpoint)
    ws.doit("build")
    return ws


def plan_overrides(root: Path, config: Path) -> dict:
    return {"CONFIG": str(config), "SEQ_LEN": "32", "RECIPE": "fp16", "OUT_DIR": str(root / "artifacts/coreml/packages"),
            "MIL_DIR": str(root / "artifacts/coreml/mil"), "TMP_DIR": str(root / "artifacts/.tmp"),
            "CACHE_DIR": str(root / "cache")}


def snapshot(*roots: Path) -> dict:
    """Every path under the roots: a link's target, a file's digest, or 'dir' (links not followed)."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    found[str(path)] = ("link", os.readlink(path))
                elif path.is_dir():
                    found[str(path)] = ("dir",)
                else:
                    found[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def published_part(ws: DoitWorkspace) -> dict:
    """The published stack: the links and the generations they point into."""
    artifacts = ws.root / "artifacts"
    links = [artifacts / "coreml/packages", artifacts / "coreml/mil", artifacts / "numerics", artifacts / "quant"]
    shot = {str(link): ("link", os.readlink(link)) for link in links}
    return {**shot, **snapshot(artifacts / ".generations")}


def one_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("qwen3build:")]
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    return lines[0]


def leftovers(ws: DoitWorkspace) -> list[str]:
    """Half-written things an interrupted or failed build could leave."""
    marks = (".tmp-", ".work-")
    return [p for p in snapshot(ws.root / "artifacts", ws.root / "cache") if any(m in Path(p).name for m in marks)]


# ---------------------------------------------------------------- the table

def test_the_table_holds_enough_distinct_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_refused_in_one_line_before_any_work(case: Case, scene: Scene, tmp_path):
    out_root = tmp_path / "out"
    overrides = {**plan_overrides(out_root, scene.good / "config.json"), **case.make(scene)}
    overrides = {key: value for key, value in overrides.items() if value is not None}  # None: not given
    with pytest.raises(BuildError) as info:
        make_plan(overrides, environ=case.environ or {})
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    assert re.search(case.needle, message), message
    assert ADVICE.search(message), f"says no remedy: {message}"
    assert not out_root.exists(), "making a plan must write nothing"


DOIT_CASES = [case for case in CASES if case.doit]


@pytest.mark.parametrize("case", DOIT_CASES, ids=[case.id for case in DOIT_CASES])
def test_doit_refuses_in_one_line_and_changes_nothing(case: Case, scene: Scene, published: DoitWorkspace):
    variables = case.make(scene)
    before = snapshot(published.root / "artifacts", published.root / "cache")
    result = published.doit("build", check=False, **variables)
    line = one_line(result)
    assert [text for text in (result.stdout + result.stderr).splitlines() if text.strip()] == [line]  # nothing else
    assert re.search(case.needle, line), line
    assert snapshot(published.root / "artifacts", published.root / "cache") == before


# ---------------------------------------------------------------- found while reading values

VALUE_CASES = [
    # (id, tensor, bf16 bits, needle): the build starts, fails before publishing anything.
    ("nan-weight-in-layer-2", "model.layers.2.mlp.up_proj.weight", BF16_NAN,
     r"model\.layers\.2\.mlp\.up_proj\.weight: 1 non-finite value"),
    ("weight-beyond-fp16-in-last-shard", f"model.layers.{RIGHT_LAST_LAYER}.mlp.down_proj.weight", BF16_1E5,
     rf"model\.layers\.{RIGHT_LAST_LAYER}\.mlp\.down_proj\.weight: values beyond fp16 range"),
]


@pytest.mark.parametrize("tensor,bits16,needle", [case[1:] for case in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_values_fail_before_publishing(tensor, bits16, needle, scene: Scene, published: DoitWorkspace):
    variables = scene.set_value(tensor, bits16)
    make_plan({**published.paths(), **variables}, environ={})  # headers are fine: found only in the values
    before = published_part(published)
    line = one_line(published.doit("build", check=False, **variables))
    assert re.search(needle, line) and ADVICE.search(line), line
    assert published_part(published) == before
    assert leftovers(published) == []


def test_full_disk_mid_build_is_one_line_and_leaves_the_stack(published: DoitWorkspace):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail (EFBIG) as they would (ENOSPC)."""
    before = published_part(published)
    env = {k: v for k, v in os.environ.items() if k not in ("SEQ_LEN", "SHARDS", "CONFIG", "RECIPE")}
    assignments = [f"{k}={v}" for k, v in {**published.paths(), "SEQ_LEN": "48"}.items()]  # new shards to write

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT_BYTES, FSIZE_LIMIT_BYTES))

    result = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "build", *assignments],
                            cwd=published.root, env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size)
    line = one_line(result)
    assert re.search(r"(No space|File too large|disk may be full)", line) and str(published.root) in line, line
    assert published_part(published) == before
    assert leftovers(published) == []


# ---------------------------------------------------------------- defaults instead of refusals

# The packages compute with exactly the packed values the reference dequantizes (fp16
# compute, LUT weights), as in test_quantized_build.py.
GROUPED_PACKAGE_MAX_REL_LOGIT_ERROR = 2e-2


def test_a_recipe_fits_any_channel_count_with_one_note_per_kind(published: DoitWorkspace, tmp_path):
    """gqa's k_proj has 64 output channels and gate_proj 96: not multiples of the
    recipe's 128. Each gets the largest dividing group size (one note per kind, not per
    layer); the stack builds, and the packages match the reference on the same packs."""
    from qwen3build.quant.packfile import inspect_pack
    from qwen3build.runtime.backends import PackageBackend, reference_from_stack
    from qwen3build.stack import load_stack
    recipes = tmp_path / "recipes.toml"
    recipes.write_text("[recipes.grouped]\nprojections = { q_proj = 8, k_proj = 8, gate_proj = 6 }\n")
    result = published.doit("build", RECIPE="grouped", RECIPE_FILE=str(recipes))
    notes = [line for line in result.stderr.splitlines() if "LUT groups are" in line]
    assert len(notes) == 2 and "k_proj has 64 output channels" in notes[0] and "gate_proj has 96" in notes[1], notes
    for kind, shape, group_size in (("q_proj", (128, 64), 128), ("k_proj", (64, 64), 64), ("gate_proj", (96, 64), 96)):
        for layer in range(LAYERS):
            pack = published.root / f"artifacts/quant/layer{layer:02d}/{kind}.npz"
            assert inspect_pack(pack, shape)["group_size"] == group_size, (kind, layer)
    stack = load_stack(published.out_dir)
    reference, chain = reference_from_stack(stack), PackageBackend(stack, "evaluator")
    for position, token in enumerate(np.random.RandomState(0).randint(0, 320, 6)):
        logits = chain.forward(int(token), position)[0].astype(np.float32)
        expected = reference.step(int(token), position)
        assert np.abs(logits - expected).max() / np.abs(expected).max() < GROUPED_PACKAGE_MAX_REL_LOGIT_ERROR
