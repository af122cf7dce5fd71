"""`doit verify` end to end: the gate runs through doit, writes its report, and is keyed."""
import json

from conftest import REPO, DoitWorkspace

DEFAULT_CONFIG = REPO / "assets" / "qwen3-tiny" / "config.json"
SMALL = dict(SEQ_LEN="64", WINDOWS="64", MAX_WINDOWS="1", PACKAGE_POSITIONS="64", ROLLOUTS="1",
             ROLLOUT_TOKENS="8")


def test_doit_verify_passes_on_the_default_checkpoint_and_is_keyed(tmp_path):
    ws = DoitWorkspace(tmp_path, DEFAULT_CONFIG)
    report_path = tmp_path / "report.json"
    first = ws.doit("verify", REPORT=str(report_path), **SMALL)
    report = json.loads(report_path.read_text())
    assert report["passed"] is True, report["failures"]
    assert "packages" in first.stdout and "reference" in first.stdout  # the terminal table
    second = ws.doit("verify", REPORT=str(report_path), **SMALL)
    assert "-- verify" in second.stdout  # nothing changed: the passed report stands
    third = ws.doit("verify", REPORT=str(report_path), **{**SMALL, "ROLLOUTS": "2"})
    assert ".  verify" in third.stdout  # an option changed: it reruns
