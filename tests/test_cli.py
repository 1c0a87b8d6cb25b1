"""The CLI's import path stays light (no torch before a command needs it), fails loudly, and speaks plain text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import emorl.cli as cli

HEAVY = ("torch", "transformers", "peft", "matplotlib", "safetensors")
VERBS = ["train", "generate", "search", "evaluate", "run", "report", "front", "route", "serve", "config", "judge"]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_building_every_parser_imports_no_heavy_library():
    code = ("import sys, emorl.cli as c; c.build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


@pytest.mark.parametrize("argv", [["--help"], *[[v, "--help"] for v in VERBS], ["config", "--preset", "tiny"]])
def test_help_and_config_answer_without_torch(argv):
    code = ("import sys, runpy; sys.argv = ['emorl', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('emorl.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("HEAVY: []"), out.stdout[-300:]
    text = out.stdout
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_entry_point_sets_passive_waiting_unless_the_user_chose():
    code = "import emorl.cli, os; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(code).stdout.strip() == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE").stdout.strip() == "ACTIVE"


def test_a_subcommand_that_fails_to_import_fails_loudly(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", "emorl.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="emorl.no_such_module"):
        cli.build_parser()


def test_plain_strips_restructured_text():
    assert cli.plain("``emorl run``: see :func:`emorl.x` and **this**") == "emorl run: see emorl.x and this"


def test_threads_default_to_every_available_core():
    import torch

    from emorl.pipeline import available_cores, set_threads
    from emorl.utils import EmorlError

    before = torch.get_num_threads()
    try:
        assert set_threads(None) == available_cores() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == available_cores()
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(EmorlError, match="--threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_plain_progress_lines_where_stdout_is_not_a_terminal(capsys, monkeypatch):
    from emorl import progress as monitor

    now = [0.0]
    monkeypatch.setattr(monitor.time, "monotonic", lambda: now[0])
    bars = monitor.Progress(True, every=30, plain=True)
    with bars.run():
        bars.add("empathy", 8)
        for t, step in ((10, 1), (20, 2), (41, 3), (50, 4), (75, 5), (78, 6)):
            now[0] = t
            bars.update("empathy", step, f"reward 0.{step}")
        now[0] = 80  # the run ends: the last state, not printed yet, is printed
    assert capsys.readouterr().out.splitlines() == [
        "empathy: step 3/8 (38%) reward 0.3, elapsed 0m41s, ETA 1m08s",  # 3 steps in 41 s, 5 to go
        "empathy: step 5/8 (62%) reward 0.5, elapsed 1m15s, ETA 0m45s",  # 34 s after the last line
        "empathy: step 6/8 (75%) reward 0.6, elapsed 1m20s, ETA 0m27s",
    ]


def test_search_and_generate_bars_are_plain_lines_off_a_terminal(capsys, monkeypatch):
    """The search's and generate's bars: no carriage-return fragments in a log, one line per interval and the end."""
    from emorl import progress as monitor

    now = [0.0]
    monkeypatch.setattr(monitor.time, "monotonic", lambda: now[0])
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    bar = monitor.progress_bar(46, "search hidden", unit="pt")
    assert isinstance(bar, monitor.PlainBar)
    for t in (10, 20, 31, 40):
        now[0] = t
        bar.update(8)
        bar.set_postfix(best="0.8158", decoded=bar.n, refresh=False)
    bar.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines() == ["search hidden: step 24/46 (52%) best=0.8158 decoded=16, elapsed 0m31s, ETA 0m28s",
                                "search hidden: step 32/46 (70%) best=0.8158 decoded=32, elapsed 0m40s, ETA 0m18s"]


def test_plain_progress_prints_the_last_step_and_nothing_when_disabled(capsys):
    from emorl.train.monitor import Progress

    bars = Progress(True, every=1000, plain=True)
    with bars.run():
        bars.add("train", 2, completed=0)
        bars.update("train", 1, "")
        bars.update("train", 2, "val 0.5")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("train: step 2/2 (100%) val 0.5, elapsed ") and "ETA" not in out[0]
    off = Progress(False, every=0, plain=True)
    with off.run():
        off.add("x", 3)
        off.update("x", 1, "")
    assert capsys.readouterr().out == ""


def test_generate_reads_a_negative_weight_vector_as_weights_not_an_option():
    """`--weights -1,0,0` reaches the weight check (which then names the negative weight) instead of argparse's
    "expected one argument"; plain options still parse as options."""
    from emorl.generate_cli import parse_weights

    args = cli.build_parser().parse_args(["generate", "--run", "R", "--weights", "-1,0,0", "--weights", "-0.5,1e-3,2",
                                          "--prompt", "x", "--seed", "-3"])
    assert args.weights == ["-1,0,0", "-0.5,1e-3,2"] and args.seed == -3
    assert parse_weights(args.weights) == [[-1.0, 0.0, 0.0], [-0.5, 0.001, 2.0]]
    with pytest.raises(SystemExit):  # a real option after --weights is still an option, not a value
        cli.build_parser().parse_args(["generate", "--run", "R", "--weights", "--prompt", "x"])


def _console_handler(stream):
    import logging

    h = logging.StreamHandler(stream)
    h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(h)
    return h


def test_log_lines_print_above_rich_bars_not_through_them(monkeypatch):
    """On a terminal the rich bars own the screen: a log line goes through their console (printed above the bars),
    not straight to stderr in the middle of a bar; the handler's stream is restored afterwards."""
    import io
    import logging

    from rich.console import Console

    from emorl import progress, utils

    screen = io.StringIO()
    monkeypatch.setattr(utils, "_CONSOLE", Console(file=screen, force_terminal=True, width=100))
    err = sys.stderr
    handler = _console_handler(err)
    try:
        bars = progress.Progress(True, plain=False)
        with bars.run():
            bars.add("train", 4)
            assert handler.stream is not err  # routed through the live display while it runs
            logging.getLogger("emorl.test").warning("a log line during the bars")
            bars.update("train", 2, "")
        assert handler.stream is err
    finally:
        logging.getLogger().removeHandler(handler)
    import re

    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).strip() for line in screen.getvalue().splitlines()]
    # rich prints it on a line of its own, above the live region (no bar text on that line)
    assert "WARNING a log line during the bars" in lines, lines


def test_log_lines_go_through_tqdm_write_while_a_bar_is_open(monkeypatch):
    """progress_bar on a terminal: while the bar is open the console handler is tqdm's (tqdm.write clears the bar,
    prints the line, redraws the bar); the original handler is back after close()."""
    import logging

    from emorl.progress import progress_bar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    handler = _console_handler(sys.stderr)
    try:
        bar = progress_bar(3, "decode")
        routed = [h for h in logging.getLogger().handlers if type(h).__name__ == "_TqdmLoggingHandler"]
        assert len(routed) == 1 and handler not in logging.getLogger().handlers
        bar.update(1)
        bar.close()
        bar.close()  # closing twice (tqdm's __del__ closes too) restores once
        assert handler in logging.getLogger().handlers
        assert not [h for h in logging.getLogger().handlers if type(h).__name__ == "_TqdmLoggingHandler"]
    finally:
        logging.getLogger().removeHandler(handler)


def test_third_party_warnings_go_to_the_log_file_not_the_console(tmp_path, capsys):
    import logging
    import warnings

    from emorl.utils import attach_log_file

    saved = warnings.showwarning
    try:
        cli.setup_logging(verbose=False)
        path = attach_log_file(tmp_path / "logs" / "run.log")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = cli._warning_to_log
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("emorl.test").info("a line for the console")
        for h in logging.getLogger("emorl").handlers:
            h.flush()
        err = capsys.readouterr().err
        assert "is_gradient_checkpointing" not in err and "a line for the console" in err
        text = path.read_text()
        assert "DEBUG emorl.thirdparty: FutureWarning: `is_gradient_checkpointing` is deprecated" in text
        assert "INFO emorl.test: a line for the console" in text
    finally:
        warnings.showwarning = saved
        for h in list(logging.getLogger("emorl").handlers):
            if isinstance(h, logging.FileHandler) and h.baseFilename == str(path):
                logging.getLogger("emorl").removeHandler(h)
                h.close()
        logging.getLogger().removeHandler(cli._console_handler)
