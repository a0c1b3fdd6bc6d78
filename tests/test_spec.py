"""model.yaml: every kind of bad input exits 2 with one located message and no traceback."""

import json

import pytest
from click.testing import CliRunner

from v4c.cli import main

GOOD = "model:\n  checkpoint: ./ckpt\ntarget: torch\npasses: []\n"

# name -> (model.yaml text, expected "line:col", a fragment of the message)
BAD = {
    "unknown_top_key": ("model:\n  checkpoint: ./ckpt\ntarjet: torch\n", "3:1", "unknown key 'tarjet' in the top level; "
                        "allowed: model, target, tune, tvm_target, passes, kv, calibration, report (did you mean 'target'?)"),
    "unknown_nested_key": ("model:\n  checkpoint: ./ckpt\n  layuot: hf\n", "3:3", "unknown key 'layuot' in model"),
    "missing_section": ("target: torch\n", "1:1", "model: required key is missing"),
    "missing_key": ("model: {}\n", "1:1", "model.checkpoint: required key is missing"),
    "section_not_mapping": ("model: ./ckpt\n", "1:8", "model: found './ckpt' (str); expected a mapping"),
    "bad_target": ("model:\n  checkpoint: ./ckpt\ntarget: cuda\n", "3:9", "target: found 'cuda' (str); expected one of 'torch'"),
    "passes_not_a_list": ("model:\n  checkpoint: ./ckpt\npasses: dce\n", "3:9", "passes: found 'dce' (str); expected a list"),
    "unknown_pass": ("model:\n  checkpoint: ./ckpt\npasses: [dse]\n", "3:10",
                     "unknown pass 'dse'; allowed: fp8, fuse, dce"),
    "calibrate_in_passes": ("model:\n  checkpoint: ./ckpt\npasses: [calibrate]\n", "3:10",
                            "'calibrate' runs from the `calibration:` section"),
    "bad_pass_entry": ("model:\n  checkpoint: ./ckpt\npasses: [3]\n", "3:10", "passes[0]: found 3 (int); expected a pass name"),
    "bad_pass_option": ("model:\n  checkpoint: ./ckpt\npasses:\n  - dce: {aggressive: true}\n", "4:11",
                        "passes[0].dce takes no key 'aggressive'"),
    "wrong_type": ("model:\n  checkpoint: ./ckpt\nkv:\n  max_context: lots\n", "4:16",
                   "kv.max_context: found 'lots' (str); expected an integer"),
    "out_of_range": ("model:\n  checkpoint: ./ckpt\nkv:\n  max_context: 0\n", "4:16", "expected a number >= 1"),
    "missing_path": ("model:\n  checkpoint: ./nowhere\n", "2:15", "model.checkpoint: './nowhere' resolves to"),
    "unreadable_yaml": ("model:\n  checkpoint: [./ckpt\n", "3:1", "invalid YAML: expected ',' or ']'"),
    "tab_indent": ("model:\n\tcheckpoint: ./ckpt\n", "2:1", "invalid YAML: found character '\\t'"),
    "duplicate_key": ("model:\n  checkpoint: ./ckpt\nmodel:\n  checkpoint: ./ckpt\n", "3:1", "duplicate key 'model'"),
    "not_a_mapping": ("- model\n", "1:1", "the spec must be a mapping"),
    "empty_file": ("", "1:1", "the spec must be a mapping"),
    "unknown_calibration_key": ("model:\n  checkpoint: ./ckpt\ncalibration:\n  data: ./ckpt\n  sample: 3\n", "5:3",
                                "unknown key 'sample' in calibration; allowed: data, samples"),
    "calibration_data_missing": ("model:\n  checkpoint: ./ckpt\ncalibration:\n  data: ./nope.txt\n", "4:9",
                                 "calibration.data: './nope.txt' resolves to"),
    "report_without_calibration": ("model:\n  checkpoint: ./ckpt\nreport:\n  thresholds: {max_kl: 0.1}\n", "3:1",
                                   "report: drift gates need calibration data"),
    "bad_threshold": ("model:\n  checkpoint: ./ckpt\ncalibration:\n  data: ./model.yaml\nreport:\n  thresholds:\n"
                      "    min_top1: 1.5\n", "7:15", "report.thresholds.min_top1: found 1.5 (float); expected a number <= 1"),
    "bad_fp8_option": ("model:\n  checkpoint: ./ckpt\npasses:\n  - fp8: {experts: fp6}\n", "4:20",
                       "passes[0].fp8.experts: found 'fp6' (str); expected one of 'fp8', 'fp4' or 'keep'"),
    "fuse_before_fp8": ("model:\n  checkpoint: ./ckpt\npasses:\n  - fuse\n  - fp8\n", "4:5",
                        "passes[0]: fuse rewrites the FP8 projections (linear_fp8) that the fp8 pass makes: list it "
                        "after fp8"),
    "fuse_without_dynamic_activations": ("model:\n  checkpoint: ./ckpt\npasses:\n  - fp8: {fake_quant: true}\n"
                                         "  - fuse\n", "5:5", "activations mode 'dynamic' with fake_quant: nothing "
                                         "would fuse"),
}


def _compile(tmp_path, text):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    spec = tmp_path / "model.yaml"
    spec.write_text(text)
    return CliRunner().invoke(main, ["compile", str(spec), "-o", str(tmp_path / "out")])


@pytest.mark.parametrize("case", BAD)
def test_bad_spec_exits_2_with_a_located_message(case, tmp_path):
    text, where, fragment = BAD[case]
    result = _compile(tmp_path, text)
    assert result.exit_code == 2, result.output
    assert f"model.yaml:{where}: error: " in result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_spec_file_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot read the spec" in result.output and "Traceback" not in result.output


def test_checkpoint_path_is_relative_to_the_spec(tmp_path):
    from v4c.spec import load_spec
    (tmp_path / "sub" / "ckpt").mkdir(parents=True)
    (tmp_path / "sub" / "model.yaml").write_text(GOOD)
    spec, ckpt = load_spec(tmp_path / "sub" / "model.yaml")
    assert ckpt == (tmp_path / "sub" / "ckpt").resolve() and spec.target == "torch" and spec.kv.max_context == 4096


def test_schema_is_published():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"model", "target", "tune", "tvm_target", "passes", "kv", "calibration", "report"}
    assert {"const": "dce", "description": "remove unused instructions, parameters and state slots"} in \
        schema["properties"]["passes"]["items"]["anyOf"]
