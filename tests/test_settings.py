"""The settings table (web/settings.py) is the one source of the CLI flags, their environment variables, the
defaults ``--help`` shows, the README's flag table and the config dataclasses' defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.gateway import GatewayConfig
from web import settings
from web.cli import build_parser, configs_from_args
from web.config import WebConfig

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for s in settings.SETTINGS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    return monkeypatch


def test_readme_flag_table_is_the_generated_one() -> None:
    text = README.read_text(encoding="utf-8")
    assert settings.replace_readme_table(text) == text, "run: python -m web.settings --write README.md"
    table = text[text.index(settings.README_BEGIN) : text.index(settings.README_END)]
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, re.M))
    assert documented == {s.flag for s in settings.SETTINGS}


def test_serve_without_flags_or_environment_gives_the_config_defaults(clean_env: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve"])
    gw, web = configs_from_args(args)
    assert gw == GatewayConfig()
    assert web == WebConfig()
    assert args.log_level == "INFO" and args.sim_step_ms == 100.0


def test_every_flag_reads_its_environment_variable(clean_env: pytest.MonkeyPatch) -> None:
    values = {"str": "x", "int": "7", "float": "2.5", "flag": "yes", "list": "http://a:1, http://b:2"}
    expected = {"str": "x", "int": 7, "float": 2.5, "flag": True, "list": ["http://a:1", "http://b:2"]}
    for s in settings.SETTINGS:
        if s.env and not s.choices:
            clean_env.setenv(s.env, values[s.kind])
    clean_env.setenv("GATEWAY_AUTH", "open")
    args = build_parser().parse_args(["serve"])
    for s in settings.SETTINGS:
        if s.env and not s.choices:
            assert getattr(args, s.dest) == expected[s.kind], s.flag
    assert args.auth == "open"


def test_a_flag_beats_its_environment_variable_and_a_repeated_url_replaces_the_default(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("GATEWAY_MAX_INFLIGHT", "5")
    clean_env.setenv("COMFYUI_URL", "http://env:1")
    args = build_parser().parse_args(
        ["serve", "--max-inflight", "3", "--comfyui", "http://a:1", "--comfyui", "http://b:2"]
    )
    assert args.max_inflight == 3
    assert args.comfyui == ["http://a:1", "http://b:2"]
    assert build_parser().parse_args(["serve"]).comfyui == ["http://env:1"]


def test_a_bad_environment_value_is_a_clear_usage_error(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("GATEWAY_MAX_INFLIGHT", "many")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve"])
    assert exc.value.code == 2
    assert "--max-inflight: invalid int value: 'many'" in capsys.readouterr().err


def test_help_shows_every_default_and_environment_variable(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "None" not in out
    assert "(env COMFYUI_URL, comma-separated; default: http://127.0.0.1:8188)" in out
    assert "(env GATEWAY_MAX_INFLIGHT; default: 2)" in out
    for s in settings.SETTINGS:
        if "serve" in s.commands:
            assert s.flag in out and (s.env is None or s.env in out), s.flag
