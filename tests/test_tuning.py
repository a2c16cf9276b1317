"""The machine's thread policy (runtime/tuning.py): measured once, cached, applied by load(), overridable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xmtf_onnx.runtime import ConfigurationError, load, tuning

TIMINGS = {"spin-then-stop": 10.0, "no-spin": 9.0, "spin": 30.0, "one-thread": 12.0}


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no choice remembered by this process."""
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.ENV_POLICY, raising=False)
    monkeypatch.setattr(tuning, "_chosen", {})
    return tmp_path / "cache"


def test_the_first_policy_stays_unless_another_is_clearly_faster():
    assert tuning.choose(TIMINGS) is tuning.DEFAULT  # no-spin 10% faster: within the margin
    assert tuning.choose({**TIMINGS, "one-thread": 7.9}).name == "one-thread"  # 21% faster
    assert tuning.choose({**TIMINGS, "spin-then-stop": 31.0}).name == "no-spin"


def test_a_real_measurement_is_cached_and_read_back(fresh, monkeypatch):
    policy, record = tuning.policy_and_record()
    assert record["source"] == "measured" and set(record["ms_per_step"]) == set(tuning.BY_NAME)
    assert all(np.isfinite(v) and v > 0 for v in record["ms_per_step"].values())
    assert policy is tuning.choose(record["ms_per_step"])
    saved = json.loads(open(record["file"], encoding="utf-8").read())
    assert saved["policy"] == policy.name and saved["machine"] == tuning.machine()
    assert oct(os.stat(record["file"]).st_mode & 0o777) == "0o644"

    monkeypatch.setattr(tuning, "_chosen", {})  # a new process: reads the file, measures nothing
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured again"))
    again, record = tuning.policy_and_record()
    assert again is policy and record["source"] == "cache"


def test_a_corrupted_cache_is_measured_again(fresh, monkeypatch):
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: dict(TIMINGS, **{"one-thread": 5.0}))
    fresh.mkdir()
    path = tuning.cache_file()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write('{"policy": "warp-speed"')
    policy, record = tuning.policy_and_record()
    assert policy.name == "one-thread" and record["source"] == "measured"
    assert json.loads(open(path, encoding="utf-8").read())["policy"] == "one-thread"


def test_an_unwritable_cache_still_gives_a_policy(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(tuning.ENV_CACHE, str(blocker / "cache"))
    monkeypatch.delenv(tuning.ENV_POLICY, raising=False)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: TIMINGS)
    policy, record = tuning.policy_and_record()
    assert policy is tuning.DEFAULT and "not cached" in record["note"]


def test_the_environment_forces_or_fixes_a_policy(fresh, monkeypatch, mt5_export):
    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured although fixed or forced"))
    monkeypatch.setenv(tuning.ENV_POLICY, "fixed")
    assert tuning.machine_policy() is tuning.DEFAULT
    monkeypatch.setenv(tuning.ENV_POLICY, "one-thread")
    model = load(mt5_export, verify=False)
    assert model.thread_policy.name == "one-thread"
    assert {s.get_session_options().intra_op_num_threads for s in model.sessions.values()} == {1}
    assert load(mt5_export, verify=False, threads=2).sessions["decoder"].get_session_options().intra_op_num_threads == 2
    monkeypatch.setenv(tuning.ENV_POLICY, "warp-speed")
    with pytest.raises(ConfigurationError, match="XMTF_ONNX_THREAD_POLICY='warp-speed' is not a thread policy"):
        load(mt5_export, verify=False)
    assert not fresh.exists()  # nothing measured, nothing written


def test_caller_session_options_are_not_tuned(fresh, monkeypatch, mt5_export):
    import onnxruntime as ort

    monkeypatch.setattr(tuning, "measure", lambda *a, **k: pytest.fail("measured for caller-made options"))
    model = load(mt5_export, verify=False, session_options=ort.SessionOptions())
    assert model.thread_policy is tuning.DEFAULT


def test_processes_started_together_measure_once(fresh):
    code = ("from xmtf_onnx.runtime import tuning; p, r = tuning.policy_and_record(); "
            "print(r['source'], p.name)")
    env = dict(os.environ, **{tuning.ENV_CACHE: str(fresh)})
    children = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(2)]
    outputs = [child.communicate(timeout=120)[0].split() for child in children]
    assert sorted(source for source, _ in outputs) == ["cache", "measured"]
    assert outputs[0][1] == outputs[1][1]


def test_small_models_carry_their_weights():
    from xmtf_onnx.runtime.session import FLOAT, small_model, small_session

    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    model = small_model([("MatMul", ["x", "w"], ["y"], {}), ("Relu", ["y"], ["z"], {})], [("x", FLOAT)],
                        [("z", FLOAT)], {"w": weight})
    x = np.array([[1.0, -2.0, 0.5]], np.float32)
    np.testing.assert_array_equal(small_session(model).run(None, {"x": x})[0], np.maximum(x @ weight, 0))


def test_tune_command_reports_the_choice(fresh, monkeypatch, capsys):
    from xmtf_onnx.runtime.cli import main

    monkeypatch.setattr(tuning, "measure", lambda *a, **k: TIMINGS)
    assert main(["tune"]) == 0
    out = capsys.readouterr().out
    assert "thread policy: spin-then-stop" in out and "no-spin" in out and "9.00 ms" in out
    monkeypatch.setattr(tuning, "_chosen", {})  # as a later command would: from the file
    assert main(["tune", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "cache"
    monkeypatch.setenv(tuning.ENV_POLICY, "nonsense")
    assert main(["tune"]) == 1
    assert "is not a thread policy" in capsys.readouterr().err
