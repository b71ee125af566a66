"""`gradclip-hf report` on a folder someone else wrote (issue 22.2): every file in it is untrusted.

Built here, in ``tmp_path``: a planted symlink where the chart goes, terminal escape sequences in every string a
file can hold, hostile ``training_args.bin`` files (a zip bomb, a lying size, an encrypted entry, compression
method 99, 400- and 5000-digit integers), JSON nested too deeply, callback entries of the wrong shape. Each
gives the report with a warning, or exit status 2 with a message; never a traceback, never a file written
outside the chart's own path.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import tracemalloc
import zipfile

import pytest

from gradclip_hf.cli import main
from gradclip_hf import spikefile
from gradclip_hf.report import build_report
from gradclip_hf.report.load import SPIKE_FILE
from gradclip_hf.report.training_args import MAX_BYTES, read_max_grad_norm
from test_report import PNG, pack_history, ramp, stock_history, write_run

ESC = "\x1b"


def _report(capsys, *argv):
    """``gradclip-hf report ARGV``: (exit status, stdout, stderr); an exception other than SystemExit fails."""
    try:
        code = main(["report", *argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- the chart: never through a planted link
def test_a_planted_symlink_at_the_chart_path_is_replaced_and_its_target_untouched(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, run / "gradclip_report.png")
    code, out, _ = _report(capsys, str(run))
    assert code == 0 and victim.read_text() == "precious"
    chart = run / "gradclip_report.png"
    assert not chart.is_symlink() and chart.read_bytes()[:8] == PNG
    assert sorted(os.listdir(run)) == ["gradclip_report.png", "trainer_state.json"]  # no temporary file left
    os.symlink(victim, tmp_path / "link.png")  # --png at a link: the same
    assert _report(capsys, str(run), "--png", str(tmp_path / "link.png"))[0] == 0
    assert victim.read_text() == "precious" and (tmp_path / "link.png").read_bytes()[:8] == PNG


def test_a_chart_path_that_cannot_be_written_exits_2_and_leaves_what_was_there(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)))
    (tmp_path / "folder.png").mkdir()
    code, _, err = _report(capsys, str(run), "--png", str(tmp_path / "folder.png"))
    assert code == 2 and "cannot write the chart" in err
    assert (tmp_path / "folder.png").is_dir() and os.listdir(tmp_path / "folder.png") == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".gradclip_report")]


# ---------------------------------------------------------------- strings from files: escaped for the terminal
HOSTILE = {"event": f"spike{ESC}[2J", "kind": f"loss{ESC}]0;pwned\x07", "action": "\u202eskip",
           "layer": f"lm_head{ESC}[31m", "fingerprint": f"ab{ESC}[1A", "stop": f"stopped{ESC}[2K\nfake line",
           "text": f"x{ESC}[5m", "strategy": f"zscore{ESC}[8m"}


def test_every_string_from_a_file_is_escaped_for_the_terminal(tmp_path, capsys):
    history = pack_history(ramp(30, 0.2, 3.0), spikes=[0] * 29 + [1])
    history.append({"step": 30, "gradclip/stop_reason": HOSTILE["stop"]})
    line = {"event": HOSTILE["event"], "step": 30, "kind": HOSTILE["kind"], "action": HOSTILE["action"],
            "loss": 7.0, "top_layers": [[HOSTILE["layer"], 2.0]],
            "batch": {"indices": [[[1, 2]]], "fingerprint": HOSTILE["fingerprint"], "text": HOSTILE["text"]}}
    stop = {"event": "stop", "step": 30, "kind": HOSTILE["kind"]}
    run = write_run(tmp_path / "run", history, strategy=HOSTILE["strategy"],
                    spike_lines=[json.dumps(line), json.dumps(stop)])
    code, out, err = _report(capsys, str(run), "--no-png")
    assert code == 0
    for char in (ESC, "\x07", "\u202e"):
        assert char not in out + err
    assert "\nfake line" not in out and "stopped\\x1b[2K\\nfake line" in out  # one line, escaped
    for shown in ("spike\\x1b[2J", "loss\\x1b]0;pwned\\x07", "\\u202eskip", "lm_head\\x1b[31m", "ab\\x1b[1A",
                  "zscore\\x1b[8m"):
        assert shown in out, shown
    data = json.loads(_report(capsys, str(run), "--no-png", "--json")[1])  # JSON keeps the strings, escaped by JSON
    assert data["spikes"]["events"][0]["event"] == HOSTILE["event"]


# ---------------------------------------------------------------- training_args.bin: capped, never a traceback
def _zip(path, data: bytes, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data)
    return path


def _patch(path, local: dict, central: dict):
    """Overwrite header fields of the only entry (``{offset: struct format and value}``) in both headers."""
    raw = bytearray(path.read_bytes())
    for signature, fields in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        at = raw.index(signature)
        for offset, (fmt, value) in fields.items():
            struct.pack_into(fmt, raw, at + offset, value)
    path.write_bytes(bytes(raw))
    return path


class _Args:
    pass


def _args_pickle(value) -> bytes:
    args = _Args()
    args.max_grad_norm = value
    return pickle.dumps(args, protocol=2)


def _stock_run(tmp_path):
    return write_run(tmp_path / "run", stock_history(ramp(20, 0.2, 0.4)))


def test_a_zip_bomb_is_refused_before_it_inflates(tmp_path):
    bomb = _zip(tmp_path / "training_args.bin", b"\0" * (64 * 1024 * 1024))
    assert os.path.getsize(bomb) < 256 * 1024  # a ratio above 250
    liar = _patch(_zip(tmp_path / "liar.bin", b"\0" * (64 * 1024 * 1024)), {22: ("<I", 100)}, {24: ("<I", 100)})
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"its pickle inflates to 67,108,864 bytes, more than the 4,194,304 read"):
            read_max_grad_norm(str(bomb))
        with pytest.raises(ValueError, match="cannot read .*liar.bin"):  # claims 100 bytes: no more are inflated
            read_max_grad_norm(str(liar))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_BYTES  # the 64 MB were never inflated


@pytest.mark.parametrize("make, why", [
    (lambda p: _patch(_zip(p, _args_pickle(0.5)), {6: ("<H", 1)}, {8: ("<H", 1)}), "encrypted"),
    (lambda p: _patch(_zip(p, _args_pickle(0.5), zipfile.ZIP_STORED), {8: ("<H", 99)}, {10: ("<H", 99)}),
     "compression method"),
    (lambda p: _zip(p, _args_pickle(10**400)), "OverflowError"),
    (lambda p: _zip(p, b"I" + b"1" * 5000 + b"\n."), "ValueError"),
    (lambda p: p.write_bytes(b"\0" * (MAX_BYTES + 1)), "more than the 4,194,304 read"),
    (lambda p: _zip(p, b"\x80\x02" + b"(" * 100_000 + b"."), "cannot read"),
])
def test_hostile_training_args_give_the_documented_warning_and_the_default(tmp_path, make, why, capsys):
    run = _stock_run(tmp_path)
    make(run / "training_args.bin")
    r = build_report(str(run))
    assert r["threshold"]["value"] == 1.0 and r["threshold"]["source"].startswith("assumed: the Trainer default")
    warning = next(w for w in r["warnings"] if "training_args.bin" in w)
    assert warning.startswith(f"cannot read {str(run / 'training_args.bin')!r} as torch.save(TrainingArguments)")
    assert why in warning and len(warning) < 500
    assert _report(capsys, str(run), "--no-png")[0] == 0


# ---------------------------------------------------------------- JSON: nested, huge, the wrong shapes
def test_deeply_nested_trainer_state_exits_2_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text('{"log_history": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = _report(capsys, str(run), "--no-png")
    assert code == 2 and "trainer_state.json" in err and "nested too deeply" in err
    (run / "trainer_state.json").write_text('{"log_history": [], "global_step": ' + "9" * 5000 + "}")
    code, _, err = _report(capsys, str(run), "--no-png")
    assert code == 2 and "cannot read" in err and "Traceback" not in err


def test_hostile_spike_lines_are_skipped_with_a_warning_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(spikefile, "MAX_LINE", 300_000)
    deep_indices = {"event": "spike", "step": 3, "batch": {"indices": json.loads("[" * 200 + "]" * 200)}}
    lines = ["[" * 100_000 + "]" * 100_000,           # nested too deeply for the parser
             '{"step": ' + "9" * 5000 + "}",          # an int the parser refuses
             json.dumps({"event": "spike", "step": 2, "kind": "x" * 700_000}),  # longer than MAX_LINE
             json.dumps(deep_indices),                # parsed, but indices of no known shape: dropped
             json.dumps({"event": "spike", "step": 10**400, "loss": 10**400, "norm": -10**400})]
    run = write_run(tmp_path / "run", pack_history([0.5] * 12), spike_lines=lines)
    r = build_report(str(run))
    warnings = [w.split(f"{SPIKE_FILE}:", 1)[1] for w in r["warnings"]]
    assert warnings[0] == "1: JSON nested too deeply; line skipped"
    assert warnings[1].startswith("2: not readable JSON (Exceeds the limit (4300 digits)")
    assert warnings[2] == "3: longer than 300,000 characters; line skipped" and len(warnings) == 3
    events = r["spikes"]["events"]
    assert [e["step"] for e in events] == [3, None] and events[0]["indices"] is None
    assert events[1]["loss"] is None and events[1]["norm"] is None  # 10**400: no float
    for flag in ("--no-png", "--json"):
        assert _report(capsys, str(run), "--no-png", flag)[0] == 0


@pytest.mark.parametrize("entry", [{"args": "fresh"}, {"args": ["x"]}, "fresh", [7], {"run": 5, "args": None},
                                   {"args": {"config": "zscore"}}])
def test_a_callback_entry_of_the_wrong_shape_is_ignored(tmp_path, entry, capsys):
    run = write_run(tmp_path / "run", pack_history([0.5] * 12))
    state = json.loads((run / "trainer_state.json").read_text())
    state["stateful_callbacks"]["GradClipCallback"] = entry
    (run / "trainer_state.json").write_text(json.dumps(state))
    assert build_report(str(run))["run"]["strategy"] is None
    assert _report(capsys, str(run), "--no-png")[0] == 0


def test_numbers_too_large_for_a_float_are_not_numbers(tmp_path, capsys):
    history = pack_history([0.5] * 12)
    history[3]["grad_norm"] = 10**400
    history[4]["loss"] = -10**400
    history[5]["gradclip/threshold"] = 10**400
    run = write_run(tmp_path / "run", history)
    r = build_report(str(run))
    assert r["run"]["windows"] == 12 and r["norms"]["all"]["n"] == 11
    assert _report(capsys, str(run), "--no-png")[0] == 0 and math.isfinite(r["norms"]["all"]["max"])
