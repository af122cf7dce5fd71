"""`doit release`: the Hugging Face release folder of a built, verified, audited stack.

One stack is built, verified and released through the real dodo.py (the default
checkpoint, copied with a LICENSE and a NOTICE, SEQ_LEN 64, fp16, small verify options);
the other tests release it again in-process, refuse it, or run what it wrote.
"""
import dataclasses
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwen3build.build.plan import make_plan
from qwen3build.errors import BuildError
from qwen3build.release import bundle, card
from qwen3build.release.bundle import is_current, make_release
from qwen3build.release.inputs import gather
from qwen3build.release.options import request_from_vars
from qwen3build.release.zips import DIR_MODE, FILE_MODE, ZIP_DATE, zip_tree

from conftest import REPO, DoitWorkspace

DEFAULT_CHECKPOINT = REPO / "assets" / "qwen3-tiny"
SEQ_LEN = "64"
SMALL_VERIFY = dict(WINDOWS="64", MAX_WINDOWS="1", PACKAGE_POSITIONS="64", ROLLOUTS="1", ROLLOUT_TOKENS="8")
PACKAGES = ("io_model.mlpackage", "decoder_shard_left.mlpackage", "decoder_shard_mid.mlpackage",
            "decoder_shard_right.mlpackage", "sampler_model.mlpackage")
LICENSE_TEXT = "                                 Apache License\n                           Version 2.0, January 2004\n"
NOTICE_TEXT = "qwen3-tiny test notice\n"
RUN_TOKENS = 6


@dataclasses.dataclass
class Released:
    ws: DoitWorkspace
    checkpoint: Path
    destination: Path
    output: str           # stdout + stderr of `doit release`

    def settings(self) -> dict:
        return {**self.ws.paths(), "SEQ_LEN": SEQ_LEN}

    def plan(self):
        return make_plan(self.settings(), environ={})

    def request(self, **variables):
        return request_from_vars(self.plan().tree, variables, environ={})

    def report_path(self) -> Path:
        return self.ws.root / "artifacts" / "verify" / "fp16-heldout_code.json"


def _copy_checkpoint(target: Path, licensed: bool) -> Path:
    shutil.copytree(DEFAULT_CHECKPOINT, target)
    if licensed:
        (target / "LICENSE").write_text(LICENSE_TEXT)
        (target / "NOTICE").write_text(NOTICE_TEXT)
    return target / "config.json"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Released:
    root = tmp_path_factory.mktemp("release")
    config = _copy_checkpoint(root / "checkpoints" / "qwen3-tiny", licensed=True)
    ws = DoitWorkspace(root / "ws", config)
    ws.doit("build", SEQ_LEN=SEQ_LEN)
    ws.doit("verify", SEQ_LEN=SEQ_LEN, **SMALL_VERIFY)
    result = ws.doit("release", SEQ_LEN=SEQ_LEN)
    destination = ws.root / "artifacts" / "release" / "qwen3-tiny-fp16-s64"
    assert destination.is_dir(), result.stdout + result.stderr
    return Released(ws, config.parent, destination, result.stdout + result.stderr)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI and verify entry points called in-process configure the "qwen3build" logger
    with a handler on the stderr of the moment (a test's capture); later tests must not
    inherit a handler writing to a closed capture."""
    import logging
    logger = logging.getLogger("qwen3build")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _unzip_release(destination: Path, target: Path) -> Path:
    shutil.copytree(destination, target)
    for archive in sorted(target.glob("*.zip")):
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(target)
    return target


def _card(destination: Path) -> str:
    return (destination / "README.md").read_text()


# ---------------------------------------------------------------- what the bundle holds

def test_bundle_holds_the_packages_checkpoint_files_card_and_sums(released):
    names = sorted(p.name for p in released.destination.iterdir())
    assert names == sorted([f"{p}.zip" for p in PACKAGES] + [
        "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "stack.json",
        "README.md", "LICENSE", "NOTICE", "SHA256SUMS"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (released.destination / name).read_bytes() == (released.checkpoint / name).read_bytes(), name
    assert (released.destination / "LICENSE").read_text() == LICENSE_TEXT
    assert (released.destination / "NOTICE").read_text() == NOTICE_TEXT
    assert "release (verified)" in released.output


def test_zips_are_deterministic_archives_of_each_package(released):
    out_dir = released.ws.out_dir
    for package in PACKAGES:
        with zipfile.ZipFile(released.destination / f"{package}.zip") as archive:
            entries = archive.infolist()
            names = [e.filename for e in entries]
            assert names == sorted(names) and names[0] == f"{package}/"
            for entry in entries:
                assert entry.date_time == ZIP_DATE and not entry.extra and entry.create_system == 3
                mode = entry.external_attr >> 16
                assert mode == (DIR_MODE if entry.is_dir() else FILE_MODE), entry.filename
                if not entry.is_dir():
                    assert entry.compress_type == zipfile.ZIP_DEFLATED
                    source = out_dir / entry.filename
                    assert archive.read(entry) == source.read_bytes(), entry.filename
            files = {n for n in names if not n.endswith("/")}
            assert files == {p.relative_to(out_dir).as_posix() for p in (out_dir / package).rglob("*") if p.is_file()}


def test_bundle_stack_json_is_sanitized_and_records_the_zips(released):
    published = json.loads((released.ws.out_dir / "stack.json").read_text())
    info = json.loads((released.destination / "stack.json").read_text())
    for dropped in ("keys", "weights", "scales", "quant"):
        assert dropped not in info
    assert info["checkpoint_config"] == "config.json" and info["tokenizer"] == "tokenizer.json"
    assert info["files"] == published["files"] and info["shards"] == published["shards"]
    assert info["release"]["verified"] is True
    for package in PACKAGES:
        zipped = released.destination / f"{package}.zip"
        assert info["release"]["packages"][package] == {
            "zip": zipped.name, "sha256": hashlib.sha256(zipped.read_bytes()).hexdigest()}


def test_card_figures_come_from_the_reports(released):
    text = _card(released.destination)
    report = json.loads(released.report_path().read_text())
    audit = json.loads((released.ws.root / "artifacts" / "audit" / "audit.json").read_text())
    front, body = text.split("\n---\n", 1)
    assert front.startswith("---\nlicense: apache-2.0\n")
    assert "pipeline_tag: text-generation" in front and "base_model" not in front
    for tag in ("coreml", "apple-neural-engine", "qwen3"):
        assert f"- {tag}\n" in front
    for section in ("## Deployment envelope", "## Quantization", "## Parity against the fp32 transformers oracle",
                    "## Audit", "## How to run", "## What is preserved, and what is intentionally not", "## License"):
        assert section in body
    packages = report["rungs"]["packages"]
    tf = packages["teacher_forced"]
    assert f"| `packages` | evaluator | {tf['top1']:.4f} ({tf['qualified']:,} of {tf['positions']:,}) |" in body
    drift = packages["perplexity"]["64"]
    assert f"{drift['rung']:.3f} ({drift['drift']:+.3%}, 1 window(s))" in body
    assert f"measured on `{report['platform']}`" in body
    stack = audit["stack"]
    assert f"| whole stack | {stack['package_bytes']:,} | {stack['weights_stored_bytes']:,} | " \
           f"{stack['decode_bytes_per_token']:,} | {stack['minimum_bytes_per_token']:,} |" in body
    assert f"| dispatches per token | {stack['dispatches_per_token']} (audit report) |" in body
    assert "| context capacity | 64 tokens" in body and "| batch | 1" in body
    assert "`kv_cache` (4, 2, 64, 64) fp16" in body                # states per package, from the audit
    from qwen3build.build.cache import ActionCache
    keys = json.loads((released.ws.out_dir / "stack.json").read_text())["keys"]
    built = ActionCache(released.ws.root / "cache").read_meta(keys["shard:left"])["extra"]["bpw"]
    assert f"| `decoder_shard_left.mlpackage` | 1,705,216 | {built:.2f} | 16.00 |" in body   # the build's record
    assert "qwen3build run --models-dir qwen3-tiny-fp16-s64" in body and "makeState()" in body
    assert "not verified" not in body
    assert "Copied unchanged from the checkpoint: `LICENSE`, `NOTICE`" in body


# ---------------------------------------------------------------- deterministic, keyed

def test_two_releases_are_byte_identical_and_a_second_run_is_up_to_date(released, tmp_path):
    again = make_release(released.plan(), released.request(RELEASE_DIR=str(tmp_path / "again")))
    first = sorted(p.name for p in released.destination.iterdir())
    assert sorted(again.files) == first
    for name in first:
        assert (again.destination / name).read_bytes() == (released.destination / name).read_bytes(), name
    rerun = released.ws.doit("release", SEQ_LEN=SEQ_LEN)
    assert "-- release" in rerun.stdout                        # doit: up to date, nothing rewritten


def test_card_template_reports_and_variables_are_in_the_key(released, tmp_path, monkeypatch):
    plan, request = released.plan(), released.request()
    assert is_current(plan, request)
    changed = tmp_path / "card.md"
    changed.write_text(card.TEMPLATE_PATH.read_text().replace("## How to run", "## How to run it"))
    monkeypatch.setattr(card, "TEMPLATE_PATH", changed)
    assert not is_current(plan, request)                      # a template change rebuilds
    monkeypatch.undo()
    assert is_current(plan, request)
    report = released.report_path()
    original = report.read_bytes()
    try:
        report.write_text(json.dumps({**json.loads(original), "seconds": 1.0}))
        assert not is_current(plan, request)                  # another verify report rebuilds
    finally:
        report.write_bytes(original)
    assert not is_current(plan, released.request(BASE_MODEL="Qwen/Qwen3-1.7B"))


# ---------------------------------------------------------------- refusals

def test_release_without_a_verify_report_is_refused_in_one_line(released, tmp_path):
    release_dir = tmp_path / "refused"
    result = released.ws.doit("release", check=False, SEQ_LEN=SEQ_LEN, REPORT=str(tmp_path / "none.json"),
                              RELEASE_DIR=str(release_dir))
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("qwen3build:")]
    assert len(lines) == 1 and "release refused: no verify report" in lines[0] and "RELEASE_UNVERIFIED=1" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not release_dir.exists()


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["inputs"]["packages"].update({"shard:mid": "0" * 32}),
     r"measured other packages \(shard:mid differ\)"),
    (lambda r: r.update(passed=False, failures=["packages: top-1 0.9 < 1.0"]), "failed its gate"),
    (lambda r: r["rungs"].pop("packages"), "no packages rung"),
])
def test_release_with_a_report_not_vouching_for_these_packages_is_refused(released, tmp_path, edit, match):
    report = json.loads(released.report_path().read_text())
    edit(report)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    release_dir = tmp_path / "refused"
    with pytest.raises(BuildError, match=match) as info:
        make_release(released.plan(), released.request(REPORT=str(other), RELEASE_DIR=str(release_dir)))
    assert "\n" not in str(info.value)
    assert not release_dir.exists()


def test_unverified_release_says_so_at_the_top(released, tmp_path):
    result = make_release(released.plan(), released.request(
        REPORT=str(tmp_path / "none.json"), RELEASE_DIR=str(tmp_path / "rel"), RELEASE_UNVERIFIED="1"))
    text = _card(result.destination)
    top = text.split("\n## ", 1)[0]
    assert "**These packages were not verified.**" in top and "RELEASE_UNVERIFIED=1" in top
    assert "Not measured: these packages have no passing verify report" in text
    assert "| `packages` |" not in text.split("## Parity", 1)[1].split("## Audit", 1)[0]
    assert json.loads((result.destination / "stack.json").read_text())["release"]["verified"] is False
    assert any("RELEASE_UNVERIFIED" in w for w in result.warnings)
    assert str(tmp_path) not in text                           # the report's path is not in the card


def test_unsafe_release_dirs_and_variables_are_refused(released, tmp_path):
    plan = released.plan()
    inside = released.ws.out_dir.resolve() / "release"
    for release_dir, match in ((inside, "lies inside (the published generations|OUT_DIR)"),
                               (released.ws.root / "artifacts" / ".generations" / "x", "lies inside the published"),
                               (released.checkpoint / "release", "lies inside the checkpoint folder")):
        with pytest.raises(BuildError, match=match):
            make_release(plan, released.request(RELEASE_DIR=str(release_dir)))
        assert not release_dir.exists()
    occupied = tmp_path / "occupied" / "qwen3-tiny-fp16-s64"
    occupied.mkdir(parents=True)
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(BuildError, match="is not a qwen3build release"):
        make_release(plan, released.request(RELEASE_DIR=str(occupied.parent)))
    assert (occupied / "notes.txt").read_text() == "mine"
    for variables, match in (({"BASE_MODEL": "/home/me/Qwen3-1.7B"}, "not a Hugging Face model id"),
                             ({"RELEASE_UNVERIFIED": "maybe"}, "is not a flag"),
                             ({"RELEASE_DIRS": "x"}, "unknown release variable")):
        with pytest.raises(BuildError, match=match) as info:
            released.request(**variables)
        assert "\n" not in str(info.value)


@pytest.mark.skipif(sys.platform == "darwin", reason="the compiled form is made on macOS (test below)")
def test_compiled_form_is_refused_off_macos(released, tmp_path):
    with pytest.raises(BuildError, match="RELEASE_COMPILED=1 needs macOS"):
        make_release(released.plan(), released.request(RELEASE_DIR=str(tmp_path / "rel"), RELEASE_COMPILED="1"))
    assert not (tmp_path / "rel").exists()


@pytest.mark.skipif(sys.platform != "darwin" or shutil.which("xcrun") is None,
                    reason="xcrun coremlcompiler (macOS with Xcode tools) compiles .mlmodelc")
def test_compiled_form_on_macos(released, tmp_path):
    result = make_release(released.plan(), released.request(RELEASE_DIR=str(tmp_path / "rel"), RELEASE_COMPILED="1"))
    for package in PACKAGES:
        compiled = result.destination / f"{package.removesuffix('.mlpackage')}.mlmodelc.zip"
        with zipfile.ZipFile(compiled) as archive:
            assert archive.namelist()[0] == f"{package.removesuffix('.mlpackage')}.mlmodelc/"
    assert subprocess.run(["shasum", "-a", "256", "-c", "SHA256SUMS"], cwd=result.destination,
                          capture_output=True).returncode == 0


# ---------------------------------------------------------------- licence

def test_missing_license_warns_and_the_card_says_so(released, tmp_path, caplog):
    """Another tree, from a copy of the checkpoint without licence files: its packages come
    from the shared cache with the same keys, so the first tree's verify report vouches for
    them (reports are matched by package keys, not paths)."""
    from qwen3build.audit.options import request_from_vars as audit_request
    from qwen3build.audit.run import run_audit
    from qwen3build.build.actions import Builder
    config = _copy_checkpoint(tmp_path / "unlicensed" / "qwen3-tiny", licensed=False)
    ws = DoitWorkspace(tmp_path / "ws", config)
    settings = {**ws.paths(), "SEQ_LEN": SEQ_LEN, "CACHE_DIR": str(released.ws.root / "cache")}
    builder = Builder(make_plan(settings, environ={}))
    builder.weights()
    builder.publish()
    run_audit(builder.tree.out_dir, audit_request(builder.tree, {}, environ={}))
    request = request_from_vars(builder.tree, {"REPORT": str(released.report_path())}, environ={})
    with caplog.at_level("WARNING", logger="qwen3build.release"):
        result = make_release(builder.plan, request)
    assert not any(name.startswith(("LICENSE", "NOTICE")) for name in result.files)
    assert any("has no LICENSE or NOTICE file" in w for w in result.warnings)
    assert any("has no LICENSE or NOTICE file" in r.getMessage() for r in caplog.records)
    text = _card(result.destination)
    assert text.startswith("---\nlicense: unknown\n")
    assert "**The checkpoint has no LICENSE or NOTICE file, and this release ships none.**" in text
    assert result.verified


# ---------------------------------------------------------------- no leaks, checkable, runnable

def _bundle_contents(destination: Path):
    """(where, bytes) of every file of the bundle and of every entry inside its zips."""
    for path in sorted(destination.iterdir()):
        data = path.read_bytes()
        yield path.name, data
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                for entry in archive.infolist():
                    yield f"{path.name}:{entry.filename} (name)", entry.filename.encode()
                    yield f"{path.name}:{entry.filename}", archive.read(entry)


def test_no_path_user_name_or_cache_key_in_the_bundle(released):
    published = json.loads((released.ws.out_dir / "stack.json").read_text())
    report = json.loads(released.report_path().read_text())
    audit = json.loads((released.ws.root / "artifacts" / "audit" / "audit.json").read_text())
    needles = {str(REPO): "repo path", str(released.ws.root): "workspace (tmp) path",
               str(released.checkpoint): "checkpoint path", str(released.ws.root / "cache"): "cache dir",
               str(Path.home()).rstrip("/") + "/": "home dir", f"/{getpass.getuser()}/": "user name",
               released.ws.out_dir.resolve().parent.name: "generation id",
               report["key"]: "verify key", audit["key"]: "audit key"}
    needles.update({key: f"cache key of {artifact}" for artifact, key in published["keys"].items()})
    record = json.loads(next((released.ws.root / "artifacts" / ".state").glob("release-*.json")).read_text())
    needles[record["key"]] = "release key"
    checked = 0
    for where, data in _bundle_contents(released.destination):
        for needle, what in needles.items():
            assert needle.encode() not in data, f"{where} holds the {what} {needle}"
        checked += 1
    assert checked > len(PACKAGES) * 4


def test_sha256sums_check_with_sha256sum(released, tmp_path):
    tool = shutil.which("sha256sum")
    command = [tool, "-c", "SHA256SUMS"] if tool else [shutil.which("shasum"), "-a", "256", "-c", "SHA256SUMS"]
    if command[0] is None:
        pytest.skip("neither sha256sum nor shasum is installed")
    sums = (released.destination / "SHA256SUMS").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in sums) == sorted(
        p.name for p in released.destination.iterdir() if p.name != "SHA256SUMS")
    assert subprocess.run(command, cwd=released.destination, capture_output=True).returncode == 0
    tampered = shutil.copytree(released.destination, tmp_path / "tampered")
    (tampered / "config.json").write_text("{}")
    assert subprocess.run(command, cwd=tampered, capture_output=True).returncode != 0


def _run(models_dir: Path, backend: str, capsys) -> tuple[int, str, str]:
    from qwen3build.cli import main
    code = main(["run", "--models-dir", str(models_dir), "--prompt", "def fibonacci(n):",
                 "--max-new-tokens", str(RUN_TOKENS), "--backend", backend])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_unzipped_release_runs_like_the_build(released, tmp_path, capsys):
    unzipped = _unzip_release(released.destination, tmp_path / "qwen3-tiny-fp16-s64")
    code, from_release, err = _run(unzipped, "evaluator", capsys)
    assert code == 0, err
    code, from_build, err = _run(released.ws.out_dir, "evaluator", capsys)
    assert code == 0, err
    assert from_release == from_build and from_release.strip()      # greedy: the same text
    code, _, err = _run(unzipped, "torch", capsys)                  # no weights, scales or packs shipped
    assert code == 2 and len(err.strip().splitlines()) == 1 and "torch backend" in err
    code, _, err = _run(released.destination, "evaluator", capsys)  # still zipped
    assert code == 2 and "unzip the release's packages first" in err


def test_verify_measures_the_unzipped_release(released, tmp_path, capsys):
    """MODELS_DIR=<unzipped release>: the oracle on the checkpoint, the packages rung on the
    release's packages (the reference rung needs the build's scales and packs: refused)."""
    from qwen3build.verify.__main__ import main as verify_main
    unzipped = _unzip_release(released.destination, tmp_path / "qwen3-tiny-fp16-s64")
    settings = [f"{k}={v}" for k, v in released.settings().items()]
    small = [f"{k}={v}" for k, v in SMALL_VERIFY.items()]
    report_path = tmp_path / "bundle.json"
    assert verify_main(settings + small + [f"MODELS_DIR={unzipped}", f"REPORT={report_path}"]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "is a release" in out
    report = json.loads(report_path.read_text())
    assert list(report["rungs"]) == ["packages"] and report["options"]["models_dir"] == str(unzipped)
    assert verify_main(settings + small + [f"MODELS_DIR={unzipped}", "RUNGS=reference,packages"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a release" in err and "RUNGS=packages" in err and "\n" not in err
    (unzipped / "config.json").write_text((unzipped / "config.json").read_text().replace("\n", "\n "))
    assert verify_main(settings + small + [f"MODELS_DIR={unzipped}"]) == 2
    assert "point CONFIG at the config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_doit_verify_on_the_unzipped_release(released, tmp_path):
    unzipped = _unzip_release(released.destination, tmp_path / "qwen3-tiny-fp16-s64")
    result = released.ws.doit("verify", SEQ_LEN=SEQ_LEN, MODELS_DIR=str(unzipped), **SMALL_VERIFY)
    assert "PASSED" in result.stdout
    report = released.ws.root / "artifacts" / "verify" / "fp16-heldout_code-qwen3-tiny-fp16-s64.json"
    assert json.loads(report.read_text())["passed"] is True
    assert json.loads(released.report_path().read_text())["inputs"]["packages"]  # the build's report is kept


# ---------------------------------------------------------------- pieces

def test_base_model_names_the_folder_and_the_card(released):
    inputs = gather(released.plan(), released.request(BASE_MODEL="Qwen/Qwen3-1.7B"))
    assert inputs.folder_name == "Qwen3-1.7B-fp16-s64"
    assert 'base_model: "Qwen/Qwen3-1.7B"' in card.front_matter(inputs)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", bundle.bundle_stack(inputs, {}, {})["release"]["packages"]
                        ["io_model.mlpackage"]["zip"])


def test_zip_tree_is_byte_identical_across_mtimes_and_keeps_empty_folders(tmp_path):
    root = tmp_path / "x.mlpackage"
    (root / "Data" / "empty").mkdir(parents=True)
    (root / "Data" / "b.bin").write_bytes(os.urandom(1000))
    (root / "Manifest.json").write_text("{}")
    zip_tree(root, tmp_path / "one.zip")
    os.utime(root / "Manifest.json", (1, 1))
    (root / "Data" / "b.bin").chmod(0o600)
    zip_tree(root, tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "one.zip") as archive:
        assert "x.mlpackage/Data/empty/" in archive.namelist()
        archive.extractall(tmp_path / "out")
    assert (tmp_path / "out" / "x.mlpackage" / "Data" / "empty").is_dir()


def test_leak_check_refuses_paths_and_keys_inside_files_and_zips(tmp_path):
    needles = bundle.Needles(paths={b"/work/build-machine/repo": "a path of this machine (the repository)"},
                             personal={b"/alice/": "the user name 'alice' in a path"},
                             keys={b"0123456789abcdef0123456789abcdef": "the cache key of shard:left"})
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "tokenizer.json").write_text('{"vocab": {"/alice/": 7}}')     # copied: a token, not a leak
    (stage / "README.md").write_text("clean")
    bundle.check_no_leaks(stage, {"tokenizer.json"}, needles)
    (stage / "config.json").write_text('{"_name_or_path": "/work/build-machine/repo/ckpt"}')
    with pytest.raises(BuildError, match=r"config.json would carry a path of this machine .*checkpoint's file"):
        bundle.check_no_leaks(stage, {"tokenizer.json", "config.json"}, needles)
    (stage / "config.json").unlink()
    (stage / "README.md").write_text("see /home/alice/notes")
    with pytest.raises(BuildError, match="README.md would carry the user name"):
        bundle.check_no_leaks(stage, {"tokenizer.json"}, needles)
    (stage / "README.md").write_text("clean")
    package = tmp_path / "x.mlpackage"
    package.mkdir()
    (package / "Manifest.json").write_text('{"id": "0123456789abcdef0123456789abcdef"}')
    zip_tree(package, stage / "x.mlpackage.zip")
    with pytest.raises(BuildError, match=r"x.mlpackage.zip would carry the cache key of shard:left, in "
                                         r"x.mlpackage/Manifest.json") as info:
        bundle.check_no_leaks(stage, {"tokenizer.json"}, needles)
    assert "\n" not in str(info.value)
