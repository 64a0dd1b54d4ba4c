"""The command line explains itself: every command and flag has help, and --version works."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from mpsserve import __version__
from mpsserve.ops import cli


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mpsserve {__version__}"


def test_help_lists_every_command_with_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli._parser()
    assert set(subparsers(parser)) == set(cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Commands that need Ray" not in out  # the module docstring is not the help
    for name in cli.COMMANDS:
        assert f"    {name}" in out, name


def test_every_command_and_flag_has_help() -> None:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    missing: list[str] = []
    for name, sub in subparsers(parser).items():
        if not helps.get(name):
            missing.append(name)
        for arg in sub._actions:
            if not arg.help or not arg.help.strip():
                missing.append(f"{name} {'/'.join(arg.option_strings) or arg.dest}")
            elif arg.default not in (None, False, argparse.SUPPRESS) and not arg.required:
                # the default is said, in the help's own words or by %(default)s
                assert "default" in arg.help, f"{name} {arg.option_strings}: {arg.help}"
    assert not missing, missing


@pytest.mark.parametrize(("mode", "code"), [("off", 0), ("auto", 0), ("on", 1)])
def test_doctor_exit_code_follows_the_mode_on_a_node_without_gpus(
    mode: str,
    code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mpsserve.node import doctor
    from mpsserve.node.gpu import Inventory

    monkeypatch.setattr(doctor, "inventory", lambda: Inventory(error="no driver"))
    mps = {"mode": mode, "pipe_dir": str(tmp_path / "pipe"), "control_binary": "no-such-binary"}
    config = {"models": [{"name": "rec", "store": str(tmp_path)}], "mps": mps}
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["doctor", "--config", str(tmp_path / "service.yaml")]) == code
    out = capsys.readouterr().out
    assert "GPUs: no NVIDIA GPU visible (no driver)" in out  # the facts, in every mode
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith(
        {"off": "MPS is not used", "auto": "MPS is skipped", "on": "MPS cannot work here"}[mode]
    )
