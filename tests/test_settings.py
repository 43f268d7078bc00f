"""Node settings: defaults, precedence (flag > environment > node.yaml > default), errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from edgeos.errors import ConfigError
from edgeos.settings import NODE_SETTINGS, NodeSettings, load_settings, settings_markdown

REPO = Path(__file__).parents[1]


def load(
    data_dir: Path, yaml_text: str | None = None, env: dict[str, str] | None = None, **flags: Any
) -> NodeSettings:
    """Settings for a node whose data directory is ``data_dir`` (given by environment)."""
    if yaml_text is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "node.yaml").write_text(yaml_text, encoding="utf-8")
    return load_settings(flags, environ={"EDGEOS_DATA_DIR": str(data_dir), **(env or {})})


def test_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.data_dir == tmp_path
    assert settings.database_path == tmp_path / "node.db"
    assert settings.model_store == tmp_path / "models"
    assert (settings.host, settings.port) == ("127.0.0.1", 8470)
    assert (settings.intra_op_threads, settings.inter_op_threads) == (1, 1)
    assert settings.inference_threads == (os.cpu_count() or 1)  # 0 means one per core
    assert settings.execution_providers == ("CPUExecutionProvider",)
    assert settings.allow_spinning is False
    assert settings.model_memory_budget_mb == 512
    assert settings.log_level == "info"


def test_every_setting_is_a_field_and_every_field_a_setting() -> None:
    assert [s.name for s in NODE_SETTINGS] == list(NodeSettings.__dataclass_fields__)


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        pytest.param(9001, "9002", 9003, 9001, id="flag-wins"),
        pytest.param(None, "9002", 9003, 9002, id="env-beats-file"),
        pytest.param(None, None, 9003, 9003, id="file-beats-default"),
        pytest.param(None, None, None, 8470, id="default"),
    ],
)
def test_precedence(
    tmp_path: Path, flag: int | None, env: str | None, file: int | None, expected: int
) -> None:
    """A flag of None is an option the user did not give, as the CLI passes it."""
    settings = load(
        tmp_path,
        yaml_text=f"port: {file}\n" if file is not None else None,
        env={"EDGEOS_PORT": env} if env is not None else None,
        port=flag,
    )
    assert settings.port == expected


def test_each_setting_is_taken_from_its_own_source(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        yaml_text="host: 0.0.0.0\nlog_level: debug\nallow_spinning: yes\n",
        env={"EDGEOS_LOG_LEVEL": "warning", "EDGEOS_INTRA_OP_THREADS": "4"},
        intra_op_threads=2,
    )
    assert settings.host == "0.0.0.0"  # file only
    assert settings.allow_spinning is True  # file only
    assert settings.log_level == "warning"  # environment over file
    assert settings.intra_op_threads == 2  # flag over environment
    assert settings.port == 8470  # nobody set it


def test_node_yaml_is_read_from_the_data_dir_in_force(tmp_path: Path) -> None:
    env_dir, flag_dir = tmp_path / "from-env", tmp_path / "from-flag"
    for directory, port in ((env_dir, 1111), (flag_dir, 2222)):
        directory.mkdir()
        (directory / "node.yaml").write_text(f"port: {port}\n")
    settings = load_settings({"data_dir": flag_dir}, environ={"EDGEOS_DATA_DIR": str(env_dir)})
    assert settings.data_dir == flag_dir
    assert settings.port == 2222


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"PORT": "1", "EDGEOS_PORTS": "2", "edgeos_port": "3"})
    assert settings.port == 8470


def test_default_data_dir_follows_xdg_data_home_of_the_given_environ(tmp_path: Path) -> None:
    settings = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert settings.data_dir == tmp_path / "edgeos"


@pytest.mark.parametrize(
    ("flags", "env", "fragments"),
    [
        pytest.param({}, {"EDGEOS_PORT": "abc"}, ["EDGEOS_PORT", "'abc'", "int"], id="env-port"),
        pytest.param({"port": "abc"}, {}, ["--port", "'abc'"], id="flag-port"),
        pytest.param({"port": 80.5}, {}, ["--port", "80.5"], id="flag-fractional-port"),
        pytest.param({"port": True}, {}, ["--port"], id="flag-bool-port"),
        pytest.param({"allow_spinning": "maybe"}, {}, ["--allow-spinning", "'maybe'"], id="bool"),
        pytest.param(
            {}, {"EDGEOS_INTRA_OP_THREADS": "1.5"}, ["EDGEOS_INTRA_OP_THREADS", "'1.5'"],
            id="env-float-threads",
        ),
        pytest.param(
            {"execution_providers": ["CPUExecutionProvider", 3]}, {},
            ["--execution-providers"], id="list-of-non-names",
        ),
        pytest.param({"colour": "blue"}, {}, ["unknown", "colour"], id="unknown-flag"),
    ],
)  # fmt: skip
def test_bad_flag_or_environment_value_names_where(
    tmp_path: Path, flags: dict[str, Any], env: dict[str, str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env=env, **flags)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("yaml_text", "fragments"),
    [
        pytest.param("port: abc\n", ["port", "'abc'"], id="bad-int"),
        pytest.param("port:\n", ["port", "None"], id="empty-value"),
        pytest.param("allow_spinning: sometimes\n", ["allow_spinning"], id="bad-bool"),
        pytest.param("execution_providers: [1, 2]\n", ["execution_providers"], id="bad-list"),
        pytest.param("prot: 8080\n", ["prot", "unknown"], id="unknown-key"),
        pytest.param("data_dir: /elsewhere\n", ["data_dir"], id="data-dir-refused"),
        pytest.param("- port: 8080\n", ["mapping"], id="not-a-mapping"),
        pytest.param("port: [8080\n", ["YAML"], id="not-yaml"),
    ],
)
def test_bad_node_yaml_names_the_file_and_key(
    tmp_path: Path, yaml_text: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, yaml_text=yaml_text)
    message = str(info.value)
    assert str(tmp_path / "node.yaml") in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            b"8470: port\n",
            id="non-string-key",
        ),
        pytest.param(
            b"port: 8080\n\xff\xfe\n",
            id="not-utf8",
        ),
        pytest.param(b"port: 8080\n\tlog_level: info\n", id="tab-indent"),
    ],
)
def test_unreadable_node_yaml_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "node.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=r"node\.yaml"):
        load(tmp_path)


def test_empty_node_yaml_means_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, yaml_text="# nothing set yet\n").port == 8470


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        pytest.param({"EDGEOS_PORT": "0"}, "port", id="port-0"),
        pytest.param({"EDGEOS_PORT": "65536"}, "port", id="port-65536"),
        pytest.param({"EDGEOS_LOG_LEVEL": "verbose"}, "log_level", id="log-level"),
        pytest.param({"EDGEOS_INTER_OP_THREADS": "-1"}, "inter_op_threads", id="threads"),
        pytest.param({"EDGEOS_INFERENCE_THREADS": "-2"}, "inference_threads", id="inference"),
        pytest.param({"EDGEOS_MODEL_MEMORY_BUDGET_MB": "0"}, "model_memory_budget_mb", id="mb"),
        pytest.param({"EDGEOS_EXECUTION_PROVIDERS": " , "}, "execution_providers", id="no-ep"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"\b{setting}\b"):
        load(tmp_path, env=env)


@pytest.mark.parametrize(("port", "ok"), [(1, True), (65535, True), (0, False), (65536, False)])
def test_port_range_edges(tmp_path: Path, port: int, ok: bool) -> None:
    if ok:
        assert load(tmp_path, port=port).port == port
    else:
        with pytest.raises(ConfigError, match="port"):
            load(tmp_path, port=port)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_documented_log_level_is_accepted(tmp_path: Path, level: str) -> None:
    assert load(tmp_path, env={"EDGEOS_LOG_LEVEL": level}).log_level == level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("CUDAExecutionProvider,CPUExecutionProvider", ("CUDAExecutionProvider", "CPUExecutionProvider")),
        (" CUDAExecutionProvider , CPUExecutionProvider ", ("CUDAExecutionProvider", "CPUExecutionProvider")),
        ("CPUExecutionProvider,,", ("CPUExecutionProvider",)),
    ],
)  # fmt: skip
def test_list_from_environment_is_comma_separated(
    tmp_path: Path, text: str, expected: tuple[str, ...]
) -> None:
    settings = load(tmp_path, env={"EDGEOS_EXECUTION_PROVIDERS": text})
    assert settings.execution_providers == expected


def test_list_from_node_yaml_may_be_a_yaml_list(tmp_path: Path) -> None:
    settings = load(tmp_path, yaml_text="execution_providers:\n  - A\n  - B\n")
    assert settings.execution_providers == ("A", "B")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(t, True) for t in ("1", "true", "True", "YES", "on")]
    + [(t, False) for t in ("0", "false", "FALSE", "no", "Off")],
)
def test_bool_from_environment(tmp_path: Path, text: str, expected: bool) -> None:
    assert load(tmp_path, env={"EDGEOS_ALLOW_SPINNING": text}).allow_spinning is expected


def test_int_from_environment_and_whole_float_from_yaml(tmp_path: Path) -> None:
    assert load(tmp_path, env={"EDGEOS_PORT": "9100"}).port == 9100
    assert load(tmp_path / "b", yaml_text="port: 9200.0\n").port == 9200


@pytest.mark.parametrize(("given", "expected"), [(0, os.cpu_count() or 1), (3, 3)])
def test_inference_threads_zero_means_one_per_core(
    tmp_path: Path, given: int, expected: int
) -> None:
    assert load(tmp_path, inference_threads=given).inference_threads == expected


def test_data_dir_from_flag_is_a_path(tmp_path: Path) -> None:
    settings = load_settings({"data_dir": str(tmp_path / "x")}, environ={})
    assert settings.data_dir == tmp_path / "x"
    assert settings.database_path == tmp_path / "x" / "node.db"


def test_settings_are_immutable(tmp_path: Path) -> None:
    settings = load(tmp_path)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_markdown_table_lists_every_setting_and_its_variable() -> None:
    lines = settings_markdown().splitlines()
    assert lines[0].startswith("| setting |")
    body = lines[2:]
    assert len(body) == len(NODE_SETTINGS)
    for line, setting in zip(body, NODE_SETTINGS, strict=True):
        assert line.startswith(f"| `{setting.name}` | `EDGEOS_{setting.name.upper()}` |")
        assert line.count("|") == 5  # no help text breaks the table


def test_configuration_doc_is_up_to_date() -> None:
    doc = REPO / "docs" / "configuration.md"
    assert doc.exists(), "docs/configuration.md is missing"
    assert settings_markdown() in doc.read_text(encoding="utf-8"), (
        "docs/configuration.md is out of date: regenerate its table with "
        "`python -m edgeos.settings` and paste it in"
    )
